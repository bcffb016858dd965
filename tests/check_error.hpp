#pragma once
// The bad-input check shared by the test files: the call must throw autodiff::Error, the message
// must start with "<op>: " and contain every fragment, and nothing may be recorded on the tape.
#include <doctest/doctest.h>

#include <initializer_list>
#include <string>
#include <string_view>

#include <autodiff/autodiff.hpp>

namespace test {

// Checks that f throws autodiff::Error whose message starts with "<op>: " and contains every fragment,
// and that the current tape has as many records afterwards as before.
template <class F>
void check_error(F&& f, std::string_view op, std::initializer_list<std::string_view> fragments,
                 int line = __builtin_LINE()) {  // std::source_location is missing with Clang 14
    INFO("checked at line ", line);
    const std::size_t records = autodiff::current_tape().size();
    std::string message;
    bool threw = false;
    try {
        f();
    } catch (const autodiff::Error& e) {
        threw = true;
        message = e.what();
    }
    INFO("message: \"", message, "\"");
    REQUIRE_MESSAGE(threw, "expected an autodiff::Error from ", op);
    CHECK(message.starts_with(std::string(op) + ": "));
    for (std::string_view part : fragments) {
        INFO("expected fragment: \"", std::string(part), "\"");
        CHECK(message.find(part) != std::string::npos);
    }
    CHECK(autodiff::current_tape().size() == records);
}

}  // namespace test
