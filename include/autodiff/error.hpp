#pragma once
// autodiff::Error and the one helper that formats every message the library throws.
//
// Every message starts with the operation's name, then names the argument and the shapes involved:
//   "matmul: inner dimensions differ: lhs (2,8,128,64) vs rhs (2,8,32,128)"

#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

namespace autodiff {

class Error : public std::runtime_error {
public:
    explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// Throws Error("<op>: <formatted message>").
template <class... Args>
[[noreturn]] void fail(std::string_view op, fmt::format_string<Args...> format, Args&&... args) {
    throw Error(fmt::format("{}: {}", op, fmt::format(format, std::forward<Args>(args)...)));
}

}  // namespace autodiff
