// Property tests of the fused attention path over random configurations: for each one, the fused
// kernels give the generic path's numbers (the oracle, NoFusionGuard) on the output and every
// gradient, within a tolerance scaled to the dtype's epsilon and the problem's sizes; both paths are
// bitwise identical on 1 and 2 threads; and a sample is gradchecked in double through the fused path.
//
// A configuration draws batch, heads, Lq, Lk (1..300), head dims d and dv (1..130, independently),
// the rank (4, sometimes 3 or 2), a bias of any broadcast shape (none, trainable, constant; added
// before or after the scaling), any combination of causal, keep, key-padding and additive masks
// (with −∞ entries, so some rows are fully masked), dropout on or off, the scale, float or double,
// and in some configurations a variant (soft-capping with the bias inside or outside, ALiBi, a
// relative-position table, sliding and causal windows).
//
// Every choice is a function of the configuration's seed. Configuration i of a run has seed
// AUTODIFF_PROPERTY_SEED + i (default seed 20261203); AUTODIFF_PROPERTY_CONFIGS sets how many run
// (default 500); AUTODIFF_PROPERTY_VERBOSE=1 prints each configuration. A failure prints the seed and
// the command that replays that configuration alone.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

#include <fmt/format.h>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

namespace {

// splitmix64: every choice is a function of the seed alone (no std distribution, whose results differ
// between standard libraries).
struct Rng {
    std::uint64_t state;
    std::uint64_t next() {
        std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    std::int64_t uniform(std::int64_t lo, std::int64_t hi) {  // in [lo, hi]
        return lo + static_cast<std::int64_t>(next() % static_cast<std::uint64_t>(hi - lo + 1));
    }
    double real(double lo, double hi) { return lo + (hi - lo) * static_cast<double>(next() >> 11) * 0x1p-53; }
    bool chance(double p) { return real(0, 1) < p; }
};

enum class Variant { plain, bias_scaled, soft_cap_inside, soft_cap_outside, alibi, relative, sliding_window, causal_window };
constexpr std::array variant_names{"plain", "bias before the scale", "soft-capping, bias inside", "soft-capping, bias outside",
                                   "ALiBi", "relative-position table", "sliding window", "causal window"};
enum class BiasKind { none, param, constant };

// The shape of a broadcast operand (bias, keep mask, additive mask) as a function of the scores'
// shape: its rank (its dimensions are the scores' last `rank`) and which of them are 1.
struct BroadcastSpec {
    int rank = 0;
    std::array<bool, 4> one{};
    [[nodiscard]] ad::Shape of(const ad::Shape& scores) const {
        ad::Shape s;
        for (int i = 0; i < rank; ++i) s.push_back(one[static_cast<std::size_t>(i)] ? 1 : scores[scores.rank() - rank + i]);
        return s;
    }
    // "(n,h,Lq,Lk)", "(1,h,1,Lk)", ...: the symbolic shape, which names the case whatever the sizes.
    [[nodiscard]] std::string name(int scores_rank) const {
        static constexpr std::array<const char*, 4> rank4{"n", "h", "Lq", "Lk"}, rank3{"b", "Lq", "Lk", ""}, rank2{"Lq", "Lk", "", ""};
        const auto& names = scores_rank == 4 ? rank4 : scores_rank == 3 ? rank3 : rank2;
        std::string s = "(";
        for (int i = 0; i < rank; ++i) {
            if (i) s += ",";
            s += one[static_cast<std::size_t>(i)] ? "1" : names[static_cast<std::size_t>(scores_rank - rank + i)];
        }
        return s + ")";
    }
};

// The named shapes of the broadcast set (DESIGN.md, test_fused.cpp) for rank-4 scores (n, h, Lq, Lk).
const std::vector<BroadcastSpec> named_rank4{{4, {}}, {3, {}}, {2, {}}, {4, {false, true, false, false}}, {4, {true, false, true, false}},
                                             {1, {}}, {2, {false, true}}, {1, {true}}, {4, {false, false, true, false}}};

BroadcastSpec random_spec(Rng& rng, int scores_rank) {
    if (scores_rank == 4 && rng.chance(0.7)) return named_rank4[static_cast<std::size_t>(rng.uniform(0, std::ssize(named_rank4) - 1))];
    BroadcastSpec s;
    s.rank = static_cast<int>(rng.uniform(1, scores_rank));
    for (int i = 0; i < s.rank; ++i) s.one[static_cast<std::size_t>(i)] = rng.chance(0.35);
    return s;
}

// Sizes 1..300 (lengths) or 1..130 (head dims): mostly small, a fifth large.
std::int64_t random_size(Rng& rng, std::int64_t max) {
    const double u = rng.real(0, 1);
    if (u < 0.45) return rng.uniform(1, std::min<std::int64_t>(max, 20));
    if (u < 0.8) return rng.uniform(std::min<std::int64_t>(max, 21), max * 2 / 5);
    return rng.uniform(max * 2 / 5 + 1, max);
}

struct Config {
    std::uint64_t seed = 0;
    bool is_double = true;
    std::vector<std::int64_t> lead;  // leading dimensions of q, k, v: (n, h), (n) or none
    std::int64_t Lq = 1, Lk = 1, d = 1, dv = 1;
    Variant variant = Variant::plain;
    BiasKind bias = BiasKind::none;
    BroadcastSpec bias_spec;
    double scale = 1;
    bool causal = false, key_padding = false;
    std::optional<BroadcastSpec> keep, additive;
    double keep_rate = 1;  // probability that a keep-mask entry keeps
    double dropout = 0;    // 0: no dropout node
    double cap = 1;        // soft-capping
    std::int64_t window = 1, R = 1;
    bool gradcheck = false;

    [[nodiscard]] int rank() const { return static_cast<int>(lead.size()) + 2; }
    [[nodiscard]] ad::Shape with_lead(std::int64_t a, std::int64_t b) const {
        ad::Shape s;
        for (std::int64_t x : lead) s.push_back(x);
        s.push_back(a);
        s.push_back(b);
        return s;
    }
    [[nodiscard]] ad::Shape scores() const { return with_lead(Lq, Lk); }
    [[nodiscard]] std::int64_t heads() const { return rank() == 4 ? lead[1] : 1; }

    [[nodiscard]] std::string str() const {
        std::string s = fmt::format("{} q {} k {} v {}, {}", is_double ? "double" : "float", with_lead(Lq, d), with_lead(Lk, d),
                                    with_lead(Lk, dv), variant_names[static_cast<std::size_t>(variant)]);
        if (variant == Variant::soft_cap_inside || variant == Variant::soft_cap_outside) s += fmt::format(" (cap {})", cap);
        if (variant == Variant::sliding_window || variant == Variant::causal_window) s += fmt::format(" (width {})", window);
        if (variant == Variant::relative) s += fmt::format(" (R {})", R);
        s += fmt::format(", scale {}", scale);
        if (bias != BiasKind::none)
            s += fmt::format(", {} bias {} = {}", bias == BiasKind::param ? "trainable" : "constant", bias_spec.name(rank()), bias_spec.of(scores()));
        if (causal) s += ", causal";
        if (keep) s += fmt::format(", keep mask {} = {} (keeps {:.2f})", keep->name(rank()), keep->of(scores()), keep_rate);
        if (key_padding) s += ", key padding";
        if (additive) s += fmt::format(", additive mask {} = {}", additive->name(rank()), additive->of(scores()));
        if (dropout > 0) s += fmt::format(", dropout {}", dropout);
        return s;
    }
};

Config random_config(std::uint64_t seed) {
    Rng rng{seed};
    Config c;
    c.seed = seed;
    c.is_double = rng.chance(0.5);
    c.variant = rng.chance(0.55) ? Variant::plain : static_cast<Variant>(rng.uniform(1, std::ssize(variant_names) - 1));
    const double r = rng.real(0, 1);
    const int rank = c.variant != Variant::plain || r < 0.8 ? 4 : r < 0.9 ? 3 : 2;
    for (int i = 0; i + 2 < rank; ++i) c.lead.push_back(rng.uniform(1, i == 0 ? 3 : 4));
    c.Lq = random_size(rng, 300);
    c.Lk = random_size(rng, 300);
    c.d = random_size(rng, 130);
    c.dv = rng.chance(0.5) ? c.d : random_size(rng, 130);
    // Keep every configuration cheap (the generic path's L×L tensors dominate): fewer leading
    // entries, then smaller head dimensions, never shorter sequences (long ones are what is tested).
    constexpr std::int64_t budget = 12'000'000;
    auto work = [&] {
        std::int64_t lead = 1;
        for (std::int64_t x : c.lead) lead *= x;
        return lead * c.Lq * c.Lk * (c.d + c.dv + 8);
    };
    while (work() > budget) {
        auto it = std::max_element(c.lead.begin(), c.lead.end());
        if (it != c.lead.end() && *it > 1) --*it;
        else if (c.d > 1 && c.d >= c.dv) c.d = std::max<std::int64_t>(1, c.d * 3 / 4);
        else if (c.dv > 1) c.dv = std::max<std::int64_t>(1, c.dv * 3 / 4);
        else break;
    }
    switch (c.variant) {
        case Variant::plain: c.bias = static_cast<BiasKind>(rng.uniform(0, 2)); break;
        case Variant::relative: c.bias = BiasKind::none; break;
        default: c.bias = BiasKind::param; break;
    }
    c.bias_spec = random_spec(rng, rank);
    const double s = rng.real(0, 1);
    c.scale = s < 0.65 ? 1 / std::sqrt(double(c.d)) : s < 0.9 ? rng.real(0.01, 1.5) : s < 0.95 ? -rng.real(0.01, 1) : 0.0;
    c.causal = rng.chance(0.35);
    if (rng.chance(0.3)) {
        c.keep = random_spec(rng, rank);
        const double k = rng.real(0, 1);
        c.keep_rate = k < 0.6 ? 0.9 : k < 0.9 ? 0.5 : 0.05;
    }
    c.key_padding = rng.chance(0.3);
    if (rng.chance(0.3)) c.additive = random_spec(rng, rank);
    if (rng.chance(0.4)) c.dropout = rng.real(0.05, 0.7);
    c.cap = rng.real(0.5, 10);
    c.window = c.variant == Variant::causal_window ? rng.uniform(1, c.Lk + 1) : rng.uniform(0, c.Lk);
    c.R = rng.uniform(1, 10);
    c.gradcheck = rng.chance(1.0 / 8);
    return c;
}

// The same configuration at sizes a gradcheck affords.
Config small_copy(Config c) {
    for (std::int64_t& x : c.lead) x = std::min<std::int64_t>(x, 2);
    c.Lq = std::min<std::int64_t>(c.Lq, 7);
    c.Lk = std::min<std::int64_t>(c.Lk, 9);
    c.d = std::min<std::int64_t>(c.d, 5);
    c.dv = std::min<std::int64_t>(c.dv, 4);
    c.window = std::min(c.window, c.Lk);
    c.is_double = true;
    return c;
}

// The tensors of a configuration, drawn from its seed.
template <class T>
struct Inputs {
    const Config& c;
    ad::Param<T> q, k, v, bias, slopes, table;
    ad::Tensor<T> bias_const, additive;
    ad::Mask mask;
    ad::DropoutDescriptor drop;
    double magnitude = 0;  // a bound on |S|'s terms (see tolerance())

    explicit Inputs(const Config& config)
        : c(config),
          q(ad::randn<T>(c.with_lead(c.Lq, c.d), c.seed * 16 + 1), "q"),
          k(ad::randn<T>(c.with_lead(c.Lk, c.d), c.seed * 16 + 2), "k"),
          v(ad::randn<T>(c.with_lead(c.Lk, c.dv), c.seed * 16 + 3), "v"),
          bias(ad::randn<T>(c.bias_spec.of(c.scores()), c.seed * 16 + 4), "bias"),
          slopes(ad::randn<T>({c.heads()}, c.seed * 16 + 5), "slopes"),
          table(ad::randn<T>({c.heads(), 2 * c.R + 1}, c.seed * 16 + 6), "table") {
        Rng rng{c.seed * 16 + 7};
        const ad::Shape scores = c.scores();
        if (c.bias == BiasKind::constant) bias_const = bias.value();
        mask.causal = c.causal;
        if (c.keep) {
            mask.keep = ad::Tensor<bool>(c.keep->of(scores));
            for (std::int64_t i = 0; i < mask.keep.numel(); ++i) mask.keep.data()[i] = rng.chance(c.keep_rate);
        }
        if (c.key_padding) {  // each batch entry keeps a prefix of its keys, possibly none
            const std::int64_t batch = c.rank() >= 3 ? c.lead[0] : 1;
            mask.key_padding = ad::Tensor<bool>(c.rank() >= 3 ? ad::Shape{batch, c.Lk} : ad::Shape{c.Lk});
            for (std::int64_t b = 0; b < batch; ++b) {
                const std::int64_t kept = rng.chance(0.15) ? 0 : rng.uniform(1, c.Lk);
                for (std::int64_t j = 0; j < c.Lk; ++j) mask.key_padding.data()[b * c.Lk + j] = j < kept;
            }
        }
        double additive_max = 0;
        if (c.additive) {
            additive = ad::randn<T>(c.additive->of(scores), c.seed * 16 + 8);
            additive_max = double(additive.array().abs().maxCoeff());
            for (std::int64_t i = 0; i < additive.numel(); ++i)
                if (rng.chance(0.1)) additive.data()[i] = -std::numeric_limits<T>::infinity();
        }
        drop = {c.dropout, rng.next(), rng.next() % 1000};
        auto max_abs = [](const ad::Param<T>& p) { return double(p.value().array().abs().maxCoeff()); };
        // |Σ_c q_c k_c| <= d·max|q|·max|k|, plus whatever else is added to the scores.
        magnitude = std::abs(c.scale) * double(c.d) * max_abs(q) * max_abs(k) + additive_max;
        if (c.bias != BiasKind::none) magnitude += (c.variant == Variant::bias_scaled ? std::abs(c.scale) : 1.0) * max_abs(bias);
        if (c.variant == Variant::alibi) magnitude += max_abs(slopes) * double(std::max(c.Lq, c.Lk));
        if (c.variant == Variant::relative) magnitude += max_abs(table);
    }

    // The Params the configuration's expression reads.
    [[nodiscard]] std::vector<ad::Param<T>> params() const {
        std::vector<ad::Param<T>> p{q, k, v};
        if (c.bias == BiasKind::param) p.push_back(bias);
        if (c.variant == Variant::alibi) p.push_back(slopes);
        if (c.variant == Variant::relative) p.push_back(table);
        return p;
    }
};

// The configuration's expression: one type per (variant, bias kind, dropout).
template <Variant V, BiasKind B, bool Drop, class T>
auto attention(const Inputs<T>& in) {
    const Config& c = in.c;
    const T s = static_cast<T>(c.scale), cap = static_cast<T>(c.cap);
    auto S = [&] { return ad::matmul(in.q, ad::transpose(in.k)); };
    auto x = [&] {
        if constexpr (V == Variant::plain && B == BiasKind::none) return S() * s;
        else if constexpr (V == Variant::plain && B == BiasKind::param) return S() * s + in.bias;
        else if constexpr (V == Variant::plain) return S() * s + in.bias_const;
        else if constexpr (V == Variant::bias_scaled) return (S() + in.bias) * s;
        else if constexpr (V == Variant::soft_cap_inside) return ad::tanh((S() * s + in.bias) / cap) * cap;
        else if constexpr (V == Variant::soft_cap_outside) return ad::tanh(S() * s / cap) * cap + in.bias;
        else if constexpr (V == Variant::alibi) return S() * s + in.bias + ad::alibi(in.slopes);
        else if constexpr (V == Variant::relative) return S() * s + ad::at(in.table, ad::h_idx, ad::clamp(ad::q_idx - ad::k_idx + c.R, 0, 2 * c.R));
        else return S() * s + in.bias;
    };
    auto sm = [&] {
        if constexpr (V == Variant::sliding_window) return ad::softmax(x(), ad::sliding_window(c.window), in.mask, in.additive);
        else if constexpr (V == Variant::causal_window) return ad::softmax(x(), ad::causal_window(c.window), in.mask, in.additive);
        else return ad::softmax(x(), in.mask, in.additive);
    };
    if constexpr (Drop) {
        static_assert(ad::is_fused_v<decltype(ad::matmul(ad::dropout(sm(), in.drop), in.v))>);
        return ad::matmul(ad::dropout(sm(), in.drop), in.v);
    } else {
        static_assert(ad::is_fused_v<decltype(ad::matmul(sm(), in.v))>);
        return ad::matmul(sm(), in.v);
    }
}

// Calls check(f) with f building the configuration's expression.
template <class T, class Check>
void with_expression(const Inputs<T>& in, Check&& check) {
    // The plain spellings with and without a dropout node; the variants always with one (rate 0 when
    // the configuration has no dropout: the identity on both paths), which halves their instantiations.
    auto by_dropout = [&]<Variant V, BiasKind B>() {
        if constexpr (V != Variant::plain) check([&in] { return attention<V, B, true>(in); });
        else if (in.c.dropout > 0) check([&in] { return attention<V, B, true>(in); });
        else check([&in] { return attention<V, B, false>(in); });
    };
    switch (in.c.variant) {
        case Variant::plain:
            if (in.c.bias == BiasKind::none) by_dropout.template operator()<Variant::plain, BiasKind::none>();
            else if (in.c.bias == BiasKind::param) by_dropout.template operator()<Variant::plain, BiasKind::param>();
            else by_dropout.template operator()<Variant::plain, BiasKind::constant>();
            break;
        case Variant::bias_scaled: by_dropout.template operator()<Variant::bias_scaled, BiasKind::param>(); break;
        case Variant::soft_cap_inside: by_dropout.template operator()<Variant::soft_cap_inside, BiasKind::param>(); break;
        case Variant::soft_cap_outside: by_dropout.template operator()<Variant::soft_cap_outside, BiasKind::param>(); break;
        case Variant::alibi: by_dropout.template operator()<Variant::alibi, BiasKind::param>(); break;
        case Variant::relative: by_dropout.template operator()<Variant::relative, BiasKind::none>(); break;
        case Variant::sliding_window: by_dropout.template operator()<Variant::sliding_window, BiasKind::param>(); break;
        case Variant::causal_window: by_dropout.template operator()<Variant::causal_window, BiasKind::param>(); break;
    }
}

// The output and every Param's gradient, for one path and thread count; `records` gets the number of
// tape records of the forward (1 when fused).
template <class T, class F>
std::vector<ad::Tensor<T>> run(const F& f, std::vector<ad::Param<T>> params, const ad::Tensor<T>& seed, bool fused, int threads,
                               std::size_t* records = nullptr) {
    ad::set_num_threads(threads);
    for (auto& p : params) p.zero_grad();
    std::optional<ad::NoFusionGuard> generic;
    if (!fused) generic.emplace();
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    ad::Var<T> out = f();
    if (records) *records = tape.size();
    out.backward(seed);
    std::vector<ad::Tensor<T>> r{out.value().clone()};
    for (auto& p : params) r.push_back(p.grad().clone());
    return r;
}

bool bitwise_equal(const auto& a, const auto& b) {
    return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.numel()) * sizeof(*a.data())) == 0;
}

// Summary of a run: what was covered, and how close to its tolerance the worst result came.
struct Coverage {
    std::map<std::string, int> counts;
    double worst_ratio = 0;
    std::string worst;
    void add(const std::string& what) { ++counts[what]; }
};

// The replay command of a configuration.
std::string replay_command(std::uint64_t seed) {
    std::error_code ec;
    const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
    return fmt::format("AUTODIFF_PROPERTY_SEED={} AUTODIFF_PROPERTY_CONFIGS=1 {} -tc='property*'", seed,
                       ec ? std::string("tests/test_properties") : exe.string());
}

// Checks one configuration; returns false when something failed.
template <class T>
bool check_config(const Config& c, Coverage& cov) {
    const std::string replay = replay_command(c.seed);
    INFO("configuration seed ", c.seed, ": ", c.str());
    INFO("replay it alone: ", replay);
    bool ok = true;
    const Inputs<T> in(c);
    with_expression(in, [&](const auto& f) {
        const std::vector<ad::Param<T>> params = in.params();
        std::vector<std::string> names{"O"};
        for (const auto& p : params) names.push_back("d" + p.name());
        const ad::Tensor<T> seed = ad::randn<T>(c.with_lead(c.Lq, c.dv), c.seed * 16 + 9);
        std::size_t records = 0;
        const auto fused = run<T>(f, params, seed, true, 2, &records);
        const auto generic = run<T>(f, params, seed, false, 2);
        CHECK_MESSAGE(records == 1, "the fused path did not run");  // else the comparison below proves nothing
        ok = ok && records == 1;

        // Tolerance: rounding of sums of K terms (K = the longest sum an element goes through) and of
        // the scores, whose absolute error becomes P's relative error through the exponential:
        //   |fused − generic| <= 16·eps·(K + Lk + d + dv + bound on |S|'s terms)·max(1, max|generic|).
        // These are linear (worst-case) bounds; the factor 16 covers the few roundings per term.
        const double eps = std::numeric_limits<T>::epsilon();
        const std::int64_t score_elems = c.scores().numel();
        for (std::size_t i = 0; i < fused.size(); ++i) {
            CAPTURE(names[i]);
            // dbias: the scores' elements summed into one entry; captured slopes and tables: up to a head's.
            const std::int64_t K = i == 0 || names[i] == "dq" ? c.Lk
                                   : names[i] == "dk" || names[i] == "dv" ? c.Lq
                                   : score_elems / (names[i] == "dbias" ? generic[i].numel() : c.heads());
            const double scale = std::max(1.0, double(generic[i].array().abs().maxCoeff()));
            const double tol = 16 * eps * (double(K + c.Lk + c.d + c.dv) + in.magnitude) * scale;
            const bool finite = fused[i].array().isFinite().all() && generic[i].array().isFinite().all();
            const double err = finite ? double((fused[i].array() - generic[i].array()).abs().maxCoeff()) : INFINITY;
            CHECK_MESSAGE(finite, "a NaN or an infinity from finite inputs");
            CHECK_MESSAGE(err <= tol, fmt::format("{}: fused vs generic max |diff| {:.3e} > tolerance {:.3e} (max |generic| {:.3e})",
                                                  names[i], err, tol, scale));
            ok = ok && finite && err <= tol;
            if (finite && err / tol > cov.worst_ratio) {
                cov.worst_ratio = err / tol;
                cov.worst = fmt::format("{} of seed {} ({})", names[i], c.seed, c.str());
            }
        }

        // Determinism: 1 and 2 threads give the same bits, on both paths.
        const auto fused1 = run<T>(f, params, seed, true, 1), generic1 = run<T>(f, params, seed, false, 1);
        ad::set_num_threads(2);
        for (std::size_t i = 0; i < fused.size(); ++i) {
            CAPTURE(names[i]);
            CHECK_MESSAGE(bitwise_equal(fused[i], fused1[i]), "fused: 1 and 2 threads differ");
            CHECK_MESSAGE(bitwise_equal(generic[i], generic1[i]), "generic: 1 and 2 threads differ");
            ok = ok && bitwise_equal(fused[i], fused1[i]) && bitwise_equal(generic[i], generic1[i]);
        }
    });

    if (c.gradcheck) {  // the same configuration, small, in double, through the fused kernels
        const Config small = small_copy(c);
        INFO("gradcheck at the small sizes: ", small.str());
        const Inputs<double> sin(small);
        with_expression(sin, [&](const auto& f) {
            const auto report = ad::gradcheck(f, sin.params());
            INFO(report.str());
            CHECK(report.passed);
            ok = ok && report.passed;
        });
        cov.add("gradchecked");
    }
    return ok;
}

std::uint64_t env_or(const char* name, std::uint64_t fallback) {
    const char* s = std::getenv(name);
    return s && *s ? std::strtoull(s, nullptr, 10) : fallback;
}

}  // namespace

TEST_CASE("property: fused attention equals the generic path over random configurations") {
    const std::uint64_t first = env_or("AUTODIFF_PROPERTY_SEED", 20261203), count = env_or("AUTODIFF_PROPERTY_CONFIGS", 500);
    Coverage cov;
    int failures = 0;
    for (std::uint64_t i = 0; i < count && failures < 5; ++i) {
        const Config c = random_config(first + i);
        const bool ok = c.is_double ? check_config<double>(c, cov) : check_config<float>(c, cov);
        if (!ok) {
            ++failures;
            MESSAGE("FAILED configuration seed ", c.seed, "; replay: ", replay_command(c.seed));
        }
        if (std::getenv("AUTODIFF_PROPERTY_VERBOSE")) MESSAGE(c.str());
        cov.add(c.is_double ? "double" : "float");
        cov.add(fmt::format("rank {}", c.rank()));
        cov.add(std::string("variant: ") + variant_names[static_cast<std::size_t>(c.variant)]);
        if (c.bias != BiasKind::none) cov.add("bias " + c.bias_spec.name(c.rank()));
        if (c.bias == BiasKind::constant) cov.add("constant bias");
        const int masks = int(c.causal) + int(c.keep.has_value()) + int(c.key_padding) + int(c.additive.has_value());
        if (c.causal) cov.add("causal");
        if (c.keep) cov.add("keep mask");
        if (c.key_padding) cov.add("key padding");
        if (c.additive) cov.add("additive mask");
        if (masks >= 2) cov.add("two or more masks");
        if (c.dropout > 0) cov.add("dropout");
        if (c.scale == 0) cov.add("scale 0");
        if (c.d != c.dv) cov.add("dv != d");
        if (std::max(c.Lq, c.Lk) > 200) cov.add("a length > 200");
        if (std::max(c.d, c.dv) > 100) cov.add("a head dim > 100");
    }
    std::string summary;
    for (const auto& [what, n] : cov.counts) summary += fmt::format("  {}: {}\n", what, n);
    MESSAGE(fmt::format("{} configurations from seed {}; closest to its tolerance: {:.3f} of it, {}\n{}", count, first,
                        cov.worst_ratio, cov.worst, summary));
    // A full run covers every case (else the generator is broken and the test proves less than it says).
    if (count >= 500 && failures == 0) {
        for (const char* what : {"double", "float", "rank 2", "rank 3", "rank 4", "constant bias", "causal", "keep mask", "key padding",
                                 "additive mask", "two or more masks", "dropout", "scale 0", "dv != d", "a length > 200",
                                 "a head dim > 100", "gradchecked"}) {
            CAPTURE(what);
            CHECK(cov.counts[what] > 0);
        }
        for (const char* v : variant_names) CHECK(cov.counts[std::string("variant: ") + v] > 0);
        for (const BroadcastSpec& s : named_rank4) CHECK(cov.counts["bias " + s.name(4)] > 0);
    }
}
