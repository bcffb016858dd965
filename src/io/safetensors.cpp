#include "autodiff/io/safetensors.hpp"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <utility>

namespace autodiff {

static_assert(std::endian::native == std::endian::little,
              "safetensors: the data is little-endian; this reader and writer assume a little-endian machine");

const Shape& NamedTensor::shape() const {
    return std::visit([](const auto& t) -> const Shape& { return t.shape(); }, value);
}
const char* NamedTensor::dtype() const { return std::holds_alternative<Tensor<float>>(value) ? "F32" : "F64"; }

const NamedTensor* SafetensorsFile::find(const std::string& name) const {
    for (const auto& t : tensors)
        if (t.name == name) return &t;
    return nullptr;
}

namespace {

constexpr const char* save_op = "save_safetensors";
constexpr const char* load_op = "load_safetensors";
// The Python package refuses headers above 100 MB; so do we, before allocating one.
constexpr std::uint64_t max_header_bytes = 100'000'000;

// ---- writing ------------------------------------------------------------------------------------

void append_json_string(std::string& out, const std::string& s) {
    out += '"';
    for (const char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (static_cast<unsigned char>(c) < 0x20) out += fmt::format("\\u{:04x}", static_cast<unsigned>(c));
                else out += c;
        }
    }
    out += '"';
}

// ---- reading: a JSON parser for the header's subset (objects, arrays, strings, non-negative integers) ----

class HeaderParser {
public:
    HeaderParser(const std::string& text, const std::string& path) : s_(text), path_(path) {}

    struct Entry {
        std::string name, dtype;
        Shape shape;
        std::uint64_t begin = 0, end = 0;
    };

    void parse(std::vector<Entry>& entries, std::map<std::string, std::string>& metadata) {
        std::set<std::string> seen;
        expect('{');
        if (peek() == '}') {
            ++pos_;
        } else {
            for (;;) {
                const std::string key = string();
                if (!seen.insert(key).second) error("the name '{}' appears twice", key);
                expect(':');
                if (key == "__metadata__") metadata = string_map(key);
                else entries.push_back(entry(key));
                if (peek() == ',') {
                    ++pos_;
                    continue;
                }
                expect('}');
                break;
            }
        }
        skip_space();
        if (pos_ != s_.size()) error("unexpected text after the header's JSON object at byte {}", pos_);
    }

private:
    template <class... Args>
    [[noreturn]] void error(fmt::format_string<Args...> format, Args&&... args) const {
        fail(load_op, "{}: header: {}", path_, fmt::format(format, std::forward<Args>(args)...));
    }
    void skip_space() {
        while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
    }
    char peek() {
        skip_space();
        if (pos_ >= s_.size()) error("unexpected end of the header");
        return s_[pos_];
    }
    void expect(char c) {
        if (peek() != c) error("expected '{}' at byte {}, found '{}'", c, pos_, s_[pos_]);
        ++pos_;
    }
    unsigned hex4() {
        if (pos_ + 4 > s_.size()) error("truncated \\u escape at byte {}", pos_);
        unsigned v = 0;
        for (int i = 0; i < 4; ++i) {
            const char c = s_[pos_++];
            v <<= 4;
            if (c >= '0' && c <= '9') v |= static_cast<unsigned>(c - '0');
            else if (c >= 'a' && c <= 'f') v |= static_cast<unsigned>(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') v |= static_cast<unsigned>(c - 'A' + 10);
            else error("bad \\u escape at byte {}", pos_ - 1);
        }
        return v;
    }
    static void append_utf8(std::string& out, unsigned cp) {
        if (cp < 0x80) {
            out += static_cast<char>(cp);
        } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }
    std::string string() {
        expect('"');
        std::string out;
        for (;;) {
            if (pos_ >= s_.size()) error("unterminated string");
            const char c = s_[pos_++];
            if (c == '"') return out;
            if (static_cast<unsigned char>(c) < 0x20) error("control character in a string at byte {}", pos_ - 1);
            if (c != '\\') {
                out += c;
                continue;
            }
            if (pos_ >= s_.size()) error("unterminated string");
            switch (const char e = s_[pos_++]) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    unsigned cp = hex4();
                    if (cp >= 0xD800 && cp < 0xDC00) {
                        if (pos_ + 2 > s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u') error("unpaired surrogate at byte {}", pos_);
                        pos_ += 2;
                        const unsigned lo = hex4();
                        if (lo < 0xDC00 || lo >= 0xE000) error("unpaired surrogate at byte {}", pos_);
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    }
                    append_utf8(out, cp);
                    break;
                }
                default: error("bad escape '\\{}' at byte {}", e, pos_ - 1);
            }
        }
    }
    std::uint64_t integer(const std::string& what) {
        skip_space();
        const std::size_t start = pos_;
        std::uint64_t v = 0;
        while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
            const auto digit = static_cast<std::uint64_t>(s_[pos_++] - '0');
            if (v > (std::numeric_limits<std::uint64_t>::max() - digit) / 10) error("{}: integer too large", what);
            v = v * 10 + digit;
        }
        if (pos_ == start) error("{}: expected a non-negative integer at byte {}", what, start);
        return v;
    }
    std::vector<std::uint64_t> integers(const std::string& what) {
        std::vector<std::uint64_t> out;
        expect('[');
        if (peek() == ']') {
            ++pos_;
            return out;
        }
        for (;;) {
            out.push_back(integer(what));
            if (peek() == ',') {
                ++pos_;
                continue;
            }
            expect(']');
            return out;
        }
    }
    std::map<std::string, std::string> string_map(const std::string& what) {
        std::map<std::string, std::string> out;
        expect('{');
        if (peek() == '}') {
            ++pos_;
            return out;
        }
        for (;;) {
            std::string key = string();
            expect(':');
            if (peek() != '"') error("{}: the value of '{}' must be a string", what, key);
            out[std::move(key)] = string();
            if (peek() == ',') {
                ++pos_;
                continue;
            }
            expect('}');
            return out;
        }
    }
    Entry entry(const std::string& name) {
        Entry e;
        e.name = name;
        bool has_dtype = false, has_shape = false, has_offsets = false;
        expect('{');
        for (bool first = true;; first = false) {
            if (first && peek() == '}') break;
            const std::string key = string();
            expect(':');
            if (key == "dtype") {
                e.dtype = string();
                has_dtype = true;
            } else if (key == "shape") {
                const auto dims = integers("tensor '" + name + "' shape");
                if (dims.size() > static_cast<std::size_t>(max_rank))
                    error("tensor '{}' has rank {}; at most {} is supported", name, dims.size(), max_rank);
                for (const std::uint64_t d : dims) {
                    if (d > (std::uint64_t{1} << 48)) error("tensor '{}': dimension {} is too large", name, d);
                    e.shape.push_back(static_cast<std::int64_t>(d));
                }
                has_shape = true;
            } else if (key == "data_offsets") {
                const auto offsets = integers("tensor '" + name + "' data_offsets");
                if (offsets.size() != 2) error("tensor '{}': data_offsets must be [begin, end], got {} numbers", name, offsets.size());
                e.begin = offsets[0];
                e.end = offsets[1];
                has_offsets = true;
            } else {
                error("tensor '{}' has an unknown field '{}'", name, key);
            }
            if (peek() == ',') {
                ++pos_;
                continue;
            }
            expect('}');
            break;
        }
        if (!has_dtype || !has_shape || !has_offsets)
            error("tensor '{}' lacks {}", name, !has_dtype ? "dtype" : !has_shape ? "shape" : "data_offsets");
        return e;
    }

    const std::string& s_;
    const std::string& path_;
    std::size_t pos_ = 0;
};

template <class T>
Tensor<T> read_tensor(std::ifstream& in, const std::string& path, const HeaderParser::Entry& e, std::uint64_t data_start) {
    Tensor<T> t(e.shape);
    in.seekg(static_cast<std::streamoff>(data_start + e.begin));
    in.read(reinterpret_cast<char*>(t.data()), static_cast<std::streamsize>(e.end - e.begin));
    if (!in) fail(load_op, "{}: could not read the data of tensor '{}'", path, e.name);
    return t;
}

}  // namespace

void save_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
    std::set<std::string> names;
    for (const auto& t : tensors) {
        if (t.name.empty()) fail(save_op, "{}: a tensor has an empty name", path);
        if (t.name == "__metadata__") fail(save_op, "{}: '__metadata__' is reserved, not a tensor name", path);
        if (!names.insert(t.name).second) fail(save_op, "{}: the name '{}' appears twice", path, t.name);
        const bool defined = std::visit([](const auto& v) { return v.defined(); }, t.value);
        if (!defined) fail(save_op, "{}: tensor '{}' is undefined", path, t.name);
    }
    std::string header = "{";
    if (!metadata.empty()) {
        header += "\"__metadata__\":{";
        bool first = true;
        for (const auto& [k, v] : metadata) {
            if (!first) header += ',';
            first = false;
            append_json_string(header, k);
            header += ':';
            append_json_string(header, v);
        }
        header += '}';
    }
    std::uint64_t offset = 0;
    for (const auto& t : tensors) {
        const Shape& s = t.shape();
        const std::uint64_t bytes = static_cast<std::uint64_t>(s.numel()) * (std::holds_alternative<Tensor<float>>(t.value) ? 4 : 8);
        if (header.size() > 1) header += ',';
        append_json_string(header, t.name);
        header += fmt::format(":{{\"dtype\":\"{}\",\"shape\":[", t.dtype());
        for (int i = 0; i < s.rank(); ++i) header += fmt::format("{}{}", i ? "," : "", s[i]);
        header += fmt::format("],\"data_offsets\":[{},{}]}}", offset, offset + bytes);
        offset += bytes;
    }
    header += '}';
    header.append((8 - header.size() % 8) % 8, ' ');

    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out) fail(save_op, "cannot open {} for writing: {}", path, std::strerror(errno));
    const std::uint64_t n = header.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const auto& t : tensors)
        std::visit(
            [&](const auto& v) {
                using T = typename std::decay_t<decltype(v)>::value_type;
                out.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.numel() * std::int64_t{sizeof(T)}));
            },
            t.value);
    out.flush();
    if (!out) fail(save_op, "writing {} failed: {}", path, std::strerror(errno));
}

SafetensorsFile load_safetensors(const std::string& path) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) fail(load_op, "cannot open {}: {}", path, std::strerror(errno));
    const auto file_size = static_cast<std::uint64_t>(in.tellg());
    if (file_size < 8)
        fail(load_op, "{}: the file is truncated: {} bytes, but a safetensors file starts with an 8-byte header length", path, file_size);
    in.seekg(0);
    std::uint64_t n = 0;
    in.read(reinterpret_cast<char*>(&n), 8);
    if (n > max_header_bytes) fail(load_op, "{}: header length {} exceeds the limit of {} bytes", path, n, max_header_bytes);
    if (n > file_size - 8)
        fail(load_op, "{}: the file is truncated: the header needs {} bytes after the length, the file has {}", path, n, file_size - 8);
    std::string header(n, '\0');
    in.read(header.data(), static_cast<std::streamsize>(n));
    if (!in) fail(load_op, "{}: could not read the header", path);

    std::vector<HeaderParser::Entry> entries;
    SafetensorsFile file;
    HeaderParser(header, path).parse(entries, file.metadata);

    const std::uint64_t data_start = 8 + n, data_bytes = file_size - data_start;
    for (const auto& e : entries) {
        std::uint64_t width = 0;
        if (e.dtype == "F32") width = 4;
        else if (e.dtype == "F64") width = 8;
        else fail(load_op, "{}: tensor '{}' has dtype {}; only F32 and F64 are supported", path, e.name, e.dtype);
        if (e.begin > e.end) fail(load_op, "{}: tensor '{}' has data_offsets [{}, {}] with begin > end", path, e.name, e.begin, e.end);
        const auto numel = static_cast<std::uint64_t>(e.shape.numel());
        if (numel > (std::uint64_t{1} << 56) / width || e.end - e.begin != numel * width)
            fail(load_op, "{}: tensor '{}' of shape {} and dtype {} needs {} bytes, but its data_offsets [{}, {}] hold {}", path, e.name,
                 e.shape, e.dtype, numel * width, e.begin, e.end, e.end - e.begin);
        if (e.end > data_bytes)
            fail(load_op, "{}: the file is truncated: tensor '{}' needs bytes [{}, {}) of the data, which has {}", path, e.name, e.begin,
                 e.end, data_bytes);
    }
    std::vector<const HeaderParser::Entry*> order;
    for (const auto& e : entries) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
    std::uint64_t covered = 0;
    for (const auto* e : order) {
        if (e->begin != covered)
            fail(load_op, "{}: tensor '{}' starts at data byte {} but the tensors before it end at {} ({})", path, e->name, e->begin,
                 covered, e->begin < covered ? "overlapping data" : "a gap in the data");
        covered = e->end;
    }
    if (covered != data_bytes)
        fail(load_op, "{}: the tensors cover {} bytes of data but the file has {} after the header", path, covered, data_bytes);

    for (const auto* e : order) {
        if (e->dtype == "F32") file.tensors.push_back({e->name, read_tensor<float>(in, path, *e, data_start)});
        else file.tensors.push_back({e->name, read_tensor<double>(in, path, *e, data_start)});
    }
    return file;
}

}  // namespace autodiff
