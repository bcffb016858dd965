#pragma once
// Golden fixtures written by PyTorch (tools/make_goldens.py), and the comparison of our results with
// them. The fixtures live in AUTODIFF_TEST_DATA_DIR (tests/data) and are committed: the tests never
// need PyTorch. Regenerate them with `python3 tools/make_goldens.py` (after `pip install torch numpy`).
//
// File format (little-endian), one file per case and dtype (<case>.f64.bin, <case>.f32.bin):
//
//   magic    8 bytes  "ADGOLDEN"
//   version  uint32   1
//   count    uint32   number of tensors
//   count times:
//     name_len uint32, name (UTF-8, name_len bytes)
//     dtype    uint8    0 = float32, 1 = float64
//     rank     uint8    0..4
//     dims     rank x int64
//     data     prod(dims) elements of dtype, row-major
//
// Names: inputs and parameters under torch's names (x, query, in_proj_weight, out_proj.weight, ...),
// the upstream gradient `dout`, the output `out`, gradients `grad.<name>`. Boolean masks are stored as
// 0/1 in torch's convention (1 = masked out); keep_mask() turns one into ours (true = keep).
//
// Loading fails loudly: a missing or truncated file, a wrong magic or version, a missing tensor or a
// dtype other than the one asked for throws FixtureError naming the file and how to regenerate it.

#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <fmt/format.h>

#include <autodiff/autodiff.hpp>

namespace golden {

namespace ad = autodiff;

static_assert(std::endian::native == std::endian::little, "golden fixtures are little-endian; add byte swapping here");

inline constexpr const char* regenerate_hint = "regenerate with: python3 tools/make_goldens.py";
inline constexpr char magic[8] = {'A', 'D', 'G', 'O', 'L', 'D', 'E', 'N'};
inline constexpr std::uint32_t format_version = 1;

class FixtureError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

enum class DType : std::uint8_t { float32 = 0, float64 = 1 };

template <class T>
constexpr DType dtype_of() {
    return std::is_same_v<T, double> ? DType::float64 : DType::float32;
}
inline const char* dtype_name(DType d) { return d == DType::float64 ? "float64" : "float32"; }

class Fixture {
public:
    // Reads AUTODIFF_TEST_DATA_DIR/<file>, e.g. load("mha_self.f64.bin").
    static Fixture load(const std::string& file) { return load_path(std::string(AUTODIFF_TEST_DATA_DIR) + "/" + file); }
    // Reads the fixture at `path`.
    static Fixture load_path(const std::string& path) {
        Fixture fx;
        fx.path_ = path;
        std::ifstream in(fx.path_, std::ios::binary);
        if (!in) fx.fail("cannot open the file");
        const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        std::size_t pos = 0;
        auto take = [&](void* dst, std::size_t n) {
            if (bytes.size() - pos < n) fx.fail(fmt::format("truncated at byte {} (file has {} bytes)", pos, bytes.size()));
            std::memcpy(dst, bytes.data() + pos, n);
            pos += n;
        };
        char m[sizeof magic];
        take(m, sizeof m);
        if (std::memcmp(m, magic, sizeof m) != 0) fx.fail("bad magic bytes (not a golden fixture)");
        std::uint32_t version = 0, count = 0;
        take(&version, sizeof version);
        if (version != format_version) fx.fail(fmt::format("format version {}, this loader reads {}", version, format_version));
        take(&count, sizeof count);
        for (std::uint32_t k = 0; k < count; ++k) {
            std::uint32_t name_len = 0;
            take(&name_len, sizeof name_len);
            std::string name(name_len, '\0');
            take(name.data(), name_len);
            std::uint8_t dtype = 0, rank = 0;
            take(&dtype, 1);
            take(&rank, 1);
            if (dtype > 1) fx.fail(fmt::format("tensor '{}' has unknown dtype code {}", name, dtype));
            if (rank > ad::max_rank) fx.fail(fmt::format("tensor '{}' has rank {} > {}", name, rank, ad::max_rank));
            Stored s{static_cast<DType>(dtype), {}, {}};
            for (int d = 0; d < rank; ++d) {
                std::int64_t dim = 0;
                take(&dim, sizeof dim);
                if (dim < 0) fx.fail(fmt::format("tensor '{}' has a negative dimension", name));
                s.shape.push_back(dim);
            }
            s.bytes.resize(static_cast<std::size_t>(s.shape.numel()) * (s.dtype == DType::float64 ? 8 : 4));
            take(s.bytes.data(), s.bytes.size());
            fx.tensors_.emplace(std::move(name), std::move(s));
        }
        if (pos != bytes.size()) fx.fail(fmt::format("{} trailing bytes after {} tensors", bytes.size() - pos, count));
        return fx;
    }

    [[nodiscard]] const std::string& path() const { return path_; }
    [[nodiscard]] bool has(const std::string& name) const { return tensors_.count(name) != 0; }
    [[nodiscard]] std::vector<std::string> names() const {
        std::vector<std::string> n;
        for (const auto& [k, v] : tensors_) n.push_back(k);
        return n;
    }

    // A fresh copy of tensor `name`, which must be stored with T's dtype.
    template <class T>
    [[nodiscard]] ad::Tensor<T> tensor(const std::string& name) const {
        const Stored& s = find(name);
        if (s.dtype != dtype_of<T>())
            fail(fmt::format("tensor '{}' is {}, the test asked for {}", name, dtype_name(s.dtype), dtype_name(dtype_of<T>())));
        ad::Tensor<T> t(s.shape);
        if (!s.bytes.empty()) std::memcpy(t.data(), s.bytes.data(), s.bytes.size());
        return t;
    }
    // A torch boolean mask (stored as 0/1, 1 = masked out) as our keep mask (true = keep).
    [[nodiscard]] ad::Tensor<bool> keep_mask(const std::string& name) const {
        const Stored& s = find(name);
        ad::Tensor<bool> keep(s.shape);
        for (std::int64_t i = 0; i < s.shape.numel(); ++i) {
            double v = 0;
            if (s.dtype == DType::float64) std::memcpy(&v, s.bytes.data() + 8 * i, 8);
            else {
                float f = 0;
                std::memcpy(&f, s.bytes.data() + 4 * i, 4);
                v = f;
            }
            if (v != 0 && v != 1) fail(fmt::format("mask '{}' holds {} at flat index {}; masks are 0/1", name, v, i));
            keep.data()[i] = v == 0;
        }
        return keep;
    }

private:
    struct Stored {
        DType dtype;
        ad::Shape shape;
        std::vector<unsigned char> bytes;
    };
    [[noreturn]] void fail(const std::string& what) const {
        throw FixtureError(fmt::format("golden fixture {}: {}; {}", path_, what, regenerate_hint));
    }
    [[nodiscard]] const Stored& find(const std::string& name) const {
        const auto it = tensors_.find(name);
        if (it == tensors_.end()) fail(fmt::format("no tensor named '{}'", name));
        return it->second;
    }

    std::string path_;
    std::map<std::string, Stored> tensors_;
};

// The result of comparing one of our tensors with torch's. The tolerance is normwise relative:
// element i passes when |ours_i − torch_i| <= rtol·max_j |torch_j|, so entries near zero (where
// gradients cancel) are judged on the tensor's scale, and an all-zero torch tensor must be matched
// exactly. NaN anywhere fails.
struct Comparison {
    std::string name;
    double rtol = 0;
    bool passed = true;
    std::string problem;         // set when the shapes differ
    double max_abs_error = 0;    // max |ours − torch|
    double max_rel_error = 0;    // max_abs_error / max |torch| (the quantity the tolerance bounds)
    double torch_scale = 0;      // max |torch|
    std::int64_t first_bad = -1; // flat index of the first element over the tolerance
    std::string first_bad_index; // the same as a multi-index, e.g. (1,0,3,2)
    double ours_at_bad = 0, torch_at_bad = 0;

    [[nodiscard]] std::string str() const {
        if (!problem.empty()) return fmt::format("{}: {}", name, problem);
        std::string s = fmt::format("{}: max abs err {:.3e}, max rel err {:.3e} (to max|torch| {:.3e}), rtol {:.0e}", name,
                                    max_abs_error, max_rel_error, torch_scale, rtol);
        if (first_bad >= 0)
            s += fmt::format("; first bad element {} (flat {}): ours {:.10g}, torch {:.10g}", first_bad_index, first_bad,
                             ours_at_bad, torch_at_bad);
        return s;
    }
};

inline std::string multi_index(const ad::Shape& s, std::int64_t flat) {
    std::string out;
    for (int d = s.rank() - 1; d >= 0; --d) {
        out = fmt::format("{}{}{}", s[d] ? flat % s[d] : 0, out.empty() ? "" : ",", out);
        flat = s[d] ? flat / s[d] : 0;
    }
    return "(" + out + ")";
}

template <class T>
Comparison compare(std::string name, const ad::Tensor<T>& ours, const ad::Tensor<T>& torch, double rtol) {
    Comparison c;
    c.name = std::move(name);
    c.rtol = rtol;
    if (!ours.defined() || ours.shape() != torch.shape()) {
        c.passed = false;
        c.problem = fmt::format("shape {} but torch's is {}", ours.defined() ? ours.shape().str() : "(undefined)", torch.shape());
        return c;
    }
    const T* a = ours.data();
    const T* b = torch.data();
    const std::int64_t n = torch.numel();
    for (std::int64_t i = 0; i < n; ++i) c.torch_scale = std::max(c.torch_scale, std::abs(static_cast<double>(b[i])));
    const double bound = rtol * c.torch_scale;
    for (std::int64_t i = 0; i < n; ++i) {
        const double err = std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
        if (std::isnan(err)) c.max_abs_error = std::numeric_limits<double>::quiet_NaN();
        else if (err > c.max_abs_error) c.max_abs_error = err;  // once NaN, stays NaN
        if (!(err <= bound) && c.first_bad < 0) {
            c.first_bad = i;
            c.first_bad_index = multi_index(torch.shape(), i);
            c.ours_at_bad = static_cast<double>(a[i]);
            c.torch_at_bad = static_cast<double>(b[i]);
        }
    }
    c.max_rel_error = c.torch_scale > 0 ? c.max_abs_error / c.torch_scale : c.max_abs_error;
    c.passed = c.first_bad < 0;
    return c;
}

// Checks our tensor against the fixture's tensor `name` (a doctest CHECK that prints the comparison
// on failure). With AUTODIFF_GOLDEN_REPORT set in the environment every comparison is printed, to
// see the margins.
template <class T>
Comparison check_close(const std::string& label, const ad::Tensor<T>& ours, const ad::Tensor<T>& torch, double rtol) {
    const Comparison c = compare(label, ours, torch, rtol);
    if (std::getenv("AUTODIFF_GOLDEN_REPORT")) fmt::print("[golden] {}\n", c.str());
    INFO(c.str());
    CHECK(c.passed);
    return c;
}
inline std::string file_name(const Fixture& fx) { return fx.path().substr(fx.path().find_last_of('/') + 1); }
template <class T>
Comparison check_matches(const Fixture& fx, const std::string& name, const ad::Tensor<T>& ours, double rtol) {
    return check_close(fmt::format("{} {}", file_name(fx), name), ours, fx.tensor<T>(name), rtol);
}

// The tolerance of a golden comparison in T (normwise relative, see compare) and the fixture of a case
// in T (tools/make_goldens.py writes <case>.f32.bin and <case>.f64.bin).
template <class T>
constexpr double rtol = std::is_same_v<T, double> ? 1e-10 : 1e-4;
template <class T>
Fixture load(const std::string& case_name) {
    return Fixture::load(case_name + (std::is_same_v<T, double> ? ".f64.bin" : ".f32.bin"));
}

}  // namespace golden
