// FileAllocationMap: base:allocation for a regular file via lseek(SEEK_DATA / SEEK_HOLE).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "dst/net/nbd_server.h"

namespace dst::net {

Result<std::shared_ptr<FileAllocationMap>> FileAllocationMap::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open " + path);
  return std::shared_ptr<FileAllocationMap>(new FileAllocationMap(fd));
}

FileAllocationMap::~FileAllocationMap() {
  if (fd_ >= 0) ::close(fd_);
}

Status FileAllocationMap::Query(std::uint64_t offset, std::uint64_t length, ExtentSink& sink) {
  const std::uint64_t end = offset + length;
  std::uint64_t pos = offset;
  while (pos < end) {
    off_t d = ::lseek(fd_, static_cast<off_t>(pos), SEEK_DATA);
    if (d < 0) {
      if (errno == ENXIO) {  // no data from pos to EOF (or pos is past EOF): one hole
        sink.Add(end - pos, nbd::kStateHole | nbd::kStateZero);
        return Status::OK();
      }
      if (errno == EINVAL || errno == EOPNOTSUPP) {  // no SEEK_DATA here: everything is data
        sink.Add(end - pos, 0);
        return Status::OK();
      }
      return Status::FromErrno(errno, "lseek SEEK_DATA");
    }
    const std::uint64_t data = static_cast<std::uint64_t>(d);
    if (data > pos) {
      const std::uint64_t n = (data < end ? data : end) - pos;
      if (!sink.Add(n, nbd::kStateHole | nbd::kStateZero)) return Status::OK();
      pos += n;
      continue;
    }
    off_t h = ::lseek(fd_, static_cast<off_t>(pos), SEEK_HOLE);
    if (h < 0) return Status::FromErrno(errno, "lseek SEEK_HOLE");
    std::uint64_t hole = static_cast<std::uint64_t>(h);
    if (hole <= pos) hole = end;  // defensive: never report an empty extent
    const std::uint64_t n = (hole < end ? hole : end) - pos;
    if (!sink.Add(n, 0)) return Status::OK();
    pos += n;
  }
  return Status::OK();
}

bool FileSupportsFastZero(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  struct stat st;
  bool ok = false;
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
    // Punching a hole past EOF (KEEP_SIZE) changes nothing but fails where the filesystem
    // cannot deallocate, which is exactly when zeroing would mean writing data.
    ok = ::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, st.st_size, 4096) == 0;
  }
  ::close(fd);
  return ok;
}

}  // namespace dst::net
