#include "dst/log_escape.h"

namespace dst {

std::string EscapeForLog(std::string_view s) {
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  std::size_t n = s.size() < kMaxLogField ? s.size() : kMaxLogField;
  out.reserve(n + 16);
  for (std::size_t i = 0; i < n; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c >= 0x7f || c == '\\') {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += char(c);
    }
  }
  if (n < s.size()) out += "...(" + std::to_string(s.size()) + " bytes)";
  return out;
}

}  // namespace dst
