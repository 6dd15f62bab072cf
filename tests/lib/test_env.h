// Shared helpers for dst's Qt Test suites.
//
// Skip policy (DEVELOPERS.md): a test that lacks a capability (root, /dev/fuse, loop devices,
// a tool) calls DST_REQUIRE(cond, "reason").  Outside CI that skips the test and the
// executable exits 77 (CTest SKIP_RETURN_CODE); under CI=true it fails.
#pragma once

#include <QtTest/QtTest>

#include <string>

namespace dst::test {

inline bool InCi() { return qgetenv("CI") == "true"; }
inline bool& SkippedFlag() {
  static bool skipped = false;
  return skipped;
}
// Directory of the build tree (set by CTest); binaries live in $DST_BUILD_DIR/bin.
std::string BuildDir();
std::string BinPath(const char* name);  // e.g. BinPath("dstd")
bool IsRoot();
bool HaveFuse();           // /dev/fuse usable
bool HaveTool(const char* name);  // found in PATH

}  // namespace dst::test

#define DST_REQUIRE(cond, reason)                                    \
  do {                                                               \
    if (!(cond)) {                                                   \
      if (::dst::test::InCi()) QFAIL("required under CI: " reason);  \
      ::dst::test::SkippedFlag() = true;                             \
      QSKIP(reason);                                                 \
    }                                                                \
  } while (0)

// Like QTEST_MAIN / QTEST_GUILESS_MAIN, but exits 77 when a test skipped for a missing capability
// and nothing failed.
#define DST_TEST_MAIN(TestClass)                                      \
  int main(int argc, char** argv) {                                  \
    QCoreApplication app(argc, argv);                                \
    TestClass tc;                                                    \
    int rc = QTest::qExec(&tc, argc, argv);                          \
    if (rc == 0 && ::dst::test::SkippedFlag()) return 77;            \
    return rc;                                                       \
  }
