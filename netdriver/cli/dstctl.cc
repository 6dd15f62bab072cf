// dstctl: command-line client of dstd's control socket.  See dstctl(8).
//
// Human output is rendered from the same JSON `--json` prints (dst/daemon/render.h).  Errors are
// one line "dstctl: <message>" on stderr with a sysexits code:
//   64 usage, 65 bad data (unknown or duplicate name, bad parameter), 69 dstd not running or a
//   remote unreachable, 74 I/O error, 75 busy / try again, 76 protocol error, 77 no permission.
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "dst/daemon/control_client.h"
#include "dst/daemon/control_protocol.h"
#include "dst/daemon/render.h"

namespace {

namespace ctl = dst::control;
using nlohmann::json;

int Fail(int code, const std::string& msg) {
  std::fprintf(stderr, "dstctl: %s\n", msg.c_str());
  return code;
}

std::string Absolute(const std::string& p) {
  std::error_code ec;
  auto a = std::filesystem::absolute(p, ec);
  return ec ? p : a.lexically_normal().string();
}

std::string DefaultSocket() {
  const char* s = std::getenv("DST_SOCKET");
  return (s && *s) ? s : "/run/dst/dstd.sock";
}

// Runs one request; on success stores the result.  Returns 0 or the exit code (after printing).
int Call(const std::string& socket, const std::string& method, const json& params, json* result) {
  ctl::ControlClient client;
  if (int err = client.Connect(socket); err != 0) {
    std::string why = std::strerror(err);
    if (err == EACCES || err == EPERM)
      return Fail(ctl::kExNoPerm, fmt::format("cannot connect to dstd at {}: {} (run as root or "
                                              "a member of the socket's group)", socket, why));
    return Fail(ctl::kExUnavailable,
                fmt::format("cannot connect to dstd at {}: {} (is dstd running? use --socket or "
                            "DST_SOCKET to point at its control socket)", socket, why));
  }
  ctl::Reply reply;
  std::string why;
  if (!client.Call(method, params, &reply, &why)) {
    bool protocol = why.find("reply") != std::string::npos || why.find("malformed") != std::string::npos;
    return Fail(protocol ? ctl::kExProtocol : ctl::kExUnavailable,
                fmt::format("{}: {}", method, why));
  }
  if (!reply.ok) return Fail(ctl::ExitCodeForError(reply.error_code), reply.error_message);
  *result = std::move(reply.result);
  return 0;
}

void PrintJson(const json& j) { std::printf("%s\n", j.dump(2).c_str()); }

}  // namespace

int main(int argc, char** argv) {
  std::string socket = DefaultSocket();
  bool as_json = false;

  CLI::App app{"dstctl - control the dst daemon (dstd) over its control socket"};
  app.set_version_flag("--version", "0.1.0");
  app.add_option("-S,--socket", socket, "dstd control socket ($DST_SOCKET, /run/dst/dstd.sock)")
      ->capture_default_str();
  app.add_flag("-j,--json", as_json, "Print the raw JSON result");
  app.require_subcommand(1);
  app.fallthrough();

  // export ...
  auto* exp = app.add_subcommand("export", "Manage exports (images served to other hosts)");
  exp->require_subcommand(1);
  std::string name, path, size, uri, dir;
  bool read_only = false, direct_io = false;
  int queue_depth = 0, timeout = 0, keepalive = 0;

  auto* exp_add = exp->add_subcommand("add", "Export an image file or block device");
  exp_add->add_option("NAME", name, "Export name")->required();
  exp_add->add_option("PATH", path, "Image file or block device")->required();
  exp_add->add_flag("--read-only", read_only, "Refuse writes");
  exp_add->add_flag("--direct-io", direct_io, "Open with O_DIRECT");
  exp_add->add_option("--size", size, "Create/extend the image to this size (e.g. 1G, 512M)");
  auto* exp_list = exp->add_subcommand("list", "List exports");
  auto* exp_rm = exp->add_subcommand("remove", "Stop exporting (fails while clients are connected)");
  exp_rm->add_option("NAME", name, "Export name")->required();

  // volume ...
  auto* vol = app.add_subcommand("volume", "Manage volumes (devices this host uses)");
  vol->require_subcommand(1);
  auto* vol_imp = vol->add_subcommand("import", "Attach a remote export (dst://HOST:PORT/EXPORT) or a local image");
  vol_imp->add_option("NAME", name, "Volume name")->required();
  vol_imp->add_option("URI", uri, "dst://HOST[:PORT]/EXPORT, or an image path")->required();
  vol_imp->add_option("--queue-depth", queue_depth, "Requests in flight (1-1024, default 64)")
      ->check(CLI::Range(1, 1024));
  vol_imp->add_option("--timeout", timeout, "Seconds an outage may last before I/O fails (default 60)")
      ->check(CLI::Range(1, 86400));
  vol_imp->add_option("--keepalive", keepalive, "Seconds without an answer before reconnecting (default 5)")
      ->check(CLI::Range(1, 3600));
  auto* vol_list = vol->add_subcommand("list", "List volumes");
  auto* vol_rm = vol->add_subcommand("remove", "Detach a volume (fails while its image file is open)");
  vol_rm->add_option("NAME", name, "Volume name")->required();

  auto* mnt = app.add_subcommand("mount", "Mount the FUSE file system showing <volume>.img files");
  mnt->add_option("DIR", dir, "Mount point (created if missing)")->required();
  auto* umnt = app.add_subcommand("unmount", "Unmount the FUSE file system (fails while a file is open)");
  auto* status = app.add_subcommand("status", "Show daemon, exports, volumes and mount");

  for (auto* sc : {exp_add, exp_list, exp_rm, vol_imp, vol_list, vol_rm, mnt, umnt, status})
    sc->add_flag("-j,--json", as_json, "Print the raw JSON result");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    return Fail(ctl::kExUsage, fmt::format("{} (see dstctl --help)", e.what()));
  }

  json result;
  int rc = 0;
  if (exp_add->parsed()) {
    json p{{"name", name}, {"path", Absolute(path)}, {"read_only", read_only},
           {"direct_io", direct_io}};
    if (!size.empty()) p["size"] = size;
    if ((rc = Call(socket, "export.add", p, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("export %s added: %s, %s\n", name.c_str(),
                     ctl::FormatSize(result.value("size", std::uint64_t{0})).c_str(),
                     result.value("device", std::string("?")).c_str());
  } else if (exp_list->parsed()) {
    if ((rc = Call(socket, "export.list", json::object(), &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::fputs(ctl::RenderExportList(result.value("exports", json::array())).c_str(), stdout);
  } else if (exp_rm->parsed()) {
    if ((rc = Call(socket, "export.remove", json{{"name", name}}, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("export %s removed\n", name.c_str());
  } else if (vol_imp->parsed()) {
    if (uri.find("://") == std::string::npos) uri = Absolute(uri);
    json p{{"name", name}, {"uri", uri}};
    if (queue_depth) p["queue_depth"] = queue_depth;
    if (timeout) p["io_timeout"] = timeout;
    if (keepalive) p["keepalive_timeout"] = keepalive;
    if ((rc = Call(socket, "volume.import", p, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("volume %s imported: %s, %s%s%s\n", name.c_str(),
                     ctl::FormatSize(result.value("size", std::uint64_t{0})).c_str(),
                     result.value("state", std::string("?")).c_str(),
                     result.contains("file") && result["file"].is_string() ? ", file " : "",
                     result.contains("file") && result["file"].is_string()
                         ? result["file"].get<std::string>().c_str() : "");
  } else if (vol_list->parsed()) {
    if ((rc = Call(socket, "volume.list", json::object(), &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::fputs(ctl::RenderVolumeList(result.value("volumes", json::array())).c_str(), stdout);
  } else if (vol_rm->parsed()) {
    if ((rc = Call(socket, "volume.remove", json{{"name", name}}, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("volume %s removed\n", name.c_str());
  } else if (mnt->parsed()) {
    if ((rc = Call(socket, "mount", json{{"path", Absolute(dir)}}, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("mounted at %s\n", result.value("mount", dir).c_str());
  } else if (umnt->parsed()) {
    if ((rc = Call(socket, "unmount", json::object(), &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("unmounted\n");
  } else if (status->parsed()) {
    if ((rc = Call(socket, "status", json::object(), &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::fputs(ctl::RenderStatus(result).c_str(), stdout);
  }
  return 0;
}
