// Matrix products on the GPU: validation (the CPU's shape checks, so both report alike), then cuBLAS.
// Maths and API: include/autodiff/cuda/blas.hpp.
#include "autodiff/cuda/blas.hpp"

#include <cublas_v2.h>

#include <climits>
#include <cmath>
#include <map>
#include <mutex>
#include <type_traits>

#include "cuda_check.hpp"
#include "dtype.hpp"
#include "ops_kernels.hpp"

namespace autodiff {

namespace {

template <class T>
constexpr cudaDataType_t cublas_type() {
    if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
    else if constexpr (std::is_same_v<T, double>) return CUDA_R_64F;
    else if constexpr (std::is_same_v<T, bf16>) return CUDA_R_16BF;
    else return CUDA_R_16F;
}

void cublas_check(cublasStatus_t status, std::string_view op, const char* what) {
    if (status != CUBLAS_STATUS_SUCCESS) fail(op, "{} failed on the cuda device: {}", what, cublasGetStatusString(status));
}

// One cuBLAS handle per device, created on first use and kept (as the device allocator's cache), on
// the default stream. CUBLAS_DEFAULT_MATH: fp32 products stay fp32 (no TF32).
cublasHandle_t handle(std::string_view op) {
    static std::mutex mutex;
    static auto* handles = new std::map<int, cublasHandle_t>;  // never destroyed: see device_pool's state
    int device = 0;
    detail::cuda_check(cudaGetDevice(&device), op, "cudaGetDevice");
    std::lock_guard lock(mutex);
    auto it = handles->find(device);
    if (it != handles->end()) return it->second;
    cublasHandle_t h = nullptr;
    cublas_check(cublasCreate(&h), op, "cublasCreate");
    cublas_check(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH), op, "cublasSetMathMode");
    handles->emplace(device, h);
    return h;
}

// (rows, cols) of op(X) for X's last two dimensions.
std::pair<std::int64_t, std::int64_t> op_dims(const Shape& s, bool trans) {
    const std::int64_t r = s.dim_from_end(2), c = s.dim_from_end(1);
    return trans ? std::pair{c, r} : std::pair{r, c};
}

// A row-major operand of a product: its data, its stored column count (leading dimension), whether
// the product reads it transposed, and its batch stride in elements (0: broadcast).
struct Operand {
    const void* data;
    std::int64_t ld;
    bool trans;
    std::int64_t stride;
};

// Row-major C (m × n, batch strides c_stride) = alpha·op(X)·op(Y) + beta·C for `batch` products, as
// the column-major product Cᵀ = op(Y)ᵀ·op(X)ᵀ that cuBLAS computes.
template <class T>
void gemm_rows(std::string_view op, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const Operand& X, const Operand& Y,
               float beta, void* C, std::int64_t c_stride, std::int64_t batch) {
    for (std::int64_t v : {m, n, k, X.ld, Y.ld, batch})
        if (v > INT_MAX) fail(op, "a dimension of {} exceeds cuBLAS's limit of {}", v, INT_MAX);
    // double: fp64 operands, products and accumulation (CUBLAS_COMPUTE_64F, whose alpha and beta are
    // doubles); the others: fp32 accumulation (CUBLAS_COMPUTE_32F, float alpha and beta).
    constexpr bool fp64 = std::is_same_v<T, double>;
    using Scalar = std::conditional_t<fp64, double, float>;
    const Scalar a = alpha, b = beta;
    cublas_check(cublasGemmStridedBatchedEx(handle(op), Y.trans ? CUBLAS_OP_T : CUBLAS_OP_N, X.trans ? CUBLAS_OP_T : CUBLAS_OP_N,
                                            static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &a, Y.data,
                                            cublas_type<T>(), static_cast<int>(Y.ld), Y.stride, X.data, cublas_type<T>(),
                                            static_cast<int>(X.ld), X.stride, &b, C, cublas_type<T>(), static_cast<int>(n),
                                            c_stride, static_cast<int>(batch), fp64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F,
                                            CUBLAS_GEMM_DEFAULT),
                 op, "cublasGemmStridedBatchedEx");
}

template <class T>
void same_device(std::string_view op, const DeviceTensor<T>& A, const char* name, const DeviceTensor<T>& X) {
    if (X.defined() && X.device() != A.device())
        fail(op, "{} {} is on cuda device {} but A {} is on cuda device {}", name, X.shape(), X.device(), A.shape(), A.device());
}

}  // namespace

template <class T>
void strided_batched_gemm(float alpha, const DeviceTensor<T>& A, const DeviceTensor<T>& B, float beta, DeviceTensor<T>& C, GemmFlags f) {
    constexpr std::string_view op = "strided_batched_gemm (cuda)";
    if (!A.defined() || !B.defined() || !C.defined()) fail(op, "A, B and C must be allocated device tensors");
    const Shape product = gemm_output_shape(op, A.shape(), f.trans_a, B.shape(), f.trans_b);
    const std::int64_t m = product.dim_from_end(2), n = product.dim_from_end(1);
    Shape expected = product;
    if (f.trans_c) std::swap(expected[expected.rank() - 2], expected[expected.rank() - 1]);
    const bool a_batched = A.rank() > 2, b_batched = B.rank() > 2;
    const bool reduce = (a_batched || b_batched) && C.rank() == 2;  // C (M, N) receives the sum over the batch
    const Shape expected_c = reduce ? Shape{expected.dim_from_end(2), expected.dim_from_end(1)} : expected;
    if (C.shape() != expected_c)
        fail(op, "C has shape {} but op(A)·op(B) of A {} and B {} needs {}", C.shape(), A.shape(), B.shape(), expected_c);
    if (!(std::isfinite(alpha) && std::isfinite(beta))) fail(op, "alpha ({}) and beta ({}) must be finite", alpha, beta);
    same_device(op, A, "B", B);
    same_device(op, A, "C", C);

    const std::int64_t k = f.trans_a ? A.shape().dim_from_end(2) : A.shape().dim_from_end(1);
    const std::int64_t batch = product.batch_count();
    if (m * n == 0) return;
    if (k == 0 || batch == 0) {  // an empty sum: C = beta·C, C not read when beta == 0
        if (beta == 0.f) C.zero();
        else detail::cuda_check(detail::launch_unary(detail::dtype_of<T>(), DeviceUnaryOp::scale, beta, C.data(), C.data(), C.numel()), op, "the scale kernel");
        return;
    }
    const auto [ra, ca] = std::pair{A.shape().dim_from_end(2), A.shape().dim_from_end(1)};
    const auto [rb, cb] = std::pair{B.shape().dim_from_end(2), B.shape().dim_from_end(1)};
    const Operand a{A.data(), ca, f.trans_a, a_batched ? ra * ca : 0};
    const Operand b{B.data(), cb, f.trans_b, b_batched ? rb * cb : 0};
    // C = P, or Pᵀ = op_b(B)ᵀ·op_a(A)ᵀ: the same product with the operands swapped and flipped.
    const Operand x = f.trans_c ? Operand{b.data, b.ld, !b.trans, b.stride} : a;
    const Operand y = f.trans_c ? Operand{a.data, a.ld, !a.trans, a.stride} : b;
    const std::int64_t rows = f.trans_c ? n : m, cols = f.trans_c ? m : n;
    if (!reduce) {
        gemm_rows<T>(op, rows, cols, k, alpha, x, y, beta, C.data(), rows * cols, batch);
        return;
    }
    // Sum over the batch, one product per index added in order: a fixed summation order.
    for (std::int64_t i = 0; i < batch; ++i) {
        const Operand xi{static_cast<const char*>(x.data) + i * x.stride * static_cast<std::int64_t>(sizeof(T)), x.ld, x.trans, 0};
        const Operand yi{static_cast<const char*>(y.data) + i * y.stride * static_cast<std::int64_t>(sizeof(T)), y.ld, y.trans, 0};
        gemm_rows<T>(op, rows, cols, k, alpha, xi, yi, i == 0 ? beta : 1.f, C.data(), 0, 1);
    }
}

template <class T>
void strided_batched_gemm_backward(NoDeduce<DeviceTensor<T>>* dA, NoDeduce<DeviceTensor<T>>* dB, const DeviceTensor<T>& dC, float alpha,
                                   const DeviceTensor<T>& A, const DeviceTensor<T>& B, float beta, GemmFlags f) {
    constexpr std::string_view op = "strided_batched_gemm_backward (cuda)";
    if (!A.defined() || !B.defined() || !dC.defined()) fail(op, "A, B and dC must be allocated device tensors");
    Shape c = gemm_output_shape(op, A.shape(), f.trans_a, B.shape(), f.trans_b);
    if (f.trans_c) std::swap(c[c.rank() - 1], c[c.rank() - 2]);
    if (dC.shape() != c) fail(op, "dC has shape {} but C of A {} and B {} has shape {}", dC.shape(), A.shape(), B.shape(), c);
    if (dA && dA->shape() != A.shape()) fail(op, "dA must have A's shape {}, got {}", A.shape(), dA->shape());
    if (dB && dB->shape() != B.shape()) fail(op, "dB must have B's shape {}, got {}", B.shape(), dB->shape());
    // P = op_a(A)·op_b(B) and dP = dC, or dCᵀ with trans_c: each gradient is one product of dC, read
    // transposed or written transposed where dP = dCᵀ (no transposed copy of dC).
    const bool tc = f.trans_c;
    if (dA) {
        if (!f.trans_a)  // dA = dP·op_b(B)ᵀ   (trans_c: (op_b(B)·dC)ᵀ)
            tc ? strided_batched_gemm<T>(alpha, B, dC, beta, *dA, {f.trans_b, false, true})
               : strided_batched_gemm<T>(alpha, dC, B, beta, *dA, {false, !f.trans_b, false});
        else  // dA = op_b(B)·dPᵀ   (trans_c: op_b(B)·dC)
            strided_batched_gemm<T>(alpha, B, dC, beta, *dA, {f.trans_b, !tc, false});
    }
    if (dB) {
        if (!f.trans_b)  // dB = op_a(A)ᵀ·dP   (trans_c: (dC·op_a(A))ᵀ)
            tc ? strided_batched_gemm<T>(alpha, dC, A, beta, *dB, {false, f.trans_a, true})
               : strided_batched_gemm<T>(alpha, A, dC, beta, *dB, {!f.trans_a, false, false});
        else  // dB = dPᵀ·op_a(A)   (trans_c: dC·op_a(A))
            strided_batched_gemm<T>(alpha, dC, A, beta, *dB, {!tc, f.trans_a, false});
    }
}

template <class T>
DeviceTensor<T> matmul_forward(const DeviceTensor<T>& A, bool trans_a, const DeviceTensor<T>& B, bool trans_b) {
    DeviceTensor<T> C(gemm_output_shape("matmul (cuda)", A.shape(), trans_a, B.shape(), trans_b));
    strided_batched_gemm<T>(1.f, A, B, 0.f, C, {trans_a, trans_b, false});
    return C;
}

template <class T>
void matmul_backward(NoDeduce<DeviceTensor<T>>* dA, NoDeduce<DeviceTensor<T>>* dB, const DeviceTensor<T>& dC, const DeviceTensor<T>& A,
                     bool trans_a, const DeviceTensor<T>& B, bool trans_b) {
    if (dA) *dA = DeviceTensor<T>(A.shape());
    if (dB) *dB = DeviceTensor<T>(B.shape());
    strided_batched_gemm_backward<T>(dA, dB, dC, 1.f, A, B, 0.f, {trans_a, trans_b, false});
}

namespace {

// x (..., n) viewed as the matrix (rows, n); the product of every dimension but the last.
template <class T>
DeviceTensor<T> as_rows(const DeviceTensor<T>& x) {
    std::int64_t rows = 1;
    for (int i = 0; i + 1 < x.rank(); ++i) rows *= x.shape()[i];
    return x.reshape(Shape{rows, x.shape().dim_from_end(1)});
}

}  // namespace

template <class T>
DeviceTensor<T> linear_forward(const DeviceTensor<T>& x, const DeviceTensor<T>& W, const DeviceTensor<T>& b) {
    constexpr std::string_view op = "linear (cuda)";
    if (!x.defined() || !W.defined()) fail(op, "x and W must be defined device tensors");
    DeviceTensor<T> y(linear_output_shape(op, x.shape(), W.shape(), b.defined() ? &b.shape() : nullptr));
    DeviceTensor<T> y2 = as_rows(y);
    if (b.defined())
        detail::cuda_check(detail::launch_broadcast_rows(detail::dtype_of<T>(), b.data(), y2.data(), y2.shape()[0], y2.shape()[1]), op,
                           "the bias kernel");
    strided_batched_gemm<T>(1.f, as_rows(x), W, b.defined() ? 1.f : 0.f, y2, {false, true, false});
    return y;
}

template <class T>
void linear_backward(NoDeduce<DeviceTensor<T>>* dx, NoDeduce<DeviceTensor<T>>* dW, NoDeduce<DeviceTensor<T>>* db, const DeviceTensor<T>& dy,
                     const DeviceTensor<T>& x, const DeviceTensor<T>& W) {
    constexpr std::string_view op = "linear_backward (cuda)";
    if (!x.defined() || !W.defined() || !dy.defined()) fail(op, "x, W and dy must be defined device tensors");
    const Shape y = linear_output_shape(op, x.shape(), W.shape(), nullptr);
    if (dy.shape() != y) fail(op, "dy must have the output's shape {}, got {}", y, dy.shape());
    if (dW && dW->shape() != W.shape()) fail(op, "dW must be preallocated with W's shape {}, got {}", W.shape(), dW->shape());
    if (db && db->shape() != Shape{W.shape()[0]}) fail(op, "db must be preallocated with shape ({}), got {}", W.shape()[0], db->shape());
    const DeviceTensor<T> dy2 = as_rows(dy);
    if (dx) {
        *dx = DeviceTensor<T>(x.shape());
        DeviceTensor<T> dx2 = as_rows(*dx);
        strided_batched_gemm<T>(1.f, dy2, W, 0.f, dx2);
    }
    if (dW) strided_batched_gemm<T>(1.f, dy2, as_rows(x), 1.f, *dW, {true, false, false});
    if (db)
        detail::cuda_check(detail::launch_column_sums(detail::dtype_of<T>(), dy2.data(), dy2.shape()[0], dy2.shape()[1], db->data(), true), op,
                           "the column-sum kernel");
}

#define AUTODIFF_INSTANTIATE(T)                                                                                                        \
    template void strided_batched_gemm<T>(float, const DeviceTensor<T>&, const DeviceTensor<T>&, float, DeviceTensor<T>&, GemmFlags);  \
    template void strided_batched_gemm_backward<T>(DeviceTensor<T>*, DeviceTensor<T>*, const DeviceTensor<T>&, float,                  \
                                                   const DeviceTensor<T>&, const DeviceTensor<T>&, float, GemmFlags);                  \
    template DeviceTensor<T> matmul_forward<T>(const DeviceTensor<T>&, bool, const DeviceTensor<T>&, bool);                            \
    template void matmul_backward<T>(DeviceTensor<T>*, DeviceTensor<T>*, const DeviceTensor<T>&, const DeviceTensor<T>&, bool,         \
                                     const DeviceTensor<T>&, bool);                                                                    \
    template DeviceTensor<T> linear_forward<T>(const DeviceTensor<T>&, const DeviceTensor<T>&, const DeviceTensor<T>&);                \
    template void linear_backward<T>(DeviceTensor<T>*, DeviceTensor<T>*, DeviceTensor<T>*, const DeviceTensor<T>&, const DeviceTensor<T>&, \
                                     const DeviceTensor<T>&);
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(bf16)
AUTODIFF_INSTANTIATE(fp16)
AUTODIFF_INSTANTIATE(double)
#undef AUTODIFF_INSTANTIATE

}  // namespace autodiff
