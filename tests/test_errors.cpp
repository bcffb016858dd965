// Bad input: every public entry point throws autodiff::Error, and the message starts with the
// operation's name and names the argument and the shapes involved. A builder that throws records
// nothing: every check here also verifies that the current tape's size is unchanged.
#include <doctest/doctest.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <string_view>
#include <utility>

#include <autodiff/autodiff.hpp>

#include "check_error.hpp"

namespace ad = autodiff;
using Tensor = ad::Tensor<double>;

namespace {

constexpr double not_a_number = std::numeric_limits<double>::quiet_NaN();
constexpr double inf = std::numeric_limits<double>::infinity();

using test::check_error;

// Tensors whose contents do not matter: builders check shapes only.
Tensor any(const ad::Shape& s) { return ad::zeros<double>(s); }
ad::Param<double> param(const ad::Shape& s) { return ad::Param<double>(any(s)); }
ad::Const<double> constant(const ad::Shape& s) { return ad::Const<double>(any(s)); }

}  // namespace

// ---- matmul and transpose -----------------------------------------------------------------------

TEST_CASE("matmul: inner dimensions that differ are reported with both shapes") {
    const auto a = param({2, 8, 128, 64});
    const auto b = constant({2, 8, 32, 128});
    std::string message;
    try {
        (void)ad::matmul(a, b);
    } catch (const ad::Error& e) {
        message = e.what();
    }
    CHECK(message == "matmul: inner dimensions differ: lhs (2,8,128,64) vs rhs (2,8,32,128)");
}

TEST_CASE("matmul: bad operands") {
    SUBCASE("inner dimensions differ through a transpose") {
        check_error([] { (void)ad::matmul(param({2, 3, 5, 7}), ad::transpose(param({2, 3, 4, 6}))); }, "matmul",
                    {"inner dimensions differ", "lhs (2,3,5,7)", "rhs (2,3,4,6) (transposed)"});
    }
    SUBCASE("batch dimensions differ") {
        check_error([] { (void)ad::matmul(param({2, 8, 5, 7}), param({3, 8, 7, 5})); }, "matmul",
                    {"batch dimensions differ", "lhs (2,8,5,7)", "rhs (3,8,7,5)"});
    }
    SUBCASE("rank 3 with rank 4: batch dimensions differ") {
        check_error([] { (void)ad::matmul(param({8, 5, 7}), param({2, 8, 7, 5})); }, "matmul",
                    {"batch dimensions differ", "lhs (8,5,7)", "rhs (2,8,7,5)"});
    }
    SUBCASE("rank-1 lhs") {
        check_error([] { (void)ad::matmul(param({7}), param({7, 3})); }, "matmul", {"lhs must have rank 2..4", "(7)"});
    }
    SUBCASE("rank-1 rhs") {
        check_error([] { (void)ad::matmul(param({3, 7}), constant({7})); }, "matmul", {"rhs must have rank 2..4", "(7)"});
    }
}

TEST_CASE("transpose: a rank-1 input is rejected") {
    check_error([] { (void)ad::transpose(param({7})); }, "transpose", {"input must have rank 2..4", "(7)"});
}

// ---- elementwise --------------------------------------------------------------------------------

TEST_CASE("+ - * /: shapes that do not broadcast are rejected, naming both") {
    const auto a = param({2, 3});
    const auto b = constant({4, 3});
    SUBCASE("add") { check_error([&] { (void)(a + b); }, "add", {"cannot broadcast", "lhs (2,3)", "rhs (4,3)"}); }
    SUBCASE("sub") { check_error([&] { (void)(a - b); }, "sub", {"cannot broadcast", "lhs (2,3)", "rhs (4,3)"}); }
    SUBCASE("mul") { check_error([&] { (void)(a * b); }, "mul", {"cannot broadcast", "lhs (2,3)", "rhs (4,3)"}); }
    SUBCASE("div") { check_error([&] { (void)(b / a); }, "div", {"cannot broadcast", "lhs (4,3)", "rhs (2,3)"}); }
    SUBCASE("add, rank 4 with rank 3") {
        check_error([] { (void)(param({2, 3, 5, 7}) + param({3, 5, 6})); }, "add", {"lhs (2,3,5,7)", "rhs (3,5,6)"});
    }
    SUBCASE("mul with a plain tensor operand") {
        check_error([&] { (void)(a * any({3, 2})); }, "mul", {"lhs (2,3)", "rhs (3,2)"});
    }
}

TEST_CASE("add_bias: a bias that would enlarge the scores is rejected") {
    SUBCASE("broadcastable, but the result would be larger than the scores") {
        check_error([] { (void)ad::add_bias(param({2, 1, 5, 7}), param({3, 5, 7})); }, "add_bias",
                    {"bias (3,5,7)", "scores (2,1,5,7)"});
    }
    SUBCASE("bias of higher rank") {
        check_error([] { (void)ad::add_bias(param({5, 7}), param({2, 5, 7})); }, "add_bias", {"bias (2,5,7)", "scores (5,7)"});
    }
    SUBCASE("bias that does not broadcast at all") {
        check_error([] { (void)ad::add_bias(param({2, 3, 5, 7}), constant({5, 6})); }, "add_bias",
                    {"bias (5,6)", "scores (2,3,5,7)"});
    }
}

TEST_CASE("scale and shift: non-finite scalars and division by zero are rejected") {
    const auto x = param({2, 3});
    SUBCASE("x * NaN") { check_error([&] { (void)(x * not_a_number); }, "scale", {"factor must be finite", "nan"}); }
    SUBCASE("inf * x") { check_error([&] { (void)(inf * x); }, "scale", {"factor must be finite", "inf"}); }
    SUBCASE("x / 0") { check_error([&] { (void)(x / 0); }, "scale", {"divisor must be finite and non-zero", "got 0"}); }
    SUBCASE("x / 0.0") { check_error([&] { (void)(x / 0.0); }, "scale", {"divisor must be finite and non-zero", "got 0"}); }
    SUBCASE("x / inf") { check_error([&] { (void)(x / inf); }, "scale", {"divisor must be finite and non-zero", "inf"}); }
    SUBCASE("x / NaN") { check_error([&] { (void)(x / not_a_number); }, "scale", {"divisor must be finite and non-zero", "nan"}); }
    SUBCASE("x + NaN") { check_error([&] { (void)(x + not_a_number); }, "shift", {"constant must be finite", "nan"}); }
    SUBCASE("x - inf") { check_error([&] { (void)(x - inf); }, "shift", {"constant must be finite", "-inf"}); }
    SUBCASE("inf - x") { check_error([&] { (void)(inf - x); }, "shift", {"constant must be finite", "inf"}); }
}

TEST_CASE("pow: a non-finite exponent is rejected") {
    const auto x = param({2, 3});
    SUBCASE("inf") { check_error([&] { (void)ad::pow(x, inf); }, "pow", {"exponent must be finite", "inf"}); }
    SUBCASE("NaN") { check_error([&] { (void)ad::pow(x, not_a_number); }, "pow", {"exponent must be finite", "nan"}); }
}

// ---- softmax and dropout ------------------------------------------------------------------------

TEST_CASE("softmax: masks that do not fit the logits are rejected") {
    const auto x = param({2, 3, 5, 7});
    SUBCASE("keep mask of the wrong shape") {
        check_error([&] { (void)ad::softmax(x, ad::keep_mask(ad::full<bool>({5, 6}, true))); }, "softmax",
                    {"keep mask (5,6)", "logits (2,3,5,7)"});
    }
    SUBCASE("key-padding mask with the wrong number of keys") {
        check_error([&] { (void)ad::softmax(x, ad::key_padding_mask(ad::full<bool>({2, 6}, true))); }, "softmax",
                    {"key-padding mask", "(2,7)", "logits (2,3,5,7)", "got (2,6)"});
    }
    SUBCASE("key-padding mask with the wrong batch") {
        check_error([&] { (void)ad::softmax(x, ad::key_padding_mask(ad::full<bool>({3, 7}, true))); }, "softmax",
                    {"key-padding mask", "(2,7)", "got (3,7)"});
    }
    SUBCASE("key-padding mask (batch, Lk) for rank-2 logits, which need (Lk)") {
        check_error([] { (void)ad::softmax(param({5, 7}), ad::key_padding_mask(ad::full<bool>({2, 7}, true))); }, "softmax",
                    {"key-padding mask", "(7)", "logits (5,7)", "got (2,7)"});
    }
    SUBCASE("additive mask of the wrong shape") {
        check_error([&] { (void)ad::softmax(x, {}, any({3, 5, 6})); }, "softmax", {"additive mask (3,5,6)", "logits (2,3,5,7)"});
    }
    SUBCASE("causal mask on rank-1 logits") {
        check_error([] { (void)ad::softmax(param({7}), ad::causal); }, "softmax", {"causal", "(7)"});
    }
    SUBCASE("rank-0 logits") {
        check_error([] { (void)ad::softmax(ad::sum(param({3}))); }, "softmax", {"rank >= 1", "()"});
    }
    SUBCASE("two keep masks cannot be combined with |") {
        check_error([] { (void)(ad::keep_mask(ad::full<bool>({5, 7}, true)) | ad::keep_mask(ad::full<bool>({1, 7}, true))); },
                    "mask", {"keep", "(5,7)", "(1,7)"});
    }
}

TEST_CASE("dropout: a rate outside [0, 1) is rejected") {
    const auto x = param({2, 3});
    SUBCASE("1.0") { check_error([&] { (void)ad::dropout(x, {1.0, 0, 0, true}); }, "dropout", {"rate must be in [0, 1)", "got 1"}); }
    SUBCASE("-0.1") { check_error([&] { (void)ad::dropout(x, {-0.1, 0, 0, true}); }, "dropout", {"rate must be in [0, 1)", "got -0.1"}); }
    SUBCASE("NaN") { check_error([&] { (void)ad::dropout(x, {not_a_number, 0, 0, true}); }, "dropout", {"rate must be in [0, 1)", "got nan"}); }
    SUBCASE("1.0 even when not training") {
        check_error([&] { (void)ad::dropout(x, {1.0, 0, 0, false}); }, "dropout", {"rate must be in [0, 1)"});
    }
}

// ---- linear -------------------------------------------------------------------------------------

TEST_CASE("linear: bad input, weight and bias shapes are rejected") {
    SUBCASE("input features differ from the weight's") {
        check_error([] { (void)ad::linear(param({5, 7}), param({3, 6})); }, "linear",
                    {"input features differ", "input (5,7)", "weight (3,6)"});
    }
    SUBCASE("bias of the wrong length") {
        check_error([] { (void)ad::linear(param({5, 7}), param({3, 7}), param({4})); }, "linear",
                    {"bias must have shape (3)", "weight (3,7)", "got (4)"});
    }
    SUBCASE("bias of the wrong rank") {
        check_error([] { (void)ad::linear(param({5, 7}), param({3, 7}), param({1, 3})); }, "linear",
                    {"bias must have shape (3)", "got (1,3)"});
    }
    SUBCASE("rank-1 weight") {
        check_error([] { (void)ad::linear(param({5, 7}), param({7})); }, "linear", {"weight must have rank 2", "(7)"});
    }
    SUBCASE("rank-0 input") {
        check_error([] { (void)ad::linear(ad::sum(param({7})), param({3, 7})); }, "linear", {"input must have rank 1..4", "()"});
    }
}

// ---- layout -------------------------------------------------------------------------------------

TEST_CASE("reshape: a different element count is rejected") {
    check_error([] { (void)ad::reshape(param({2, 3, 5}), {4, 7}); }, "reshape", {"(2,3,5)", "(4,7)", "element counts differ"});
}

TEST_CASE("permute: a list that is not a permutation of the input's dimensions is rejected") {
    const auto x = param({2, 3, 5});
    SUBCASE("a repeated dimension") {
        check_error([&] { (void)ad::permute(x, {0, 0, 1}); }, "permute", {"(0,0,1) is not a permutation", "(2,3,5)"});
    }
    SUBCASE("a dimension out of range") {
        check_error([&] { (void)ad::permute(x, {0, 1, 3}); }, "permute", {"(0,1,3) is not a permutation", "(2,3,5)"});
    }
    SUBCASE("a negative dimension") {
        check_error([&] { (void)ad::permute(x, {0, -1, 2}); }, "permute", {"(0,-1,2) is not a permutation", "(2,3,5)"});
    }
    SUBCASE("too few entries") {
        check_error([&] { (void)ad::permute(x, {1, 0}); }, "permute", {"2 entries", "(2,3,5)", "rank 3"});
    }
    SUBCASE("too many entries") {
        check_error([&] { (void)ad::permute(x, {0, 1, 2, 3}); }, "permute", {"4 entries", "(2,3,5)", "rank 3"});
    }
}

TEST_CASE("narrow: a dimension or a slice out of range is rejected") {
    const auto x = param({2, 3, 5});
    SUBCASE("dimension out of range") {
        check_error([&] { (void)ad::narrow(x, 3, 0, 1); }, "narrow", {"dimension 3", "(2,3,5)"});
    }
    SUBCASE("negative dimension") {
        check_error([&] { (void)ad::narrow(x, -1, 0, 1); }, "narrow", {"dimension -1", "(2,3,5)"});
    }
    SUBCASE("slice past the end") {
        check_error([&] { (void)ad::narrow(x, 2, 3, 3); }, "narrow", {"[3, 6)", "dimension 2", "(2,3,5)"});
    }
    SUBCASE("negative start") {
        check_error([&] { (void)ad::narrow(x, 1, -1, 2); }, "narrow", {"[-1, 1)", "dimension 1", "(2,3,5)"});
    }
    SUBCASE("negative length") {
        check_error([&] { (void)ad::narrow(x, 1, 2, -1); }, "narrow", {"[2, 1)", "(2,3,5)"});
    }
}

TEST_CASE("split_heads and merge_heads: bad ranks and head counts are rejected") {
    SUBCASE("embedding not divisible by the heads") {
        check_error([] { (void)ad::split_heads(param({2, 5, 12}), 5); }, "split_heads",
                    {"embedding dimension 12", "(2,5,12)", "5 heads"});
    }
    SUBCASE("zero heads") {
        check_error([] { (void)ad::split_heads(param({2, 5, 12}), 0); }, "split_heads", {"(2,5,12)", "0 heads"});
    }
    SUBCASE("negative heads") {
        check_error([] { (void)ad::split_heads(param({2, 5, 12}), -3); }, "split_heads", {"(2,5,12)", "-3 heads"});
    }
    SUBCASE("split_heads of rank 2") {
        check_error([] { (void)ad::split_heads(param({5, 12}), 3); }, "split_heads", {"input must have rank 3", "(5,12)"});
    }
    SUBCASE("split_heads of rank 4") {
        check_error([] { (void)ad::split_heads(param({2, 3, 5, 12}), 3); }, "split_heads", {"input must have rank 3", "(2,3,5,12)"});
    }
    SUBCASE("merge_heads of rank 3") {
        check_error([] { (void)ad::merge_heads(param({2, 5, 12})); }, "merge_heads", {"input must have rank 4", "(2,5,12)"});
    }
}

// ---- reductions ---------------------------------------------------------------------------------

TEST_CASE("mse: input and target of different shapes are rejected") {
    check_error([] { (void)ad::mse(param({2, 3}), constant({3, 2})); }, "mse", {"same shape", "input (2,3)", "target (3,2)"});
}

// ---- leaves and tensors -------------------------------------------------------------------------

TEST_CASE("Param and Const: an undefined tensor is rejected") {
    SUBCASE("named Param") {
        check_error([] { ad::Param<double> p(Tensor(), "w"); }, "Param", {"'w'", "undefined tensor"});
    }
    SUBCASE("unnamed Param") {
        check_error([] { ad::Param<double> p{Tensor()}; }, "Param", {"undefined tensor"});
    }
    SUBCASE("Const") {
        check_error([] { ad::Const<double> c{Tensor()}; }, "Const", {"undefined tensor"});
    }
    SUBCASE("a plain undefined tensor in an expression") {
        check_error([] { (void)(param({2, 3}) + Tensor()); }, "expression", {"undefined"});
    }
}

TEST_CASE("tensors: bad factory arguments, indices and views are rejected") {
    SUBCASE("from_vector with the wrong element count") {
        check_error([] { (void)ad::from_vector<double>({2, 3}, {1, 2, 3, 4, 5}); }, "from_vector", {"5 elements", "(2,3)", "needs 6"});
    }
    SUBCASE("at() with an index out of range") {
        check_error([] { (void)any({2, 3}).at(2, 0); }, "at", {"(2,0)", "(2,3)"});
    }
    SUBCASE("at() with a negative index") {
        check_error([] { (void)any({2, 3}).at(0, -1); }, "at", {"(0,-1)", "(2,3)"});
    }
    SUBCASE("at() with the wrong number of indices") {
        check_error([] { (void)any({2, 3}).at(1); }, "at", {"(1)", "(2,3)"});
    }
    SUBCASE("at() on an undefined tensor") {
        check_error([] { (void)Tensor().at(); }, "at", {"()"});
    }
    SUBCASE("item() of a tensor with several elements") {
        check_error([] { (void)any({2, 3}).item(); }, "item", {"exactly one element", "(2,3)"});
    }
    SUBCASE("reshaped() to another element count") {
        check_error([] { (void)any({2, 3}).reshaped({7}); }, "reshape", {"(2,3)", "(7)"});
    }
    SUBCASE("a shape of rank 5") {
        check_error([] { ad::Shape s{1, 2, 3, 4, 5}; }, "shape", {"rank 5", "4"});
    }
    SUBCASE("a negative dimension") {
        check_error([] { ad::Shape s{2, -1}; }, "shape", {"negative dimension -1"});
    }
    SUBCASE("uniform with lo >= hi") {
        check_error([] { (void)ad::uniform<double>({3}, 1.0, 1.0); }, "uniform", {"lo < hi"});
    }
    SUBCASE("max_abs_diff of different shapes") {
        check_error([] { (void)ad::max_abs_diff(any({2, 3}), any({3, 2})); }, "max_abs_diff", {"(2,3)", "(3,2)"});
    }
}

TEST_CASE("set_num_threads: fewer than one thread is rejected") {
    SUBCASE("0") { check_error([] { ad::set_num_threads(0); }, "set_num_threads", {">= 1", "got 0"}); }
    SUBCASE("-1") { check_error([] { ad::set_num_threads(-1); }, "set_num_threads", {">= 1", "got -1"}); }
}

TEST_CASE("gradcheck: a step that is not finite and positive, or no inputs, is rejected") {
    ad::Param<double> x(any({3}));
    const auto f = [&] { return ad::sum(x * x); };
    SUBCASE("eps 0") { check_error([&] { (void)ad::gradcheck(f, {x}, {0.0}); }, "gradcheck", {"eps", "got 0"}); }
    SUBCASE("eps < 0") { check_error([&] { (void)ad::gradcheck(f, {x}, {-1e-6}); }, "gradcheck", {"eps", "got -1e-06"}); }
    SUBCASE("eps NaN") { check_error([&] { (void)ad::gradcheck(f, {x}, {not_a_number}); }, "gradcheck", {"eps", "nan"}); }
    SUBCASE("eps inf") { check_error([&] { (void)ad::gradcheck(f, {x}, {inf}); }, "gradcheck", {"eps", "inf"}); }
    SUBCASE("no inputs") { check_error([&] { (void)ad::gradcheck(f, {}); }, "gradcheck", {"no inputs"}); }
}

// ---- kernels called directly --------------------------------------------------------------------

TEST_CASE("strided_batched_gemm: bad shapes and scalars are rejected") {
    const Tensor A = any({2, 5, 7}), B = any({2, 7, 3});
    SUBCASE("C of the wrong shape") {
        Tensor C = any({2, 5, 5});
        check_error([&] { ad::strided_batched_gemm(1.0, A, B, 0.0, C); }, "strided_batched_gemm",
                    {"C has shape (2,5,5)", "A (2,5,7)", "B (2,7,3)", "needs (2,5,3)"});
    }
    SUBCASE("C of the untransposed shape when trans_c is set") {
        Tensor C = any({2, 5, 3});
        check_error([&] { ad::strided_batched_gemm(1.0, A, B, 0.0, C, {false, false, true}); }, "strided_batched_gemm",
                    {"C has shape (2,5,3)", "needs (2,3,5)"});
    }
    SUBCASE("inner dimensions differ under a transpose flag") {
        Tensor C = any({2, 5, 3});
        check_error([&] { ad::strided_batched_gemm(1.0, A, B, 0.0, C, {false, true, false}); }, "strided_batched_gemm",
                    {"inner dimensions differ", "(2,5,7)", "(2,7,3) (transposed)"});
    }
    SUBCASE("an unallocated C") {
        Tensor C;
        check_error([&] { ad::strided_batched_gemm(1.0, A, B, 0.0, C); }, "strided_batched_gemm", {"allocated"});
    }
    SUBCASE("a NaN alpha") {
        Tensor C = any({2, 5, 3});
        check_error([&] { ad::strided_batched_gemm(not_a_number, A, B, 0.0, C); }, "strided_batched_gemm", {"alpha (nan)", "finite"});
    }
    SUBCASE("matmul_forward with inner dimensions that differ") {
        check_error([&] { (void)ad::matmul_forward(A, false, A, false); }, "matmul", {"inner dimensions differ", "(2,5,7)"});
    }
}

TEST_CASE("softmax kernels: mismatched shapes and masks are rejected") {
    SUBCASE("softmax_backward with dy and y of different shapes") {
        check_error([] { (void)ad::softmax_backward(any({2, 3}), any({3, 2})); }, "softmax_backward", {"dy (2,3)", "y (3,2)"});
    }
    SUBCASE("softmax_forward with a keep mask that does not fit") {
        check_error([] { (void)ad::softmax_forward(any({5, 7}), ad::keep_mask(ad::full<bool>({5, 6}, true))); }, "softmax",
                    {"keep mask (5,6)", "logits (5,7)"});
    }
}

TEST_CASE("linear kernels: bad gradient buffers and shapes are rejected") {
    const Tensor x = any({5, 7}), W = any({3, 7}), dy = any({5, 3});
    SUBCASE("linear_backward with dW of the wrong shape") {
        Tensor dW = any({7, 3});
        check_error([&] { ad::linear_backward<double>(nullptr, &dW, nullptr, dy, x, W); }, "linear_backward",
                    {"dW", "(3,7)", "got (7,3)"});
    }
    SUBCASE("linear_backward with db of the wrong shape") {
        Tensor db = any({4});
        check_error([&] { ad::linear_backward<double>(nullptr, nullptr, &db, dy, x, W); }, "linear_backward", {"db", "(3)", "got (4)"});
    }
    SUBCASE("linear_backward with dy of the wrong shape") {
        Tensor dx;
        check_error([&] { ad::linear_backward<double>(&dx, nullptr, nullptr, any({5, 4}), x, W); }, "linear_backward",
                    {"dy", "(5,3)", "got (5,4)"});
    }
    SUBCASE("linear_forward with input features that differ") {
        check_error([&] { (void)ad::linear_forward(any({5, 6}), W); }, "linear", {"input features differ", "(5,6)", "(3,7)"});
    }
}

TEST_CASE("reduction, dropout and layout kernels: bad arguments are rejected") {
    SUBCASE("mse_loss_forward with different shapes") {
        check_error([] { (void)ad::mse_loss_forward(any({2, 3}), any({3, 2})); }, "mse_loss", {"input (2,3)", "target (3,2)"});
    }
    SUBCASE("mse_loss_backward with different shapes") {
        Tensor da;
        check_error([&] { ad::mse_loss_backward<double>(&da, nullptr, 1.0, any({2, 3}), any({3, 2})); }, "mse_loss_backward",
                    {"input (2,3)", "target (3,2)"});
    }
    SUBCASE("dropout_forward with rate 1") {
        check_error([] { (void)ad::dropout_forward(ad::DropoutDescriptor{1.0, 0, 0, true}, any({3})); }, "dropout", {"got 1"});
    }
    SUBCASE("dropout_backward with a negative rate") {
        check_error([] { (void)ad::dropout_backward(ad::DropoutDescriptor{-0.5, 0, 0, true}, any({3})); }, "dropout_backward",
                    {"got -0.5"});
    }
    SUBCASE("permute_forward with a repeated dimension") {
        check_error([] { (void)ad::permute_forward(any({2, 3}), ad::Permutation{1, 1, 2, 3}); }, "permute", {"(1,1)", "(2,3)"});
    }
    SUBCASE("reduce_to_shape to a shape that does not broadcast") {
        check_error([] { (void)ad::reduce_to_shape(any({2, 3}), ad::Shape{4}); }, "reduce_to_shape", {"(2,3)", "(4)"});
    }
}

// ---- no side effects ----------------------------------------------------------------------------

TEST_CASE("attention kernels: bad shapes, masks, scales and buffers are rejected") {
    const Tensor q = any({2, 3, 5, 8}), k = any({2, 3, 7, 8}), v = any({2, 3, 7, 4}), none;
    const ad::AttentionOptions opt;
    SUBCASE("ranks differ") {
        check_error([&] { (void)ad::attention_forward(q, any({3, 7, 8}), v, none, none, opt); }, "attention",
                    {"same rank", "q (2,3,5,8)", "k (3,7,8)"});
    }
    SUBCASE("leading dimensions differ") {
        check_error([&] { (void)ad::attention_forward(q, any({2, 4, 7, 8}), any({2, 4, 7, 4}), none, none, opt); }, "attention",
                    {"leading dimensions differ", "(2,4,7,8)"});
    }
    SUBCASE("head dimensions differ") {
        check_error([&] { (void)ad::attention_forward(q, any({2, 3, 7, 6}), v, none, none, opt); }, "attention",
                    {"same head dimension", "q (2,3,5,8)", "k (2,3,7,6)"});
    }
    SUBCASE("keys and values differ in number") {
        check_error([&] { (void)ad::attention_forward(q, k, any({2, 3, 6, 4}), none, none, opt); }, "attention",
                    {"same number of keys", "k (2,3,7,8)", "v (2,3,6,4)"});
    }
    SUBCASE("a bias that does not broadcast to the scores") {
        check_error([&] { (void)ad::attention_forward(q, k, v, any({5, 6}), none, opt); }, "attention",
                    {"bias (5,6)", "scores (2,3,5,7)"});
    }
    SUBCASE("a key-padding mask of the wrong shape") {
        ad::AttentionOptions bad = opt;
        bad.mask = ad::key_padding_mask(ad::full<bool>({2, 5}, true));
        check_error([&] { (void)ad::attention_forward(q, k, v, none, none, bad); }, "attention", {"key-padding", "(2,7)", "(2,5)"});
    }
    SUBCASE("a dropout rate of 1 and a non-finite scale") {
        ad::AttentionOptions bad = opt;
        bad.dropout.rate = 1.0;
        check_error([&] { (void)ad::attention_forward(q, k, v, none, none, bad); }, "attention", {"rate must be in [0, 1)"});
        ad::AttentionOptions nan_scale = opt;
        nan_scale.scale = not_a_number;
        check_error([&] { (void)ad::attention_forward(q, k, v, none, none, nan_scale); }, "attention", {"must be finite"});
    }
    SUBCASE("backward: dO of the wrong shape, and a bias gradient without a bias") {
        auto saved = ad::attention_forward(q, k, v, none, none, opt);
        Tensor dQ, dbias;
        check_error([&] { ad::attention_backward<double>(&dQ, nullptr, nullptr, nullptr, any({2, 3, 5, 8}), q, k, v, none, none, saved, opt); },
                    "attention_backward", {"dO (2,3,5,8)", "(2,3,5,4)"});
        check_error([&] { ad::attention_backward<double>(nullptr, nullptr, nullptr, &dbias, any({2, 3, 5, 4}), q, k, v, none, none, saved, opt); },
                    "attention_backward", {"no bias"});
    }
}

TEST_CASE("a builder that throws inside a bigger expression records nothing and touches no gradient") {
    ad::Param<double> x(ad::randn<double>({3, 5}, 1)), w(ad::randn<double>({5, 4}, 2));
    ad::Var<double> pending = ad::exp(x);  // a record already on the tape
    ad::Var<double> loss = ad::sum(ad::matmul(x, w));
    loss.backward(true);
    const Tensor gx = x.grad().clone(), gw = w.grad().clone();
    check_error([&] { ad::Var<double> y = ad::sum(ad::tanh(ad::matmul(x, w)) * 2.0 + ad::matmul(w, w)); }, "matmul",
                {"lhs (5,4)", "rhs (5,4)"});
    CHECK(ad::max_abs_diff(x.grad(), gx) == 0.0);
    CHECK(ad::max_abs_diff(w.grad(), gw) == 0.0);
}

// ---- compile-time misuse ------------------------------------------------------------------------

namespace {
template <class A, class B>
concept Addable = requires(const A& a, const B& b) { a + b; };
template <class X>
concept Scalable = requires(const X& x) { x * 2.0; };
template <class X>
concept Negatable = requires(const X& x) { -x; };
}  // namespace

TEST_CASE("compile time: an operator needs at least one operand that is not a bare Tensor") {
    static_assert(!Addable<Tensor, Tensor>, "tensor + tensor must not build an expression");
    static_assert(!Scalable<Tensor>, "tensor * 2.0 must not build an expression");
    static_assert(!Negatable<Tensor>, "-tensor must not build an expression");
    static_assert(Addable<ad::Param<double>, Tensor>);
    static_assert(Addable<Tensor, ad::Const<double>>);
    static_assert(Scalable<ad::Const<double>>);
    // Named functions accept plain tensors, as Consts.
    static_assert(!decltype(ad::transpose(std::declval<const Tensor&>()))::may_require_grad);
}
