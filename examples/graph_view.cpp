// The graph view: ad::to_dot draws the tape of a small attention block (projections, a fused biased
// attention, the output projection and a loss) as Graphviz DOT, then renders it to PNG with Debian's
// graphviz (`apt-get install graphviz`) when `dot` is installed.
//
//   ./build/examples/graph_view [out.dot]     (default attention_graph.dot; the PNG lands beside it)
//
// Boxes are tape records (op, output shape; blue when a fused kernel computed the whole attention),
// orange ellipses Params (name, shape), dashed ellipses constants.

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

int main(int argc, char** argv) {
    const std::string dot_path = argc > 1 ? argv[1] : "attention_graph.dot";
    const std::int64_t B = 2, H = 4, L = 16, E = 32;
    ad::nn::Linear<float> qkv(E, 3 * E, true, 1, "qkv"), out(E, E, true, 2, "out");
    ad::Param<float> bias(ad::zeros<float>({H, L, L}), "bias");
    const ad::Tensor<float> x = ad::randn<float>({B, L, E}, 3), target = ad::randn<float>({B, L, E}, 4);

    ad::Var<float> proj = qkv(x);
    auto heads = [&](std::int64_t i) { return ad::split_heads(ad::narrow(proj, 2, i * E, E), H); };
    ad::Var<float> q = heads(0), k = heads(1), v = heads(2);
    ad::Var<float> attended = ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.25f + bias, ad::causal), v);
    ad::Var<float> loss = ad::mse(out(ad::merge_heads(attended)), target);

    const std::string dot = ad::to_dot(loss);
    std::ofstream(dot_path) << dot;
    std::cout << "wrote " << dot_path << " (" << dot.size() << " bytes)\n";
    const std::string png = dot_path.substr(0, dot_path.rfind('.')) + ".png";
    if (std::system("command -v dot > /dev/null 2>&1") == 0) {
        const std::string cmd = "dot -Tpng '" + dot_path + "' -o '" + png + "'";
        if (std::system(cmd.c_str()) != 0) {
            std::cerr << "graph_view: '" << cmd << "' failed\n";
            return 1;
        }
        std::cout << "rendered " << png << "\n";
    } else {
        std::cout << "graphviz is not installed (apt-get install graphviz): render with dot -Tpng " << dot_path << " -o " << png << "\n";
    }
    loss.backward();
    return 0;
}
