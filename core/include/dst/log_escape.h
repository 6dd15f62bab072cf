// EscapeForLog: a string a peer sent (an NBD or DST export name, an error text), made safe to
// put in one log line: control bytes, newlines, DEL, bytes >= 0x80 and the backslash become \xNN,
// and at most kMaxLogField input bytes are kept ("...(N bytes)" says how long it was).  So a
// name with "\n" cannot forge a line, and a 4 KiB name cannot flood the journal.
// Thread-safe (a pure function).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace dst {

inline constexpr std::size_t kMaxLogField = 256;

std::string EscapeForLog(std::string_view s);

}  // namespace dst
