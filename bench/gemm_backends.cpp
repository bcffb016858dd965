// Which GEMM should the dense layers run on? Side by side in one process, on the products of the MHA
// training step and of a transformer MLP (issue 11): Eigen's product (what strided_batched_gemm runs
// until issue 11), the project's packed GEMM on its tile micro-kernel (strided_batched_gemm now), and every CBLAS
// library found among Debian's packages (OpenBLAS and BLIS, each as its serial, OpenMP and pthread
// build), loaded with dlopen so that one binary compares them all.
//
// A threaded library runs with its own threads set to the thread count; a serial library is
// parallelised by this project's parallel_for over blocks of rows of C (each block one call: no second
// thread pool).
//
//   ./build/bench/bench_gemm_backends [threads=1,2] [reps=7] [rounds=2]
// prints one line per (shape, dtype, threads, backend): median and min milliseconds and GFLOP/s.
// bench/gemm_backends.sh runs it next to the machine's measured peak (../shared/BENCHMARKING.md).
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include <fmt/core.h>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

namespace {

// CBLAS's enums, as integers (cblas.h's values), so no header of one library is needed.
constexpr int row_major = 101, no_trans = 111, trans = 112;
using sgemm_t = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
using dgemm_t = void (*)(int, int, int, int, int, int, double, const double*, int, const double*, int, double, double*, int);
using set_threads_t = void (*)(int);

struct Library {
    std::string name;
    sgemm_t sgemm = nullptr;
    dgemm_t dgemm = nullptr;
    set_threads_t set_threads = nullptr;  // null: serial (parallelised here)
};

std::vector<Library> load_libraries() {
    const std::string dir = "/usr/lib/x86_64-linux-gnu/";
    struct Candidate {
        const char *name, *path, *threads_symbol;
    };
    const Candidate candidates[] = {
        {"openblas-serial", "openblas-serial/libopenblas.so.0", nullptr},
        {"openblas-openmp", "openblas-openmp/libopenblas.so.0", "openblas_set_num_threads"},
        {"openblas-pthread", "openblas-pthread/libopenblas.so.0", "openblas_set_num_threads"},
        {"blis-serial", "blis-serial/libblis.so.4", nullptr},
        {"blis-openmp", "blis-openmp/libblis.so.4", "bli_thread_set_num_threads"},
        {"blis-pthread", "blis-pthread/libblis.so.4", "bli_thread_set_num_threads"},
    };
    std::vector<Library> libs;
    for (const Candidate& c : candidates) {
        void* h = dlopen((dir + c.path).c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            fmt::print("# {}: not installed ({})\n", c.name, dir + c.path);
            continue;
        }
        Library lib{c.name, reinterpret_cast<sgemm_t>(dlsym(h, "cblas_sgemm")), reinterpret_cast<dgemm_t>(dlsym(h, "cblas_dgemm")),
                    c.threads_symbol ? reinterpret_cast<set_threads_t>(dlsym(h, c.threads_symbol)) : nullptr};
        if (!lib.sgemm || !lib.dgemm || (c.threads_symbol && !lib.set_threads)) {
            fmt::print("# {}: symbols missing\n", c.name);
            continue;
        }
        libs.push_back(lib);
    }
    return libs;
}

// C (M×N) = op_a(A)·op_b(B), row-major, op_a(A) (M×K), op_b(B) (K×N).
struct Product {
    std::string what;
    std::int64_t M, N, K;
    bool ta, tb;
};

template <class T>
struct Operands {
    ad::Tensor<T> A, B, C;
    explicit Operands(const Product& p)
        : A(ad::randn<T>(p.ta ? ad::Shape{p.K, p.M} : ad::Shape{p.M, p.K}, 1)),
          B(ad::randn<T>(p.tb ? ad::Shape{p.N, p.K} : ad::Shape{p.K, p.N}, 2)), C(ad::zeros<T>({p.M, p.N})) {}
};

template <class T>
void cblas(const Library& lib, const Product& p, Operands<T>& o, std::int64_t r0, std::int64_t r1) {
    const int lda = static_cast<int>(p.ta ? p.M : p.K), ldb = static_cast<int>(p.tb ? p.K : p.N), ldc = static_cast<int>(p.N);
    const T* a = o.A.data() + (p.ta ? r0 : r0 * p.K);
    const int m = static_cast<int>(r1 - r0), n = static_cast<int>(p.N), k = static_cast<int>(p.K);
    const int ta = p.ta ? trans : no_trans, tb = p.tb ? trans : no_trans;
    if constexpr (sizeof(T) == 4) lib.sgemm(row_major, ta, tb, m, n, k, 1.f, a, lda, o.B.data(), ldb, 0.f, o.C.data() + r0 * p.N, ldc);
    else lib.dgemm(row_major, ta, tb, m, n, k, 1.0, a, lda, o.B.data(), ldb, 0.0, o.C.data() + r0 * p.N, ldc);
}

// Splits C's rows into one block per thread (multiples of 6, the micro-kernel's rows).
template <class Fn>
void by_rows(std::int64_t M, int threads, Fn&& fn) {
    const std::int64_t per = (M + threads - 1) / threads;
    ad::parallel_for(threads, per * 1000000, [&](std::int64_t t) {
        const std::int64_t r0 = std::min(M, t * per), r1 = std::min(M, r0 + per);
        if (r0 < r1) fn(r0, r1);
    });
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

template <class T>
void run(const std::vector<Library>& libs, const Product& p, int threads, int reps, int rounds) {
    Operands<T> o(p);
    struct Backend {
        std::string name;
        std::function<void()> step;
        std::vector<double> ms;
        double max_diff = 0;
    };
    std::vector<Backend> backends;
    backends.push_back({"autodiff", [&] { ad::strided_batched_gemm<T>(T(1), o.A, o.B, T(0), o.C, {p.ta, p.tb, false}); }, {}});
    backends.push_back({"eigen", [&] {
                            auto A = o.A.matrix();
                            auto B = o.B.matrix();
                            auto C = o.C.matrix();
                            if (p.ta && p.tb) C.noalias() = A.transpose() * B.transpose();
                            else if (p.ta) C.noalias() = A.transpose() * B;
                            else if (p.tb) C.noalias() = A * B.transpose();
                            else C.noalias() = A * B;
                        },
                        {}});
    for (const Library& lib : libs) {
        if (lib.set_threads) backends.push_back({lib.name, [&, lib] { lib.set_threads(threads); cblas(lib, p, o, 0, p.M); }, {}});
        else backends.push_back({lib.name, [&, lib] { by_rows(p.M, threads, [&](std::int64_t a, std::int64_t b) { cblas(lib, p, o, a, b); }); }, {}});
    }
    // Reference: Eigen in double.
    ad::Tensor<double> ref({p.M, p.N});
    {
        auto A = o.A.matrix().template cast<double>().eval();
        auto B = o.B.matrix().template cast<double>().eval();
        if (p.ta && p.tb) ref.matrix() = A.transpose() * B.transpose();
        else if (p.ta) ref.matrix() = A.transpose() * B;
        else if (p.tb) ref.matrix() = A * B.transpose();
        else ref.matrix() = A * B;
    }
    for (int round = 0; round < rounds; ++round)
        for (Backend& b : backends) {
            b.step();  // warm-up (and threads started)
            b.max_diff = std::max(b.max_diff, (o.C.matrix().template cast<double>() - ref.matrix()).cwiseAbs().maxCoeff());
            for (int r = 0; r < reps; ++r) {
                const auto t0 = std::chrono::steady_clock::now();
                b.step();
                b.ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
            }
        }
    const double flop = 2.0 * static_cast<double>(p.M * p.N * p.K);
    for (const Backend& b : backends) {
        const double med = median(b.ms), best = *std::min_element(b.ms.begin(), b.ms.end());
        fmt::print("{:<28} {:>5}x{:>5}x{:>5} {}{} {:<6} t={} {:<16} {:8.3f} ms (min {:8.3f})  {:7.1f} GFLOP/s  max|err| {:.1e}\n", p.what, p.M,
                   p.N, p.K, p.ta ? 'T' : 'N', p.tb ? 'T' : 'N', sizeof(T) == 4 ? "fp32" : "fp64", threads, b.name, med, best,
                   flop / med / 1e6, b.max_diff);
    }
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<int> thread_counts{1, 2};
    if (argc > 1) {
        thread_counts.clear();
        for (const char* s = argv[1]; *s;) {
            thread_counts.push_back(std::atoi(s));
            while (*s && *s != ',') ++s;
            if (*s) ++s;
        }
    }
    const int reps = argc > 2 ? std::atoi(argv[2]) : 7, rounds = argc > 3 ? std::atoi(argv[3]) : 2;
    const std::vector<Library> libs = load_libraries();
    const std::int64_t E = 512, FF = 2048;
    std::vector<Product> products;
    for (std::int64_t L : {256, 512}) {
        const std::int64_t N = 2 * L;  // batch 2
        const std::string at = fmt::format("L={} ", L);
        products.push_back({at + "in_proj fwd x.W^T", N, 3 * E, E, false, true});
        products.push_back({at + "in_proj bwd dy.W", N, E, 3 * E, false, false});
        products.push_back({at + "in_proj bwd dy^T.x", 3 * E, E, N, true, false});
        products.push_back({at + "out_proj fwd", N, E, E, false, true});
        products.push_back({at + "mlp up fwd", N, FF, E, false, true});
        products.push_back({at + "mlp down fwd", N, E, FF, false, true});
        products.push_back({at + "mlp up bwd dy^T.x", FF, E, N, true, false});
    }
    for (int threads : thread_counts) {
        ad::set_num_threads(threads);
        for (const Product& p : products) {
            run<float>(libs, p, threads, reps, rounds);
            if (p.what.rfind("L=256", 0) == 0) run<double>(libs, p, threads, reps, rounds);
        }
    }
}
