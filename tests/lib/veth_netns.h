// A veth pair between two network namespaces that the test (or benchmark) creates and always
// removes, for raw-Ethernet tests that must never touch another interface.
//
//   VethNetns v;  if (!v.Create(&err)) skip;   // netns <p>a / <p>b, veth <p>0 (in a) <-> <p>1 (in b)
//   { InNetns in(v.ns(0)); open sockets... }   // sockets keep the namespace they were made in
//
// Deleting a namespace deletes the veth end in it (and with it the peer); Create first removes
// namespaces of this naming scheme whose process is gone (a run that crashed).  Needs CAP_SYS_ADMIN
// and the `ip` tool.  Header-only: shared by tests/integration and bench/.
#pragma once

#include <dirent.h>
#include <net/if.h>
#include <linux/if_packet.h>
#include <sys/socket.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace dst::test {

class VethNetns {
 public:
  VethNetns() {
    static int counter = 0;
    prefix_ = "dste" + std::to_string(::getpid()) + char('a' + counter++ % 26);  // ifnames <= 13 chars
  }
  ~VethNetns() { Destroy(); }
  VethNetns(const VethNetns&) = delete;
  VethNetns& operator=(const VethNetns&) = delete;

  // Creates both namespaces and the pair, links up.  On failure, removes what it made.
  bool Create(std::string* err, unsigned mtu = 1500) {
    RemoveStale();
    created_ = true;
    const std::string a = ns(0), b = ns(1);
    const std::string cmds[] = {
        "ip netns add " + a,
        "ip netns add " + b,
        "ip -n " + a + " link add " + ifname(0) + " mtu " + std::to_string(mtu) + " type veth peer name " +
            ifname(1) + " netns " + b + " mtu " + std::to_string(mtu),
        "ip -n " + a + " link set " + ifname(0) + " up",
        "ip -n " + b + " link set " + ifname(1) + " up",
        // Loopback too: daemons started inside bind their TCP and NBD listeners to 127.0.0.1.
        "ip -n " + a + " link set lo up",
        "ip -n " + b + " link set lo up",
    };
    for (const std::string& c : cmds) {
      if (std::system((c + " 2>/dev/null").c_str()) != 0) {
        *err = "failed: " + c;
        Destroy();
        return false;
      }
    }
    return true;
  }
  void Destroy() {
    if (!created_) return;
    created_ = false;
    std::system(("ip netns del " + ns(0) + " 2>/dev/null").c_str());
    std::system(("ip netns del " + ns(1) + " 2>/dev/null").c_str());
  }

  // Namespaces of this naming scheme left by a run that crashed (its pid is gone).
  static void RemoveStale() {
    DIR* d = ::opendir("/var/run/netns");
    if (!d) return;
    while (const dirent* e = ::readdir(d)) {
      const std::string n = e->d_name;
      if (n.rfind("dste", 0) != 0 || n.size() < 7) continue;
      const std::string digits = n.substr(4, n.size() - 6);
      if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) continue;
      const long pid = std::atol(digits.c_str());
      if (pid > 0 && ::kill(pid_t(pid), 0) != 0 && errno == ESRCH)
        std::system(("ip netns del " + n + " 2>/dev/null").c_str());
    }
    ::closedir(d);
  }

  std::string ns(int i) const { return prefix_ + (i ? "b" : "a"); }
  std::string ifname(int i) const { return prefix_ + (i ? "1" : "0"); }

 private:
  std::string prefix_;
  bool created_ = false;
};

// Moves the calling thread into network namespace `name` (from `ip netns add`) for its scope.
class InNetns {
 public:
  explicit InNetns(const std::string& name) {
    self_ = ::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    const int fd = ::open(("/var/run/netns/" + name).c_str(), O_RDONLY | O_CLOEXEC);
    ok_ = self_ >= 0 && fd >= 0 && ::setns(fd, CLONE_NEWNET) == 0;
    if (fd >= 0) ::close(fd);
  }
  ~InNetns() {
    if (self_ >= 0) {
      if (ok_) ::setns(self_, CLONE_NEWNET);
      ::close(self_);
    }
  }
  InNetns(const InNetns&) = delete;
  InNetns& operator=(const InNetns&) = delete;
  bool ok() const { return ok_; }

 private:
  int self_ = -1;
  bool ok_ = false;
};

// Sends one hand-made frame (from the destination MAC on) through a plain AF_PACKET socket on
// `ifname`, in the calling thread's namespace: malformed-frame tests.
inline bool InjectFrame(const std::string& ifname, const std::vector<std::uint8_t>& frame) {
  const int fd = ::socket(AF_PACKET, SOCK_RAW, 0);
  if (fd < 0) return false;
  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_ifindex = int(if_nametoindex(ifname.c_str()));
  sll.sll_halen = 6;
  std::memcpy(sll.sll_addr, frame.data(), 6);
  const ssize_t n = ::sendto(fd, frame.data(), frame.size(), 0, reinterpret_cast<sockaddr*>(&sll), sizeof sll);
  ::close(fd);
  return n == ssize_t(frame.size());
}

}  // namespace dst::test
