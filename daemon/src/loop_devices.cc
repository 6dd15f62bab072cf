#include "loop_devices.h"

#include <fcntl.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <fmt/format.h>

namespace dst::daemon {

namespace fs = std::filesystem;

namespace {

std::string ReadLine(const fs::path& p) {
  std::ifstream in(p);
  std::string s;
  std::getline(in, s);
  return s;
}

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string Unescape(const std::string& s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() && std::isdigit(static_cast<unsigned char>(s[i + 1]))) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 3), nullptr, 8));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

// "major:minor" -> first mount point of that device, from a mountinfo file.
std::string MountPointOf(const std::string& majmin, const std::string& mountinfo) {
  std::ifstream in(mountinfo);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string id, parent, dev, root, mnt;
    if (!(f >> id >> parent >> dev >> root >> mnt)) continue;
    if (dev == majmin) return Unescape(mnt);
  }
  return {};
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

}  // namespace

std::vector<LoopDevice> LoopDevicesFor(const std::string& file, const std::string& sysfs,
                                       const std::string& mountinfo) {
  std::vector<LoopDevice> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(sysfs, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("loop", 0) != 0) continue;
    const fs::path backing = e.path() / "loop" / "backing_file";
    if (!fs::exists(backing, ec)) continue;  // not configured
    LoopDevice d;
    d.backing_file = ReadLine(backing);
    // The kernel appends " (deleted)" once the file is gone; such a device no longer uses `file`.
    if (d.backing_file != file) continue;
    d.device = "/dev/" + name;
    d.read_only = ReadLine(e.path() / "ro") == "1";
    d.mounted_at = MountPointOf(ReadLine(e.path() / "dev"), mountinfo);
    out.push_back(std::move(d));
  }
  std::sort(out.begin(), out.end(), [](const LoopDevice& a, const LoopDevice& b) {
    return a.device.size() != b.device.size() ? a.device.size() < b.device.size() : a.device < b.device;
  });
  return out;
}

nlohmann::json LoopDevicesJson(const std::string& file) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& d : LoopDevicesFor(file))
    out.push_back({{"device", d.device},
                   {"read_only", d.read_only},
                   {"mounted_at", d.mounted_at.empty() ? nlohmann::json() : nlohmann::json(d.mounted_at)}});
  return out;
}

Result<std::string> AttachLoop(const std::string& file, bool read_only) {
  Fd backing(::open(file.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC));
  if (backing.get() < 0) return Status::FromErrno(errno, "open " + file);
  Fd ctl(::open("/dev/loop-control", O_RDWR | O_CLOEXEC));
  if (ctl.get() < 0) return Status::FromErrno(errno, "open /dev/loop-control");
  // Another process may take the free device between GET_FREE and CONFIGURE (EBUSY): retry.
  for (int attempt = 0; attempt < 8; ++attempt) {
    const int n = ::ioctl(ctl.get(), LOOP_CTL_GET_FREE);
    if (n < 0) return Status::FromErrno(errno, "LOOP_CTL_GET_FREE");
    const std::string dev = fmt::format("/dev/loop{}", n);
    Fd loop(::open(dev.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC));
    if (loop.get() < 0) {
      // udev may not have made the node yet.
      if (errno == ENOENT) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        continue;
      }
      return Status::FromErrno(errno, "open " + dev);
    }
    loop_info64 info{};
    info.lo_flags = read_only ? LO_FLAGS_READ_ONLY : 0;
    std::strncpy(reinterpret_cast<char*>(info.lo_file_name), file.c_str(), LO_NAME_SIZE - 1);
#ifdef LOOP_CONFIGURE
    loop_config cfg{};
    cfg.fd = static_cast<std::uint32_t>(backing.get());
    cfg.info = info;
    if (::ioctl(loop.get(), LOOP_CONFIGURE, &cfg) == 0) return dev;
    if (errno == EBUSY) continue;
    if (errno != EINVAL && errno != ENOTTY) return Status::FromErrno(errno, "LOOP_CONFIGURE " + dev);
#endif
    if (::ioctl(loop.get(), LOOP_SET_FD, backing.get()) != 0) {
      if (errno == EBUSY) continue;
      return Status::FromErrno(errno, "LOOP_SET_FD " + dev);
    }
    if (::ioctl(loop.get(), LOOP_SET_STATUS64, &info) != 0) {
      const int err = errno;
      (void)::ioctl(loop.get(), LOOP_CLR_FD, 0);
      return Status::FromErrno(err, "LOOP_SET_STATUS64 " + dev);
    }
    return dev;
  }
  return Status::Busy("no free loop device after 8 attempts (others are being set up concurrently)");
}

Status DetachLoop(const LoopDevice& d) {
  if (!d.mounted_at.empty())
    return Status::Busy(fmt::format("{} is mounted at {} (unmount it first)", d.device, d.mounted_at));
  {
    Fd loop(::open(d.device.c_str(), O_RDONLY | O_CLOEXEC));
    if (loop.get() < 0) return Status::FromErrno(errno, "open " + d.device);
    if (::ioctl(loop.get(), LOOP_CLR_FD, 0) != 0) {
      if (errno == ENXIO) return Status::OK();  // detached meanwhile
      return Status::FromErrno(errno, "LOOP_CLR_FD " + d.device);
    }
  }  // our own open counts as a user: the kernel detaches (autoclear) when we close it
  // Open elsewhere too (not mounted, but a process holds the device; udev probing for a
  // moment): the kernel only marks it autoclear.  Wait a little, then say so instead of
  // reporting a detach that has not happened yet.
  std::error_code ec;
  const fs::path sys = fs::path("/sys/block") / fs::path(d.device).filename() / "loop" / "backing_file";
  for (int i = 0; i < 100 && fs::exists(sys, ec); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (fs::exists(sys, ec))
    return Status::Busy(fmt::format("{} is open by another process; the kernel detaches it when that "
                                    "process closes it", d.device));
  return Status::OK();
}

}  // namespace dst::daemon
