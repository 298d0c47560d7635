#pragma once
// Errors are values (STYLE.md §2). C++20 has no std::expected, so this is a
// minimal one: a Result<T> holds either a T or an Error with a named code.

#include <cerrno>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

#include <fmt/format.h>

namespace vg {

enum class Errc : uint16_t {
#define VG_ERRC(name, value, err, desc) name = value,
#include "abi/errc.def"
#undef VG_ERRC
};

// Stable, greppable name ("kOutOfBounds") for logs and for the guest tools.
std::string_view ErrcName(Errc c);
std::string_view ErrcDescription(Errc c);
// The errno a vfio-user error reply carries for this code.
int ErrcToErrno(Errc c);
// Parses a numeric code read back from the device (unknown -> kInternal).
Errc ErrcFromValue(uint32_t v);

struct Error {
  Errc code = Errc::kInternal;
  std::string what;

  std::string ToString() const;
};

struct Unexpected {
  Error error;
};

inline Unexpected MakeError(Errc code, std::string what) { return Unexpected{Error{code, std::move(what)}}; }

template <class... Args>
Unexpected MakeError(Errc code, fmt::format_string<Args...> f, Args&&... args) {
  return Unexpected{Error{code, fmt::format(f, std::forward<Args>(args)...)}};
}

template <class T = void>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit by design
  Result(Unexpected u) : v_(std::in_place_index<1>, std::move(u.error)) {}  // NOLINT
  Result(Error e) : v_(std::in_place_index<1>, std::move(e)) {}  // NOLINT

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  const Error& error() const& { return std::get<1>(v_); }
  Error&& error() && { return std::get<1>(std::move(v_)); }
  Errc code() const { return ok() ? Errc::kOk : error().code; }

  T value_or(T fallback) const& { return ok() ? value() : std::move(fallback); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Unexpected u) : err_(std::move(u.error)), has_err_(true) {}  // NOLINT
  Result(Error e) : err_(std::move(e)), has_err_(true) {}  // NOLINT

  bool ok() const { return !has_err_; }
  explicit operator bool() const { return ok(); }
  void value() const {}
  const Error& error() const& { return err_; }
  Error&& error() && { return std::move(err_); }
  Errc code() const { return ok() ? Errc::kOk : err_.code; }

 private:
  Error err_;
  bool has_err_ = false;
};

inline Result<> Ok() { return {}; }

}  // namespace vg

#define VG_CONCAT_INNER(a, b) a##b
#define VG_CONCAT(a, b) VG_CONCAT_INNER(a, b)

// Propagates an error; evaluates `expr` once.
#define VG_TRY(expr)                                              \
  do {                                                            \
    auto vg_try_r_ = (expr);                                      \
    if (!vg_try_r_.ok()) [[unlikely]]                             \
      return ::vg::Unexpected{std::move(vg_try_r_).error()};      \
  } while (0)

// Propagates an error and prefixes context: "what we were doing: cause".
#define VG_TRY_CTX(expr, ...)                                                        \
  do {                                                                               \
    auto vg_try_r_ = (expr);                                                         \
    if (!vg_try_r_.ok()) [[unlikely]] {                                              \
      ::vg::Error vg_e_ = std::move(vg_try_r_).error();                              \
      vg_e_.what = fmt::format(__VA_ARGS__) + ": " + vg_e_.what;                     \
      return ::vg::Unexpected{std::move(vg_e_)};                                     \
    }                                                                                \
  } while (0)

#define VG_TRY_ASSIGN_IMPL(tmp, lhs, expr)                  \
  auto tmp = (expr);                                        \
  if (!tmp.ok()) [[unlikely]]                               \
    return ::vg::Unexpected{std::move(tmp).error()};        \
  lhs = std::move(tmp).value()

// VG_TRY_ASSIGN(auto x, Foo()); or VG_TRY_ASSIGN(x, Foo());
#define VG_TRY_ASSIGN(lhs, expr) VG_TRY_ASSIGN_IMPL(VG_CONCAT(vg_try_a_, __LINE__), lhs, expr)

#define VG_INVALID_IF(cond, ...) \
  if (cond) [[unlikely]]         \
  return ::vg::MakeError(::vg::Errc::kInvalidArgument, __VA_ARGS__)

#define VG_ERROR_IF(cond, code, ...) \
  if (cond) [[unlikely]]             \
  return ::vg::MakeError(code, __VA_ARGS__)
