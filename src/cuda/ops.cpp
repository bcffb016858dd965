// The device functional layer's elementwise ops, reductions, softmax and dropout: validation (the
// CPU's checks and messages where the CPU has them), outputs, then the launchers of ops_kernels.cu.
// Maths and API: include/autodiff/cuda/ops.hpp.
#include "autodiff/cuda/ops.hpp"

#include <type_traits>

#include "cuda_check.hpp"
#include "dtype.hpp"
#include "ops_kernels.hpp"

namespace autodiff {

namespace {

const char* unary_name(DeviceUnaryOp op) {
    switch (op) {
        case DeviceUnaryOp::neg: return "neg";
        case DeviceUnaryOp::scale: return "scale";
        case DeviceUnaryOp::exp: return "exp";
        case DeviceUnaryOp::log: return "log";
        case DeviceUnaryOp::tanh: return "tanh";
        case DeviceUnaryOp::sigmoid: return "sigmoid";
        case DeviceUnaryOp::relu: return "relu";
        case DeviceUnaryOp::square: return "square";
        case DeviceUnaryOp::sqrt: return "sqrt";
        case DeviceUnaryOp::gelu: return "gelu";
        case DeviceUnaryOp::gelu_tanh: return "gelu_tanh";
    }
    return nullptr;
}

const char* binary_name(DeviceBinaryOp op) {
    switch (op) {
        case DeviceBinaryOp::add: return "add";
        case DeviceBinaryOp::sub: return "sub";
        case DeviceBinaryOp::mul: return "mul";
        case DeviceBinaryOp::div: return "div";
    }
    return nullptr;
}

// "<name>[_backward] (cuda)", or a failure for an enumerator cast from an integer that names no op.
template <class Op>
std::string op_name(Op op, const char* name, bool backward) {
    if (!name) fail("elementwise (cuda)", "op {} is not a Device{}Op enumerator", static_cast<int>(op),
                    std::is_same_v<Op, DeviceUnaryOp> ? "Unary" : "Binary");
    return fmt::format("{}{} (cuda)", name, backward ? "_backward" : "");
}

template <class T>
void expect_defined(std::string_view op, const char* name, const DeviceTensor<T>& x) {
    if (!x.defined()) fail(op, "{} must be a defined device tensor", name);
}

// b must have a's shape and live on a's device.
template <class T, class U>
void expect_like(std::string_view op, const char* a_name, const DeviceTensor<T>& a, const char* b_name, const DeviceTensor<U>& b) {
    expect_defined(op, b_name, b);
    if (b.shape() != a.shape()) fail(op, "{} has shape {} but {} has shape {}: they must be equal", b_name, b.shape(), a_name, a.shape());
    if (b.device() != a.device())
        fail(op, "{} {} is on cuda device {} but {} {} is on cuda device {}", b_name, b.shape(), b.device(), a_name, a.shape(), a.device());
}

}  // namespace

// ---- elementwise ------------------------------------------------------------------------------

template <class T>
DeviceTensor<T> unary_forward(DeviceUnaryOp op, const DeviceTensor<T>& x, float alpha) {
    const std::string name = op_name(op, unary_name(op), false);
    expect_defined(name, "x", x);
    DeviceTensor<T> y(x.shape());
    detail::cuda_check(detail::launch_unary(detail::dtype_of<T>(), op, alpha, x.data(), y.data(), x.numel()), name, "the elementwise kernel");
    return y;
}

template <class T>
DeviceTensor<T> unary_backward(DeviceUnaryOp op, const DeviceTensor<T>& dy, const DeviceTensor<T>& x, float alpha) {
    const std::string name = op_name(op, unary_name(op), true);
    expect_defined(name, "x", x);
    expect_like(name, "x", x, "dy", dy);
    DeviceTensor<T> dx(x.shape());
    detail::cuda_check(detail::launch_unary_backward(detail::dtype_of<T>(), op, alpha, x.data(), dy.data(), dx.data(), x.numel()), name,
                       "the elementwise gradient kernel");
    return dx;
}

template <class T>
DeviceTensor<T> binary_forward(DeviceBinaryOp op, const DeviceTensor<T>& a, const DeviceTensor<T>& b) {
    const std::string name = op_name(op, binary_name(op), false);
    expect_defined(name, "a", a);
    expect_like(name, "a", a, "b", b);
    DeviceTensor<T> out(a.shape());
    detail::cuda_check(detail::launch_binary(detail::dtype_of<T>(), op, a.data(), b.data(), out.data(), a.numel()), name, "the elementwise kernel");
    return out;
}

template <class T>
void binary_backward(DeviceBinaryOp op, NoDeduce<DeviceTensor<T>>* da, NoDeduce<DeviceTensor<T>>* db, const DeviceTensor<T>& dy,
                     const DeviceTensor<T>& a, const DeviceTensor<T>& b) {
    const std::string name = op_name(op, binary_name(op), true);
    expect_defined(name, "a", a);
    expect_like(name, "a", a, "b", b);
    expect_like(name, "a", a, "dy", dy);
    if (da) *da = DeviceTensor<T>(a.shape());
    if (db) *db = DeviceTensor<T>(b.shape());
    detail::cuda_check(detail::launch_binary_backward(detail::dtype_of<T>(), op, a.data(), b.data(), dy.data(), da ? da->data() : nullptr,
                                                      db ? db->data() : nullptr, a.numel()),
                       name, "the elementwise gradient kernel");
}

// ---- reductions -------------------------------------------------------------------------------

template <class T>
device_accum_t<T> sum_forward(const DeviceTensor<T>& x) {
    using A = device_accum_t<T>;
    constexpr std::string_view op = "sum (cuda)";
    expect_defined(op, "x", x);
    DeviceTensor<A> scratch(Shape{detail::sum_partials + 1});
    detail::cuda_check(detail::launch_sum(detail::dtype_of<T>(), x.data(), x.numel(), scratch.data(), scratch.data() + detail::sum_partials), op,
                       "the sum kernels");
    A s = 0;
    detail::cuda_check(cudaMemcpy(&s, scratch.data() + detail::sum_partials, sizeof(A), cudaMemcpyDeviceToHost), op, "cudaMemcpy");
    return s;
}

template <class T>
DeviceTensor<T> sum_rows_forward(const DeviceTensor<T>& x) {
    constexpr std::string_view op = "sum_rows (cuda)";
    expect_defined(op, "x", x);
    if (x.rank() < 1) fail(op, "x must have rank >= 1 (..., n), got {}", x.shape());
    const std::int64_t n = x.shape().dim_from_end(1);
    std::int64_t rows = 1;
    for (int i = 0; i + 1 < x.rank(); ++i) rows *= x.shape()[i];
    DeviceTensor<T> s(Shape{n});
    detail::cuda_check(detail::launch_column_sums(detail::dtype_of<T>(), x.data(), rows, n, s.data(), false), op, "the column-sum kernel");
    return s;
}

template <class T>
device_accum_t<T> mse_loss_forward(const DeviceTensor<T>& a, const DeviceTensor<T>& b) {
    constexpr std::string_view op = "mse_loss (cuda)";
    expect_defined(op, "a", a);
    expect_like(op, "a", a, "b", b);
    if (a.numel() == 0) fail(op, "inputs are empty {}", a.shape());
    DeviceTensor<T> squares(a.shape());  // (a − b)², rounded to T as the CPU rounds to its T
    detail::cuda_check(detail::launch_difference(detail::dtype_of<T>(), true, 0.f, a.data(), b.data(), squares.data(), a.numel()), op,
                       "the elementwise kernel");
    return sum_forward(squares) / static_cast<device_accum_t<T>>(a.numel());
}

template <class T>
void mse_loss_backward(NoDeduce<DeviceTensor<T>>* da, NoDeduce<DeviceTensor<T>>* db, device_accum_t<T> dloss, const DeviceTensor<T>& a,
                       const DeviceTensor<T>& b) {
    constexpr std::string_view op = "mse_loss_backward (cuda)";
    expect_defined(op, "a", a);
    expect_like(op, "a", a, "b", b);
    using A = device_accum_t<T>;
    const A k = dloss * A(2) / static_cast<A>(a.numel());  // in float for float, bf16, fp16 (as before), in double for double
    DeviceTensor<T> g(a.shape());
    detail::cuda_check(detail::launch_difference(detail::dtype_of<T>(), false, k, a.data(), b.data(), g.data(), a.numel()), op,
                       "the elementwise kernel");
    if (db) *db = unary_forward(DeviceUnaryOp::neg, g);
    if (da) *da = std::move(g);
}

// ---- layout -----------------------------------------------------------------------------------

namespace {

// Row-major strides of s.
std::array<std::int64_t, max_rank> strides_of(const Shape& s) {
    std::array<std::int64_t, max_rank> st{};
    std::int64_t stride = 1;
    for (int k = s.rank() - 1; k >= 0; --k) {
        st[static_cast<std::size_t>(k)] = stride;
        stride *= s[k];
    }
    return st;
}

// The dense side's shape (rank r) and the strided side's strides per dense dimension, left-padded to rank 4.
void pad4(int rank, const Shape& dense, const std::array<std::int64_t, max_rank>& strides, std::int64_t shape4[4], std::int64_t strides4[4]) {
    for (int k = 0; k < 4; ++k) {
        const int d = k - (4 - rank);
        shape4[k] = d < 0 ? 1 : dense[d];
        strides4[k] = d < 0 ? 0 : strides[static_cast<std::size_t>(d)];
    }
}

}  // namespace

template <class T>
DeviceTensor<T> permute_forward(const DeviceTensor<T>& x, const Permutation& perm) {
    constexpr std::string_view op = "permute (cuda)";
    expect_defined(op, "x", x);
    DeviceTensor<T> y(permute_output_shape(op, x.shape(), perm));
    const auto xs = strides_of(x.shape());
    std::array<std::int64_t, max_rank> read{};  // y's dimension k walks x's dimension perm[k]
    for (int k = 0; k < x.rank(); ++k) read[static_cast<std::size_t>(k)] = xs[static_cast<std::size_t>(perm[static_cast<std::size_t>(k)])];
    std::int64_t shape4[4], strides4[4];
    pad4(x.rank(), y.shape(), read, shape4, strides4);
    detail::cuda_check(detail::launch_strided_copy(detail::dtype_of<T>(), x.data(), y.data(), shape4, strides4, 0, false), op, "the copy kernel");
    return y;
}

template <class T>
DeviceTensor<T> narrow_forward(const DeviceTensor<T>& x, int dim, std::int64_t start, std::int64_t length) {
    constexpr std::string_view op = "narrow (cuda)";
    expect_defined(op, "x", x);
    DeviceTensor<T> y(narrow_output_shape(op, x.shape(), dim, start, length));
    const auto xs = strides_of(x.shape());
    std::int64_t shape4[4], strides4[4];
    pad4(x.rank(), y.shape(), xs, shape4, strides4);
    detail::cuda_check(detail::launch_strided_copy(detail::dtype_of<T>(), x.data(), y.data(), shape4, strides4, start * xs[static_cast<std::size_t>(dim)], false),
                       op, "the copy kernel");
    return y;
}

template <class T>
DeviceTensor<T> narrow_backward(const DeviceTensor<T>& dy, const Shape& x_shape, int dim, std::int64_t start) {
    constexpr std::string_view op = "narrow_backward (cuda)";
    expect_defined(op, "dy", dy);
    if (dy.shape() != narrow_output_shape(op, x_shape, dim, start, dy.rank() > dim && dim >= 0 ? dy.shape()[dim] : 0))
        fail(op, "dy {} does not match a slice of {} along dimension {}", dy.shape(), x_shape, dim);
    DeviceTensor<T> dx(x_shape);
    dx.zero();
    const auto xs = strides_of(x_shape);
    std::int64_t shape4[4], strides4[4];
    pad4(x_shape.rank(), dy.shape(), xs, shape4, strides4);
    detail::cuda_check(detail::launch_strided_copy(detail::dtype_of<T>(), dy.data(), dx.data(), shape4, strides4, start * xs[static_cast<std::size_t>(dim)], true),
                       op, "the copy kernel");
    return dx;
}

// ---- softmax ----------------------------------------------------------------------------------

template <class T>
DeviceTensor<T> softmax_forward(const DeviceTensor<T>& x, const DeviceMask& mask, const DeviceTensor<T>& additive) {
    constexpr std::string_view op = "softmax (cuda)";
    expect_defined(op, "x", x);
    // The CPU's check reads only the masks' shapes: host tensors of those shapes stand in for them.
    Mask shapes;
    shapes.causal = mask.causal;
    if (mask.keep.defined()) shapes.keep = Tensor<bool>(mask.keep.shape());
    if (mask.key_padding.defined()) shapes.key_padding = Tensor<bool>(mask.key_padding.shape());
    check_softmax_mask<float>(op, x.shape(), shapes, additive.defined() ? Tensor<float>(additive.shape()) : Tensor<float>());
    auto same_device = [&](const char* name, const Shape& s, int device) {
        if (device >= 0 && device != x.device())
            fail(op, "{} {} is on cuda device {} but x {} is on cuda device {}", name, s, device, x.shape(), x.device());
    };
    same_device("keep", mask.keep.shape(), mask.keep.device());
    same_device("key_padding", mask.key_padding.shape(), mask.key_padding.device());
    same_device("additive", additive.shape(), additive.device());

    DeviceTensor<T> y(x.shape());
    const auto padded = x.shape().padded();
    detail::SoftmaxProblem p;
    p.heads = padded[1];
    p.Lq = padded[2];
    p.Lk = padded[3];
    p.rows = padded[0] * padded[1] * padded[2];
    p.causal = mask.causal;
    if (mask.keep.defined()) {
        p.keep = mask.keep.data();
        const auto s = mask.keep.shape().broadcast_strides();
        for (std::size_t k = 0; k < 4; ++k) p.keep_s[k] = s[k];
    }
    if (mask.key_padding.defined()) {
        p.key_padding = mask.key_padding.data();
        p.kp_div = x.rank() == 4 ? p.heads : 1;  // the batch is the logits' first dimension
    }
    if (additive.defined()) {
        p.additive = additive.data();
        const auto s = additive.shape().broadcast_strides();
        for (std::size_t k = 0; k < 4; ++k) p.additive_s[k] = s[k];
    }
    detail::cuda_check(detail::launch_softmax_forward(detail::dtype_of<T>(), p, x.data(), y.data()), op, "the softmax kernel");
    return y;
}

template <class T>
DeviceTensor<T> softmax_backward(const DeviceTensor<T>& dy, const DeviceTensor<T>& y) {
    constexpr std::string_view op = "softmax_backward (cuda)";
    expect_defined(op, "y", y);
    expect_like(op, "y", y, "dy", dy);
    if (y.rank() < 1) fail(op, "y must have rank >= 1, got {}", y.shape());
    DeviceTensor<T> dx(y.shape());
    const std::int64_t Lk = y.shape().dim_from_end(1);
    detail::cuda_check(detail::launch_softmax_backward(detail::dtype_of<T>(), Lk ? y.numel() / Lk : 0, Lk, dy.data(), y.data(), dx.data()), op,
                       "the softmax gradient kernel");
    return dx;
}

// ---- dropout ----------------------------------------------------------------------------------

namespace {

// out = in·keep/(1 − rate), the CPU's decisions (dropout_keeps); the identity (in itself) when off.
template <class T>
DeviceTensor<T> apply_dropout_mask(std::string_view op, const DropoutDescriptor& d, const DeviceTensor<T>& in) {
    check_dropout(op, d);
    expect_defined(op, "the input", in);
    if (!d.training || d.rate == 0.0) return in;
    DeviceTensor<T> out(in.shape());
    const std::uint64_t threshold = dropout_threshold(d.rate);
    const bool drop_all = threshold > 0xFFFFFFFFu;  // a rate within 2^-33 of 1 drops everything
    detail::cuda_check(detail::launch_dropout(detail::dtype_of<T>(), d.seed, d.offset, drop_all ? 0u : static_cast<std::uint32_t>(threshold), drop_all,
                                              static_cast<device_accum_t<T>>(1.0 / (1.0 - d.rate)), in.data(), out.data(), in.numel()),
                       op, "the dropout kernel");
    return out;
}

}  // namespace

template <class T>
DeviceTensor<T> dropout_forward(const DropoutDescriptor& d, const DeviceTensor<T>& x) {
    return apply_dropout_mask("dropout (cuda)", d, x);
}

template <class T>
DeviceTensor<T> dropout_backward(const DropoutDescriptor& d, const DeviceTensor<T>& dy) {
    return apply_dropout_mask("dropout_backward (cuda)", d, dy);
}

#define AUTODIFF_INSTANTIATE(T)                                                                                                           \
    template DeviceTensor<T> unary_forward<T>(DeviceUnaryOp, const DeviceTensor<T>&, float);                                              \
    template DeviceTensor<T> unary_backward<T>(DeviceUnaryOp, const DeviceTensor<T>&, const DeviceTensor<T>&, float);                     \
    template DeviceTensor<T> binary_forward<T>(DeviceBinaryOp, const DeviceTensor<T>&, const DeviceTensor<T>&);                           \
    template void binary_backward<T>(DeviceBinaryOp, DeviceTensor<T>*, DeviceTensor<T>*, const DeviceTensor<T>&, const DeviceTensor<T>&, \
                                     const DeviceTensor<T>&);                                                                             \
    template device_accum_t<T> sum_forward<T>(const DeviceTensor<T>&);                                                                    \
    template DeviceTensor<T> sum_rows_forward<T>(const DeviceTensor<T>&);                                                                 \
    template device_accum_t<T> mse_loss_forward<T>(const DeviceTensor<T>&, const DeviceTensor<T>&);                                       \
    template void mse_loss_backward<T>(DeviceTensor<T>*, DeviceTensor<T>*, device_accum_t<T>, const DeviceTensor<T>&, const DeviceTensor<T>&); \
    template DeviceTensor<T> permute_forward<T>(const DeviceTensor<T>&, const Permutation&);                                              \
    template DeviceTensor<T> narrow_forward<T>(const DeviceTensor<T>&, int, std::int64_t, std::int64_t);                                  \
    template DeviceTensor<T> narrow_backward<T>(const DeviceTensor<T>&, const Shape&, int, std::int64_t);                                 \
    template DeviceTensor<T> softmax_forward<T>(const DeviceTensor<T>&, const DeviceMask&, const DeviceTensor<T>&);                       \
    template DeviceTensor<T> softmax_backward<T>(const DeviceTensor<T>&, const DeviceTensor<T>&);                                         \
    template DeviceTensor<T> dropout_forward<T>(const DropoutDescriptor&, const DeviceTensor<T>&);                                        \
    template DeviceTensor<T> dropout_backward<T>(const DropoutDescriptor&, const DeviceTensor<T>&);
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(bf16)
AUTODIFF_INSTANTIATE(fp16)
AUTODIFF_INSTANTIATE(double)
#undef AUTODIFF_INSTANTIATE

}  // namespace autodiff
