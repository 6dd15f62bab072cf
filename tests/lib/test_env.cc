#include "test_env.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>

namespace dst::test {

std::string BuildDir() {
  const char* d = std::getenv("DST_BUILD_DIR");
  return d ? d : ".";
}

std::string BinPath(const char* name) { return BuildDir() + "/bin/" + name; }

bool IsRoot() { return geteuid() == 0; }

bool HaveFuse() { return access("/dev/fuse", R_OK | W_OK) == 0; }

bool HaveTool(const char* name) {
  const char* path = std::getenv("PATH");
  std::string p = path ? path : "/usr/bin:/bin";
  p += ":/usr/sbin:/sbin";
  size_t start = 0;
  while (start <= p.size()) {
    size_t end = p.find(':', start);
    if (end == std::string::npos) end = p.size();
    std::string dir = p.substr(start, end - start);
    if (!dir.empty() && access((dir + "/" + name).c_str(), X_OK) == 0) return true;
    start = end + 1;
  }
  return false;
}

}  // namespace dst::test
