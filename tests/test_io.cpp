// safetensors files (io/safetensors.hpp) and module / optimiser state (nn/state.hpp): the exact bytes
// written, round trips, every validation the reader makes on a file it did not write, and training
// resumed from saved files continuing bit for bit as the uninterrupted run. Interoperability with the
// Python safetensors package and torch is tested on the Python side (python/tests/test_state.py).

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <autodiff/autodiff.hpp>

#include "check_error.hpp"

namespace ad = autodiff;
namespace fs = std::filesystem;
using test::check_error;

namespace {

// A file name in the system's temporary folder, unique to this test process, removed at scope exit.
struct TempFile {
    std::string path;
    explicit TempFile(const std::string& name)
        : path((fs::temp_directory_path() / fmt::format("autodiff_test_io_{}_{}", ::getpid(), name)).string()) {}
    ~TempFile() {
        std::error_code ec;
        fs::remove(path, ec);
    }
};

std::string read_all(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Writes an 8-byte length, `header` and `data` bytes: a file as anyone could make it.
void write_raw(const std::string& path, const std::string& header, const std::string& data) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    const std::uint64_t n = header.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << header << data;
}

std::string floats(std::initializer_list<float> v) {
    std::string s(v.size() * 4, '\0');
    std::memcpy(s.data(), std::data(v), s.size());
    return s;
}

}  // namespace

TEST_CASE("save_safetensors writes the documented layout byte for byte") {
    TempFile f("layout");
    ad::save_safetensors(f.path, {{"w", ad::from_vector<float>({2}, {1.0f, -2.0f})}, {"x\"y", ad::full<double>({}, 0.5)}},
                         {{"format", "pt"}});
    std::string header = R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("x\"y":{"dtype":"F64","shape":[],"data_offsets":[8,16]}})";
    header.append((8 - header.size() % 8) % 8, ' ');
    const std::uint64_t n = header.size();
    std::string expected(reinterpret_cast<const char*>(&n), 8);
    const double half = 0.5;
    expected += header + floats({1.0f, -2.0f}) + std::string(reinterpret_cast<const char*>(&half), 8);
    CHECK(read_all(f.path) == expected);
    CHECK(n % 8 == 0);
}

TEST_CASE("a round trip keeps names, order, dtypes, shapes, values and metadata") {
    TempFile f("roundtrip");
    const auto a = ad::randn<float>({2, 3, 4, 5}, 1);
    const auto b = ad::randn<double>({7}, 2);
    const auto c = ad::zeros<float>({0, 3});
    const auto d = ad::full<double>({}, 3.25);
    ad::save_safetensors(f.path, {{"layer.0.weight", a}, {"b", b}, {"empty", c}, {"scalar", d}},
                         {{"note", "quote \" backslash \\ newline \n tab \t é"}, {"format", "pt"}});
    const ad::SafetensorsFile file = ad::load_safetensors(f.path);
    REQUIRE(file.tensors.size() == 4);
    CHECK(file.tensors[0].name == "layer.0.weight");
    CHECK(file.tensors[3].name == "scalar");
    CHECK(file.metadata.at("note") == "quote \" backslash \\ newline \n tab \t é");
    CHECK(std::get<ad::Tensor<float>>(file.find("layer.0.weight")->value).to_vector() == a.to_vector());
    CHECK(std::get<ad::Tensor<double>>(file.find("b")->value).to_vector() == b.to_vector());
    CHECK(file.find("empty")->shape() == ad::Shape{0, 3});
    CHECK(std::get<ad::Tensor<double>>(file.find("scalar")->value).item() == 3.25);
    CHECK(file.find("scalar")->shape().rank() == 0);
    CHECK(file.find("missing") == nullptr);
}

TEST_CASE("the reader accepts what other writers may do: spaces, escapes, any key order, no metadata") {
    TempFile f("foreign");
    write_raw(f.path, " { \"b\" : { \"data_offsets\" : [ 4 , 8 ] , \"shape\" : [ 1 ] , \"dtype\" : \"F32\" } ,\n"
                      " \"\\u00e9\\ud83d\\ude00\" : {\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]} }   ",
              floats({1.5f, 2.5f}));
    const auto file = ad::load_safetensors(f.path);
    REQUIRE(file.tensors.size() == 2);
    CHECK(file.tensors[0].name == "\xC3\xA9\xF0\x9F\x98\x80");  // é and U+1F600, in data order
    CHECK(std::get<ad::Tensor<float>>(file.tensors[0].value).item() == 1.5f);
    CHECK(std::get<ad::Tensor<float>>(file.tensors[1].value).item() == 2.5f);
}

TEST_CASE("a truncated file is rejected with the byte counts, at every cut") {
    TempFile f("truncated");
    ad::save_safetensors(f.path, {{"w", ad::randn<float>({4, 4}, 3)}});
    const auto full_size = fs::file_size(f.path);
    const std::string bytes = read_all(f.path);
    for (const std::uintmax_t cut : {std::uintmax_t{0}, std::uintmax_t{5}, std::uintmax_t{8}, std::uintmax_t{20}, full_size - 64, full_size - 1}) {
        CAPTURE(cut);
        {
            std::ofstream out(f.path, std::ios::binary | std::ios::trunc);
            out.write(bytes.data(), static_cast<std::streamsize>(cut));
        }
        check_error([&] { (void)ad::load_safetensors(f.path); }, "load_safetensors", {f.path, "truncated"});
    }
}

TEST_CASE("malformed headers name the file, the tensor and what is wrong") {
    TempFile f("bad");
    const std::string four = floats({1.0f});
    struct Case {
        std::string header, data;
        std::vector<std::string_view> fragments;
    };
    const std::vector<Case> cases = {
        {R"({"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})", four, {"tensor 'w' has dtype F16; only F32 and F64"}},
        {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", four, {"tensor 'w' of shape (2) and dtype F32 needs 8 bytes", "[0, 4]"}},
        {R"({"w":{"dtype":"F32","shape":[1,1,1,1,1],"data_offsets":[0,4]}})", four, {"tensor 'w' has rank 5; at most 4"}},
        {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", four, {"tensor 'w' has data_offsets [4, 0] with begin > end"}},
        {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", four,
         {"the name 'w' appears twice"}},
        {R"({"w":{"dtype":"F32","shape":[1]}})", four, {"tensor 'w' lacks data_offsets"}},
        {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":[1]}})", four, {"tensor 'w' has an unknown field 'extra'"}},
        {R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", four, {"tensor 'w' shape: expected a non-negative integer"}},
        {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})", four, {"header: unexpected end of the header"}},
        {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} x)", four, {"unexpected text after the header's JSON object"}},
        {R"({"__metadata__":{"a":1}})", "", {"__metadata__: the value of 'a' must be a string"}},
        {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})",
         floats({1.0f, 2.0f}), {"tensor 'b' starts at data byte 2 but the tensors before it end at 4 (overlapping data)"}},
        {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", floats({1.0f, 2.0f}),
         {"tensor 'a' starts at data byte 4 but the tensors before it end at 0 (a gap in the data)"}},
        {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", floats({1.0f, 2.0f}),
         {"the tensors cover 4 bytes of data but the file has 8 after the header"}},
        {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", four, {"the file is truncated: tensor 'a' needs bytes [0, 8) of the data, which has 4"}},
    };
    for (const auto& c : cases) {
        CAPTURE(c.header);
        write_raw(f.path, c.header, c.data);
        std::vector<std::string_view> fragments = c.fragments;
        fragments.push_back(f.path);
        check_error([&] { (void)ad::load_safetensors(f.path); }, "load_safetensors", {fragments[0], fragments.back()});
    }
    SUBCASE("a header length beyond the limit is refused before anything is allocated") {
        std::ofstream out(f.path, std::ios::binary | std::ios::trunc);
        const std::uint64_t n = 1ull << 40;
        out.write(reinterpret_cast<const char*>(&n), 8);
        out.close();
        check_error([&] { (void)ad::load_safetensors(f.path); }, "load_safetensors", {"header length 1099511627776 exceeds the limit"});
    }
    SUBCASE("a missing file") {
        check_error([&] { (void)ad::load_safetensors(f.path + ".none"); }, "load_safetensors", {"cannot open", ".none"});
    }
}

TEST_CASE("save_safetensors rejects duplicate, empty and reserved names and undefined tensors") {
    TempFile f("badsave");
    const auto t = ad::zeros<float>({2});
    check_error([&] { ad::save_safetensors(f.path, {{"a", t}, {"a", t}}); }, "save_safetensors", {"the name 'a' appears twice"});
    check_error([&] { ad::save_safetensors(f.path, {{"", t}}); }, "save_safetensors", {"a tensor has an empty name"});
    check_error([&] { ad::save_safetensors(f.path, {{"__metadata__", t}}); }, "save_safetensors", {"'__metadata__' is reserved"});
    check_error([&] { ad::save_safetensors(f.path, {{"u", ad::Tensor<float>()}}); }, "save_safetensors", {"tensor 'u' is undefined"});
    check_error([&] { ad::save_safetensors("/nonexistent-dir/x.safetensors", {{"a", t}}); }, "save_safetensors", {"cannot open /nonexistent-dir"});
}

TEST_CASE("modules are saved under torch's names and loaded in place") {
    TempFile f("modules");
    SUBCASE("nn::Linear: weight, bias") {
        ad::nn::Linear<float> a(3, 4, true, 1), b(3, 4, true, 2);
        ad::nn::save(a, f.path);
        const auto file = ad::load_safetensors(f.path);
        REQUIRE(file.tensors.size() == 2);
        CHECK(file.tensors[0].name == "weight");
        CHECK(file.tensors[1].name == "bias");
        CHECK(file.metadata.at("format") == "pt");
        const float* before = b.weight().value().data();
        ad::nn::load(b, f.path);
        CHECK(b.weight().value().data() == before);  // in place
        CHECK(b.weight().value().to_vector() == a.weight().value().to_vector());
        CHECK(b.bias().value().to_vector() == a.bias().value().to_vector());
    }
    SUBCASE("nn::MultiHeadAttention: in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias") {
        ad::nn::MultiHeadAttention<double> a({.embed_dim = 8, .num_heads = 2, .seed = 5}), b({.embed_dim = 8, .num_heads = 2, .seed = 6});
        ad::nn::save(a, f.path);
        const auto file = ad::load_safetensors(f.path);
        std::vector<std::string> names;
        for (const auto& t : file.tensors) names.push_back(t.name);
        CHECK(names == std::vector<std::string>{"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"});
        CHECK(file.find("in_proj_weight")->shape() == ad::Shape{24, 8});
        ad::nn::load(b, f.path);
        a.eval();
        b.eval();
        ad::Var<double> x(ad::randn<double>({2, 5, 8}, 7));
        CHECK(ad::max_abs_diff(a(x, x, x).value(), b(x, x, x).value()) == 0.0);
    }
}

TEST_CASE("loading parameters checks names, shapes and dtypes first and changes nothing on error") {
    TempFile f("badload");
    ad::nn::Linear<float> small(3, 4, true, 1), wide(3, 5, true, 2), no_bias(3, 4, false, 3);
    ad::nn::save(small, f.path);
    const auto before = wide.weight().value().to_vector();
    check_error([&] { ad::nn::load(wide, f.path); }, "load_parameters", {f.path, "tensor 'weight' has shape (4,3), expected (5,3)"});
    CHECK(wide.weight().value().to_vector() == before);
    check_error([&] { ad::nn::load(no_bias, f.path); }, "load_parameters", {"unexpected tensor 'bias' of shape (4)"});
    ad::nn::Linear<double> dbl(3, 4, true, 1);
    check_error([&] { ad::nn::load(dbl, f.path); }, "load_parameters", {"tensor 'weight' has dtype F32, expected F64"});
    ad::nn::save(no_bias, f.path);
    check_error([&] { ad::nn::load(small, f.path); }, "load_parameters", {"no tensor 'bias' (expected shape (4), dtype F32)"});
}

namespace {

// A few steps of a small regression with `opt` on `layer`.
template <class Opt>
void train(ad::nn::Linear<double>& layer, Opt& opt, int steps, std::uint64_t seed) {
    for (int s = 0; s < steps; ++s) {
        const auto x = ad::randn<double>({6, 3}, seed + static_cast<std::uint64_t>(s));
        const auto y = ad::randn<double>({6, 2}, seed + 100 + static_cast<std::uint64_t>(s));
        opt.zero_grad();
        ad::Var<double> loss = ad::mse(layer(x), y);
        loss.backward();
        opt.step();
    }
}

}  // namespace

TEST_CASE("Adam resumed from saved parameters and state continues bit for bit") {
    TempFile params("adam_params"), state("adam_state");
    ad::nn::Linear<double> a(3, 2, true, 1);
    ad::nn::Adam<double> opt_a(a.parameters(), {.lr = 0.01});
    train(a, opt_a, 3, 10);
    ad::nn::save(a, params.path);
    ad::nn::save(opt_a, state.path);
    train(a, opt_a, 2, 20);

    ad::nn::Linear<double> b(3, 2, true, 99);
    ad::nn::Adam<double> opt_b(b.parameters(), {.lr = 0.01});
    ad::nn::load(b, params.path);
    ad::nn::load(opt_b, state.path);
    CHECK(opt_b.state(0).step == 3);
    CHECK(opt_b.steps() == 3);
    train(b, opt_b, 2, 20);
    CHECK(opt_b.steps() == 5);
    CHECK(b.weight().value().to_vector() == a.weight().value().to_vector());
    CHECK(b.bias().value().to_vector() == a.bias().value().to_vector());

    const auto file = ad::load_safetensors(state.path);
    CHECK(file.find("state.0.exp_avg")->shape() == ad::Shape{2, 3});
    CHECK(file.find("state.1.exp_avg_sq")->shape() == ad::Shape{2});
    CHECK(std::get<ad::Tensor<double>>(file.find("state.1.step")->value).item() == 3.0);

    SUBCASE("a state for other shapes or a broken step count is refused") {
        ad::nn::Linear<double> other(4, 2, true, 1);
        ad::nn::Adam<double> opt_o(other.parameters(), {});
        check_error([&] { ad::nn::load(opt_o, state.path); }, "load(Adam)", {"tensor 'state.0.exp_avg' has shape (2,3), expected (2,4)"});
        ad::save_safetensors(state.path, {{"state.0.step", ad::full<double>({}, 1.5)}, {"state.0.exp_avg", ad::zeros<double>({2, 3})},
                                          {"state.0.exp_avg_sq", ad::zeros<double>({2, 3})}});
        check_error([&] { ad::nn::load(opt_b, state.path); }, "load(Adam)", {"'state.0.step' must be a whole number of steps >= 1, got 1.5"});
    }
    SUBCASE("steps(): from the metadata, else (a file torch wrote) the largest per-parameter count") {
        auto saved = ad::load_safetensors(state.path);
        saved.metadata.erase("steps");
        ad::save_safetensors(state.path, saved.tensors, saved.metadata);
        ad::nn::load(opt_b, state.path);
        CHECK(opt_b.steps() == 3);
        for (const char* bad : {"2", "x", "7 ", "-1"}) {
            saved.metadata["steps"] = bad;
            ad::save_safetensors(state.path, saved.tensors, saved.metadata);
            check_error([&] { ad::nn::load(opt_b, state.path); }, "load(Adam)",
                        {"metadata 'steps' must be a whole number >= the largest per-parameter step (3), got '" + std::string(bad) + "'"});
        }
        CHECK(opt_b.steps() == 3);  // a refused file changes nothing
        check_error([&] { opt_b.set_steps(2); }, "Adam", {"steps 2 must be >= the 3 steps parameter 0 took"});
        CHECK(opt_b.steps() == 3);
    }
}

TEST_CASE("SGD with momentum resumed from saved state continues bit for bit") {
    TempFile params("sgd_params"), state("sgd_state");
    ad::nn::Linear<double> a(3, 2, true, 1);
    ad::nn::SGD<double> opt_a(a.parameters(), {.lr = 0.05, .momentum = 0.9});
    train(a, opt_a, 3, 30);
    ad::nn::save(a, params.path);
    ad::nn::save(opt_a, state.path);
    train(a, opt_a, 2, 40);
    ad::nn::Linear<double> b(3, 2, true, 98);
    ad::nn::SGD<double> opt_b(b.parameters(), {.lr = 0.05, .momentum = 0.9});
    ad::nn::load(b, params.path);
    ad::nn::load(opt_b, state.path);
    train(b, opt_b, 2, 40);
    CHECK(b.weight().value().to_vector() == a.weight().value().to_vector());
    CHECK(ad::load_safetensors(state.path).find("state.0.momentum_buffer")->shape() == ad::Shape{2, 3});
}
