// The fused kernels' one-tile path (src/kernels/attention_small.hpp, issue 11's tiny graph): every
// feature on shapes of one tile, bit for bit against the general fused kernels (the path switched
// off), against the generic (unfused) path, 1 vs 2 threads bitwise, and gradcheck in double.
#include <doctest/doctest.h>

#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include <autodiff/autodiff.hpp>

#include "fused_vs_generic.hpp"

namespace ad = autodiff;

namespace {

constexpr std::int64_t n = 2, h = 3, Lq = 8, Lk = 9, d = 5, dv = 6;  // 8 rows: the 8-row products

// One configuration of the biased attention: a name and the expression over q, k, v and the bias.
template <class T>
struct Case {
    std::string name;
    std::function<ad::Var<T>()> f;
    std::vector<ad::Param<T>> params;
};

template <class T>
std::vector<Case<T>> cases() {
    using P = ad::Param<T>;
    P q(ad::randn<T>({n, h, Lq, d}, 1), "q"), k(ad::randn<T>({n, h, Lk, d}, 2), "k"), v(ad::randn<T>({n, h, Lk, dv}, 3), "v");
    const T s = T(0.4);
    auto scores = [q, k, s] { return ad::matmul(q, ad::transpose(k)) * s; };
    std::vector<Case<T>> out;
    for (const ad::Shape& bs : std::vector<ad::Shape>{{n, h, Lq, Lk}, {h, Lq, Lk}, {Lq, Lk}, {1, h, 1, Lk}, {Lk}, {n, 1, Lq, 1}}) {
        P b(ad::randn<T>(bs, 4), "b");
        out.push_back({"bias " + bs.str(), [=] { return ad::matmul(ad::softmax(scores() + b), v); }, {q, k, v, b}});
    }
    out.push_back({"no bias", [=] { return ad::matmul(ad::softmax(scores()), v); }, {q, k, v}});
    P bf(ad::randn<T>({n, h, Lq, Lk}, 5), "bias_full");
    P bh(ad::randn<T>({h, Lq, Lk}, 6), "bias_heads");
    out.push_back({"causal, full bias", [=] { return ad::matmul(ad::softmax(scores() + bf, ad::causal), v); }, {q, k, v, bf}});
    ad::Tensor<bool> kp = ad::full<bool>({n, Lk}, true);
    for (std::int64_t j = 6; j < Lk; ++j) kp(1, j) = false;
    ad::Tensor<bool> keep = ad::full<bool>({Lq, Lk}, true);
    for (std::int64_t i = 0; i < Lq; ++i) keep(i, (3 * i) % Lk) = false;
    const ad::Mask masks = ad::key_padding_mask(kp) | ad::keep_mask(keep);
    out.push_back({"key padding and keep mask", [=] { return ad::matmul(ad::softmax(scores() + bh, masks), v); }, {q, k, v, bh}});
    ad::Tensor<bool> none = ad::full<bool>({n, Lk}, true);
    for (std::int64_t j = 0; j < Lk; ++j) none(0, j) = false;  // batch 0: every row fully masked
    const ad::Mask padding = ad::key_padding_mask(none);
    out.push_back({"fully masked rows, full bias", [=] { return ad::matmul(ad::softmax(scores() + bf, padding), v); }, {q, k, v, bf}});
    const ad::Tensor<T> additive = ad::randn<T>({1, h, 1, Lk}, 7);
    out.push_back({"additive mask", [=] { return ad::matmul(ad::softmax(scores() + bh, {}, additive), v); }, {q, k, v, bh}});
    const ad::DropoutDescriptor drop{0.3, 11, 5};
    out.push_back({"dropout, full bias (stored mask)", [=] { return ad::matmul(ad::dropout(ad::softmax(scores() + bf, ad::causal), drop), v); }, {q, k, v, bf}});
    out.push_back({"dropout, broadcast bias", [=] { return ad::matmul(ad::dropout(ad::softmax(scores() + bh), drop), v); }, {q, k, v, bh}});
    out.push_back({"dropout, no bias", [=] { return ad::matmul(ad::dropout(ad::softmax(scores()), drop), v); }, {q, k, v}});
    out.push_back({"bias added before the scaling", [=] { return ad::matmul(ad::softmax((ad::matmul(q, ad::transpose(k)) + bh) * s), v); }, {q, k, v, bh}});
    // The path's edges: one row, one key, rows not a multiple of 8, a full 64 × 64 tile; a constant bias.
    for (const auto& [lq, lk] : std::vector<std::pair<std::int64_t, std::int64_t>>{{1, 1}, {1, 9}, {9, 1}, {7, 5}, {16, 8}, {64, 64}}) {
        P q1(ad::randn<T>({1, 1, lq, 4}, 8), "q1"), k1(ad::randn<T>({1, 1, lk, 4}, 9), "k1"), v1(ad::randn<T>({1, 1, lk, 3}, 10), "v1"),
            b1(ad::randn<T>({1, 1, lq, lk}, 11), "b1");
        out.push_back({"Lq " + std::to_string(lq) + ", Lk " + std::to_string(lk),
                       [=] { return ad::matmul(ad::dropout(ad::softmax(ad::matmul(q1, ad::transpose(k1)) + b1), drop), v1); }, {q1, k1, v1, b1}});
    }
    // The blog's shape (2, 4, 8, 16) and d = 32, with and without a full trainable bias and a
    // padded key: the 8 × 16 register transposes, the 16-wide 8-row products, two 8-key rows per
    // register in the softmax.
    for (const std::int64_t dd : {16, 32}) {
        P q2(ad::randn<T>({2, 4, 8, dd}, 13), "q2"), k2(ad::randn<T>({2, 4, 8, dd}, 14), "k2"), v2(ad::randn<T>({2, 4, 8, dd}, 15), "v2"),
            b2(ad::randn<T>({2, 4, 8, 8}, 16), "b2");
        const T s2 = T(1) / std::sqrt(static_cast<T>(dd));
        const std::string tag = "blog shape, d " + std::to_string(dd);
        out.push_back({tag + ", full bias", [=] { return ad::matmul(ad::softmax(ad::matmul(q2, ad::transpose(k2)) * s2 + b2), v2); }, {q2, k2, v2, b2}});
        out.push_back({tag + ", no bias", [=] { return ad::matmul(ad::softmax(ad::matmul(q2, ad::transpose(k2)) * s2), v2); }, {q2, k2, v2}});
        ad::Tensor<bool> pad2 = ad::full<bool>({2, 8}, true);
        for (std::int64_t j = 0; j < 8; ++j) pad2(0, j) = false;  // batch 0: every row fully masked
        pad2(1, 7) = false;
        const ad::Mask masks2 = ad::key_padding_mask(pad2);
        out.push_back({tag + ", key padding, dropout", [=] { return ad::matmul(ad::dropout(ad::softmax(ad::matmul(q2, ad::transpose(k2)) * s2 + b2, masks2), drop), v2); }, {q2, k2, v2, b2}});
    }
    const ad::Tensor<T> fixed = ad::randn<T>({n, h, Lq, Lk}, 12);
    out.push_back({"constant bias", [=] { return ad::matmul(ad::softmax(scores() + fixed), v); }, {q, k, v}});
    return out;
}

// The output and every gradient of one forward + backward.
template <class T>
std::vector<ad::Tensor<T>> run(Case<T>& c) {
    for (auto& p : c.params) p.zero_grad();
    ad::Var<T> out = c.f();
    out.backward(ad::randn<T>(out.shape(), 99));
    std::vector<ad::Tensor<T>> r{out.value().clone()};
    for (auto& p : c.params) r.push_back(p.grad().clone());
    return r;
}

template <class T>
bool bitwise_equal(const std::vector<ad::Tensor<T>>& a, const std::vector<ad::Tensor<T>>& b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
        if (a[i].shape() != b[i].shape() || std::memcmp(a[i].data(), b[i].data(), static_cast<std::size_t>(a[i].numel()) * sizeof(T)) != 0)
            return false;
    return true;
}

struct OneTilePath {
    explicit OneTilePath(bool on) { ad::set_attention_one_tile_path(on); }
    ~OneTilePath() { ad::set_attention_one_tile_path(true); }
    OneTilePath(const OneTilePath&) = delete;
    OneTilePath& operator=(const OneTilePath&) = delete;
};

template <class T>
void check_against_general() {
    for (auto& c : cases<T>()) {
        CAPTURE(c.name);
        static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::matmul(std::declval<ad::Param<T>>(), ad::transpose(std::declval<ad::Param<T>>()))), std::declval<ad::Param<T>>()))>);
        const auto fast = run(c);
        std::vector<ad::Tensor<T>> general;
        {
            OneTilePath off(false);
            general = run(c);
        }
        std::ostringstream diffs;  // the largest difference per tensor, for the report
        for (std::size_t i = 0; i < fast.size(); ++i) diffs << ' ' << static_cast<double>(ad::max_abs_diff(fast[i], general[i]));
        INFO(diffs.str());
        CHECK(bitwise_equal(fast, general));
    }
}

}  // namespace

TEST_CASE("one-tile path: bit for bit the general fused kernels' results, every feature (float and double)") {
    CHECK(ad::attention_one_tile_path());
    check_against_general<float>();
    check_against_general<double>();
}

TEST_CASE("one-tile path: the generic (unfused) path's results, every feature (double)") {
    for (auto& c : cases<double>()) {
        CAPTURE(c.name);
        CHECK(test::fused_vs_generic<double>(c.f, c.params) < 1e-13);
    }
}

TEST_CASE("one-tile path: bitwise identical on 1 and 2 threads (float)") {
    for (auto& c : cases<float>()) {
        CAPTURE(c.name);
        ad::set_num_threads(1);
        const auto one = run(c);
        ad::set_num_threads(2);
        const auto two = run(c);
        CHECK(bitwise_equal(one, two));
    }
}

TEST_CASE("one-tile path: gradcheck in double, every feature") {
    for (auto& c : cases<double>()) {
        CAPTURE(c.name);
        const auto report = ad::gradcheck(c.f, c.params);
        INFO(report.str());
        CHECK(report.passed);
    }
}
