// Shell completion for dstctl (issue 14 item 2).
//
// `dstctl __complete WORD...` gets the words typed after "dstctl", the last one being the word
// under the cursor (possibly empty), and prints the candidates for it, one per line.  Verbs and
// options come from the same CLI11 tree main() parses with, so they cannot drift; names of
// exports, volumes, arrays, layers and leg slots are asked from dstd (the socket of -S/--socket
// among the words, else the default) with a 1 s limit.  A daemon that is down or slow yields no
// names, never an error or a hang.  The shell scripts in packaging/completion/ only call this.
#pragma once

#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace dst::cli {

// Prints the candidates; returns the exit status (0).
int Complete(const CLI::App& app, const std::vector<std::string>& words, std::string socket);

}  // namespace dst::cli
