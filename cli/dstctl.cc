// dstctl: command-line client of dstd's control socket.  See dstctl(8).
//
// Human output is rendered from the same JSON `--json` prints (dst/control/render.h).  Errors are
// one line "dstctl: <message>" on stderr with a sysexits code:
//   64 usage, 65 bad data (unknown or duplicate name, bad parameter), 69 dstd not running or a
//   remote unreachable, 74 I/O error, 75 busy / try again, 76 protocol error, 77 no permission.
//   `array verify` exits 1 when it found mismatches it did not repair (render.h).
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <thread>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "dst/control/control_client.h"
#include "dst/control/control_protocol.h"
#include "dst/control/ops.h"
#include "dst/control/render.h"
#include "dst/net/tls.h"
#include "complete.h"

namespace {

namespace ctl = dst::control;
namespace net = dst::net;
using dst::Status;
using nlohmann::json;

int Fail(int code, const std::string& msg) {
  std::fprintf(stderr, "dstctl: %s\n", msg.c_str());
  return code;
}

bool g_json = false;  // --json: errors are also printed as JSON on stdout

// Exports are default deny (docs/security.md): say so when nobody may connect.
void WarnNobody(const std::string& name, const std::vector<std::string>& allow) {
  if (allow.empty())
    std::fprintf(stderr, "dstctl: warning: export %s allows nobody: no client can connect "
                         "(give --allow IDENTITY:rw, or anonymous:rw for plaintext clients)\n", name.c_str());
}

// An error reply: one line on stderr; a refused operation with several reasons lists each (code,
// object, owner) below it.  --json prints the whole error object, reasons included.
int FailReply(const ctl::Reply& reply) {
  if (g_json) {
    json e{{"code", reply.error_code}, {"message", reply.error_message}};
    if (!reply.error_reasons.empty()) e["reasons"] = reply.error_reasons;
    std::printf("%s\n", json{{"error", e}}.dump(2).c_str());
  }
  int rc = Fail(ctl::ExitCodeForError(reply.error_code), reply.error_message);
  if (reply.error_reasons.size() > 1)
    for (auto& j : reply.error_reasons) {
      ctl::Refusal r;
      if (!ctl::FromJson(j, &r)) continue;
      std::fprintf(stderr, "dstctl:   %s: %s%s\n", ctl::RefusalCodeName(r.code), r.message.c_str(),
                   r.owner.empty() ? "" : fmt::format(" (held by {})", r.owner).c_str());
    }
  return rc;
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

// Connects and asks `hello` first: a daemon too old for this dstctl (or without `feature`) is
// refused with a sentence saying so.  Returns 0 or the exit code (after printing).
int Connect(ctl::ControlClient& client, const std::string& socket, std::string_view feature = {},
            ctl::Hello* hello = nullptr) {
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
  if (!client.Call("hello", json::object(), &reply, &why))
    return Fail(ctl::kExUnavailable, fmt::format("hello: {}", why));
  if (std::string bad = ctl::CheckHello(reply, feature, hello); !bad.empty()) {
    if (!reply.ok && reply.error_code != ctl::kUnknownMethod)
      return Fail(ctl::ExitCodeForError(reply.error_code), bad);
    return Fail(ctl::kExProtocol, bad);
  }
  return 0;
}

// Runs one request; on success stores the result.  Returns 0 or the exit code (after printing).
int Call(const std::string& socket, const std::string& method, const json& params, json* result) {
  ctl::ControlClient client;
  if (int rc = Connect(client, socket); rc != 0) return rc;
  ctl::Reply reply;
  std::string why;
  if (!client.Call(method, params, &reply, &why)) {
    bool protocol = why.find("reply") != std::string::npos || why.find("malformed") != std::string::npos;
    return Fail(protocol ? ctl::kExProtocol : ctl::kExUnavailable,
                fmt::format("{}: {}", method, why));
  }
  if (!reply.ok) return FailReply(reply);
  *result = std::move(reply.result);
  return 0;
}

// A change: the typed request (dst/control/ops.h) on the wire.
int Call(const std::string& socket, const ctl::OpRequest& op, json* result) {
  return Call(socket, ctl::MethodOf(op), ctl::ToParams(op), result);
}

void PrintJson(const json& j) { std::printf("%s\n", j.dump(2).c_str()); }

// Leg specs: relative paths become absolute (dstd's working directory is not ours).
std::string LegSpec(const std::string& s) {
  if (s.find("://") != std::string::npos || s.rfind("volume:", 0) == 0 ||
      s.rfind("array:", 0) == 0)
    return s;
  return Absolute(s);
}

// `dstctl events`: subscribe (--since N: resume after event N), then print every line until the
// daemon goes away.  A gap (N older than the daemon's ring, or another dstd run) is said on
// stderr and the stream goes on with a fresh snapshot.
int Events(const std::string& socket, bool as_json, std::optional<std::uint64_t> since) {
  ctl::ControlClient client;
  if (int rc = Connect(client, socket, since ? "events_since" : ""); rc != 0) return rc;
  ctl::Reply reply;
  std::string why;
  json params = json::object();
  if (since) params["since"] = *since;
  if (!client.Call("events", params, &reply, &why))
    return Fail(ctl::kExUnavailable, fmt::format("events: {}", why));
  if (!reply.ok) return FailReply(reply);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::string line;
  while (client.ReadLine(&line, &why)) {
    json g = json::parse(line, nullptr, false);
    if (g.is_object() && g.value("type", "") == "gap")
      std::fprintf(stderr, "dstctl: events: %s", ctl::RenderEvent(g).c_str());
    if (as_json) {
      std::printf("%s\n", line.c_str());
    } else {
      json e = json::parse(line, nullptr, false);
      if (e.is_discarded()) continue;
      std::fputs(ctl::RenderEvent(e).c_str(), stdout);
    }
    std::fflush(stdout);
  }
  return Fail(ctl::kExUnavailable, fmt::format("events: {}", why));
}

// `dstctl version`: this dstctl, then dstd's hello (refused if dstd is too old).
int Version(const std::string& socket, bool as_json) {
  ctl::ControlClient client;
  ctl::Hello h;
  ctl::Reply reply;
  std::string why;
  if (int rc = Connect(client, socket, {}, &h); rc != 0) return rc;
  if (!client.Call("hello", json::object(), &reply, &why))
    return Fail(ctl::kExUnavailable, fmt::format("hello: {}", why));
  if (as_json) {
    PrintJson(json{{"dstctl", {{"version", DST_VERSION}, {"protocol", ctl::kProtocolVersion}}},
                   {"dstd", reply.result}});
    return 0;
  }
  auto join = [](const std::vector<std::string>& v) {
    std::string s;
    for (const auto& e : v) s += (s.empty() ? "" : " ") + e;
    return s;
  };
  std::printf("dstctl %s (control protocol %d)\n", DST_VERSION, ctl::kProtocolVersion);
  std::printf("dstd   %s (control protocol %d)\n", h.daemon_version.c_str(), h.protocol);
  std::printf("layers:   %s\nfeatures: %s\nmethods:  %s\n", join(h.layers).c_str(),
              join(h.features).c_str(), join(h.methods).c_str());
  return 0;
}

// `dstctl array verify`: start (or cancel) a verify; by default wait for it, then for the resync
// of what --repair marked, and print the result.  Exit codes: render.h VerifyExitCode.
int Verify(const std::string& socket, const std::string& name, bool repair, bool cancel,
           bool no_wait, bool as_json) {
  json result;
  if (int rc = Call(socket, ctl::VerifyOp{name, repair, cancel}, &result); rc != 0) return rc;
  if (cancel || no_wait) {
    if (as_json) PrintJson(result);
    else if (cancel) std::printf("verify of %s: cancel requested\n", name.c_str());
    else std::printf("verify of %s started%s (dstctl detail %s shows its progress)\n", name.c_str(),
                     repair ? " with --repair" : "", name.c_str());
    return 0;
  }
  const json run = result["verify"].value("run", json());
  const bool tty = !as_json && isatty(STDOUT_FILENO);
  json detail, v;
  auto poll = [&]() -> int {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    if (int rc = Call(socket, "array.detail", json{{"name", name}}, &detail); rc != 0) return rc;
    v = detail.value("verify", json());
    if (!v.is_object() || v.value("run", json()) != run)
      return Fail(ctl::kExTempFail, fmt::format("verify of {} was interrupted (the array was "
                                                "re-assembled)", name));
    return 0;
  };
  for (;;) {
    if (int rc = poll(); rc != 0) return rc;
    if (v.value("state", "") != "running") break;
    if (tty) std::printf("\r\033[K%s", ctl::RenderVerifyProgress(v).c_str()), std::fflush(stdout);
  }
  // --repair: the marked regions are copied by the normal resync; wait for it to finish.
  while (v.value("state", "") == "done" && v.value("repaired_regions", 0) > 0 &&
         detail.value("state", "") == "resyncing") {
    if (tty) std::printf("\r\033[Kresyncing the repaired regions"), std::fflush(stdout);
    if (int rc = poll(); rc != 0) return rc;
  }
  if (tty) std::printf("\r\033[K");
  if (as_json) PrintJson(v);
  else std::fputs(ctl::RenderVerify(v, name).c_str(), stdout);
  if (v.value("repaired_regions", 0) > 0 && detail.value("state", "") != "clean")
    return Fail(ctl::kExIoErr, fmt::format("array {} is {} after the repair resync (see dstctl "
                                           "detail {})", name, detail.value("state", "?"), name));
  return ctl::VerifyExitCode(v);
}

// `batch` (docs/control.md): the ops file as is; refusals name the operation (its index) they
// belong to, a failed step stops the run (exit code of its error), as apply.
int Batch(const std::string& socket, const std::string& file, bool dry_run, bool as_json) {
  std::string text;
  std::FILE* f = file == "-" ? stdin : std::fopen(file.c_str(), "rb");
  if (!f) return Fail(ctl::kExNoInput, fmt::format("{}: {}", file, std::strerror(errno)));
  char buf[65536];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  if (f != stdin) std::fclose(f);
  json ops = json::parse(text, nullptr, false);
  if (ops.is_object() && ops.contains("ops")) ops = ops["ops"];
  if (ops.is_discarded() || !ops.is_array())
    return Fail(ctl::kExDataErr, fmt::format("{}: not a JSON list of operations", file));
  json result;
  if (int rc = Call(socket, "batch", json{{"ops", ops}, {"dry_run", dry_run}}, &result); rc != 0)
    return rc;
  if (as_json) PrintJson(result);
  if (!result.value("valid", true)) {
    std::string first;
    const json& res_ops = result["ops"];
    for (std::size_t i = 0; i < res_ops.size(); ++i)
      for (auto& j : res_ops[i].value("reasons", json::array())) {
        ctl::Refusal r;
        if (!ctl::FromJson(j, &r)) continue;
        if (first.empty()) first = ctl::ErrorCodeForRefusal(r.code);
        std::fprintf(stderr, "dstctl: batch: operation %zu (%s) refused: %s: %s%s\n", i,
                     res_ops[i].value("method", std::string()).c_str(), ctl::RefusalCodeName(r.code),
                     r.message.c_str(), r.owner.empty() ? "" : fmt::format(" (held by {})", r.owner).c_str());
      }
    std::fprintf(stderr, "dstctl: batch refused, nothing changed\n");
    return ctl::ExitCodeForError(first);
  }
  if (!as_json) std::fputs(ctl::RenderApply(result).c_str(), stdout);
  if (result.value("failed", false)) {
    std::fprintf(stderr, "dstctl: batch: %s\n", result.value("error", std::string("a step failed")).c_str());
    return ctl::ExitCodeForError(result.value("error_code", std::string("io_error")));
  }
  return 0;
}

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
  bool read_only = false, direct_io = false, grow_image = false;
  int queue_depth = 0, timeout = 0, keepalive = 0;

  std::string exp_array, exp_volume;
  auto* exp_add = exp->add_subcommand("add", "Export an image file, a block device, an array or a volume");
  exp_add->add_option("NAME", name, "Export name")->required();
  exp_add->add_option("PATH", path, "Image file or block device");
  exp_add->add_option("--array", exp_array, "Export this array (arrays stack across hosts)");
  exp_add->add_option("--volume", exp_volume, "Export this volume");
  exp_add->add_flag("--read-only", read_only, "Refuse writes");
  exp_add->add_flag("--direct-io", direct_io, "Open with O_DIRECT");
  exp_add->add_option("--size", size,
                      "Create a new image of this size (e.g. 1G, 512M); an existing image must "
                      "already have it (never shrunk)");
  exp_add->add_flag("--grow", grow_image, "Let --size grow an existing image (never shrinks)");
  std::vector<std::string> allow;
  exp_add->add_option("--allow", allow,
                      "IDENTITY:rw or IDENTITY:ro, repeatable: who may connect (a TLS identity, "
                      "'*' for any authenticated one, 'anonymous' for plaintext peers); none: nobody");
  auto* exp_allow = exp->add_subcommand("allow", "Replace an export's access list (who may connect)");
  exp_allow->add_option("NAME", name, "Export name")->required();
  exp_allow->add_option("--allow", allow, "IDENTITY:rw or IDENTITY:ro, repeatable; none: nobody");
  auto* exp_list = exp->add_subcommand("list", "List exports");
  auto* exp_rm = exp->add_subcommand("remove", "Stop exporting (fails while clients are connected)");
  exp_rm->add_option("NAME", name, "Export name")->required();

  // volume ...
  auto* vol = app.add_subcommand("volume", "Manage volumes (devices this host uses)");
  vol->require_subcommand(1);
  auto* vol_imp = vol->add_subcommand("import", "Attach a remote export (dst://HOST:PORT/EXPORT, dsts:// over TLS, nbd://) or a local image");
  vol_imp->add_option("NAME", name, "Volume name")->required();
  vol_imp->add_option("URI", uri, "dst://HOST[:PORT]/EXPORT, nbd://HOST[:PORT]/EXPORT, or an image path")->required();
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
  // loop ...
  auto* loop = app.add_subcommand("loop", "Loop devices over the FUSE files (losetup, done by dstd)");
  loop->require_subcommand(1);
  bool loop_ro = false;
  auto* loop_att = loop->add_subcommand("attach", "Attach a free /dev/loopN to NAME.img and print it");
  loop_att->add_option("NAME", name, "Volume or array name")->required();
  loop_att->add_flag("--read-only", loop_ro, "Read-only loop device");
  auto* loop_det = loop->add_subcommand("detach", "Detach the loop devices over NAME.img (fails while mounted)");
  loop_det->add_option("NAME", name, "Volume or array name")->required();
  // discover IFACE
  std::string iface;
  double disc_timeout = 1.0;
  auto* disc = app.add_subcommand("discover", "List the DST exports other hosts offer on a raw-Ethernet segment");
  disc->add_option("IFACE", iface, "Local interface on that segment (e.g. eth0)")->required();
  disc->add_option("--timeout", disc_timeout, "Seconds to wait for answers (default 1)")->check(CLI::Range(0.01, 60.0));
  auto* status = app.add_subcommand("status", "Show daemon, exports, volumes, arrays and mount");

  // array ...
  auto* arr = app.add_subcommand("array", "Manage arrays (`dstctl array layers` lists the layers)");
  arr->require_subcommand(1);
  std::string level, region_size, leg, rate_min, rate_max;
  std::vector<std::string> legs, layer_keys;
  bool assume_clean = false, dry_run = false, test = false, force = false;
  int slot = -1, keep = -1;
  auto* arr_create = arr->add_subcommand("create", "Create an array of a layer (mirror, linear, ...)");
  arr_create->add_option("NAME", name, "Array name")->required();
  arr_create->add_option("--level", level, "Layer name (`dstctl array layers` lists them)")->required();
  arr_create->add_option("--set", layer_keys,
                         "A key of the layer, KEY=VALUE (repeatable; `dstctl array layers`)")
      ->allow_extra_args(false)  // one KEY=VALUE per --set: the legs follow
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  arr_create->add_option("LEG", legs,
                         "Legs: dst://HOST[:PORT]/EXPORT, nbd://HOST[:PORT]/NAME, /path, "
                         "volume:NAME, array:NAME")->required();
  arr_create->add_option("--region-size", region_size, "Dirty-map region size (default 64K)");
  arr_create->add_option("--resync-rate-min", rate_min, "Resync floor while busy (default 10M)");
  arr_create->add_option("--resync-rate-max", rate_max, "Resync ceiling when idle (default 200M)");
  arr_create->add_flag("--assume-clean", assume_clean, "Legs are identical: skip the initial sync");
  arr_create->add_flag("--force", force,
                       "Overwrite legs that carry another array's header (never a leg another "
                       "host holds a live claim on)");
  auto* arr_list = arr->add_subcommand("list", "List arrays");
  auto* arr_layers = arr->add_subcommand(
      "layers", "List the layers the daemon knows: their keys, leg rules and help");
  auto* arr_rm = arr->add_subcommand("remove", "Stop an array cleanly and forget it (refused while in use)");
  arr_rm->add_option("NAME", name, "Array name")->required();
  auto* arr_add = arr->add_subcommand("add-leg", "Add a leg (mirror: full resync; linear: append)");
  arr_add->add_option("NAME", name, "Array name")->required();
  arr_add->add_option("LEG", leg, "Leg spec")->required();
  auto* arr_grow = arr->add_subcommand("grow", "Grow a linear array by appending a leg");
  arr_grow->add_option("NAME", name, "Array name")->required();
  arr_grow->add_option("LEG", leg, "Leg spec")->required();
  auto* arr_fail = arr->add_subcommand("fail-leg", "Mark a mirror leg failed");
  auto* arr_rmleg = arr->add_subcommand("remove-leg", "Remove a failed or detached mirror leg (--force: an up-to-date one)");
  auto* arr_readd = arr->add_subcommand("re-add-leg", "Re-add a leg (partial resync if it is the same leg)");
  auto* arr_detach = arr->add_subcommand("detach-leg", "Detach a mirror leg as a point-in-time snapshot");
  for (auto* sc : {arr_fail, arr_rmleg, arr_readd, arr_detach}) {
    sc->add_option("NAME", name, "Array name")->required();
    sc->add_option("SLOT", slot, "Leg slot (see dstctl detail)")->required()->check(CLI::NonNegativeNumber);
  }
  arr_readd->add_option("LEG", leg, "A different device for this slot (full resync)");
  for (auto* sc : {arr_fail, arr_rmleg, arr_detach})
    sc->add_flag("--force", force, "Also act on an up-to-date leg / the last up-to-date leg");
  auto* arr_resolve = arr->add_subcommand(
      "resolve", "End a split brain: keep one leg's data, resync the others from it");
  arr_resolve->add_option("NAME", name, "Array name")->required();
  arr_resolve->add_option("--keep", keep, "Slot whose data is kept")->required()
      ->check(CLI::NonNegativeNumber);
  arr_resolve->add_flag("-n,--dry-run", dry_run, "Show what would be overwritten; change nothing");
  auto* arr_import = arr->add_subcommand(
      "import", "Take over a released mirror from its legs (headers name the array and slots)");
  arr_import->add_option("NAME", name, "Array name on this host")->required();
  arr_import->add_option("LEG", legs, "Leg specs, any order")->required();
  auto* arr_release = arr->add_subcommand(
      "release", "Stop a mirror here cleanly and release its legs' claims (hand-over to another host)");
  arr_release->add_option("NAME", name, "Array name")->required();
  auto* arr_rate = arr->add_subcommand("resync-rate", "Change the resync rate limits live");
  arr_rate->add_option("NAME", name, "Array name")->required();
  arr_rate->add_option("--min", rate_min, "Floor while application I/O is active (e.g. 10M)");
  arr_rate->add_option("--max", rate_max, "Ceiling when idle (e.g. 200M; 0 = unlimited)");

  auto* arr_pause = arr->add_subcommand(
      "pause-resync", "Pause a mirror's resync (until resume-resync or dstd restarts)");
  arr_pause->add_option("NAME", name, "Array name")->required();
  auto* arr_resume = arr->add_subcommand("resume-resync", "Resume a paused resync");
  arr_resume->add_option("NAME", name, "Array name")->required();

  bool repair = false, cancel = false, no_wait = false;
  auto* arr_verify = arr->add_subcommand(
      "verify", "Compare the legs of a mirror region by region at the resync rate");
  arr_verify->add_option("NAME", name, "Array name")->required();
  arr_verify->add_flag("--repair", repair,
                       "Mark mismatching regions out of sync; the resync copies them from the "
                       "source leg");
  arr_verify->add_flag("--cancel", cancel, "Cancel the running verify");
  arr_verify->add_flag("--no-wait", no_wait, "Start the verify and return at once");

  auto* detail = app.add_subcommand("detail", "Show one array in mdadm --detail style");
  detail->add_option("NAME", name, "Array name")->required();
  detail->add_flag("--test", test, "Exit 0 healthy, 1 degraded, 2 unusable, 4 error");

  std::string file;
  auto* apply = app.add_subcommand("apply", "Reconcile exports, volumes and arrays with a config file");
  apply->add_option("FILE", file, "TOML file ([[export]], [[volume]], [[array]])")->required();
  apply->add_flag("-n,--dry-run", dry_run, "Print the plan without changing anything");
  bool prune = false;
  apply->add_flag("--prune", prune,
                  "Also remove exports, volumes and arrays that are not in the file");

  std::string batch_file;
  auto* batch = app.add_subcommand(
      "batch", "Validate a list of typed operations in order, then run them as one plan");
  batch->add_option("FILE", batch_file,
                    "JSON list of {\"method\", \"params\"} operations (or {\"ops\": [...]}); - reads stdin")
      ->required();
  batch->add_flag("-n,--dry-run", dry_run, "Validate and print the plan without changing anything");

  auto* events = app.add_subcommand("events", "Stream state changes and resync progress (NDJSON with --json)");
  std::uint64_t since_seq = 0;
  auto* since_opt = events->add_option(
      "--since", since_seq,
      "Resume after event number N (its \"seq\"): replay what came after it, then stream");
  auto* version = app.add_subcommand("version", "Show dstctl's and dstd's versions and what dstd offers");
  auto* key = app.add_subcommand("key", "TLS pre-shared keys (docs/security.md)");
  key->require_subcommand(1);
  auto* key_gen = key->add_subcommand(
      "generate", "Write a new PSK file: one identity:hexkey line (32 random bytes), mode 0600");
  std::string key_identity, key_file;
  bool key_force = false;
  key_gen->add_option("--identity", key_identity, "The identity the key is known by (default: this host's name)");
  key_gen->add_flag("--force", key_force, "Overwrite FILE if it exists");
  key_gen->add_option("FILE", key_file, "The key file to write")->required();

  for (auto* sc : {exp_add, exp_list, exp_rm, vol_imp, vol_list, vol_rm, mnt, umnt, status,
                   arr_create, arr_list, arr_rm, arr_add, arr_grow, arr_fail, arr_rmleg,
                   arr_readd, arr_detach, arr_rate, arr_pause, arr_resume, arr_verify, arr_resolve, arr_release, arr_import, detail,
                   apply, events, version})
    sc->add_flag("-j,--json", as_json, "Print the raw JSON result");

  // Shell completion (packaging/completion/): before parsing, since the words are incomplete.
  if (argc >= 2 && std::strcmp(argv[1], "__complete") == 0)
    return dst::cli::Complete(app, std::vector<std::string>(argv + 2, argv + argc), socket);

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

  g_json = as_json;
  if (key_gen->parsed()) {  // local only: no daemon involved
    if (key_identity.empty()) {
      char host[256] = {};
      ::gethostname(host, sizeof host - 1);
      key_identity = host;
    }
    if (Status st = net::GeneratePskFile(key_file, key_identity, key_force); !st.ok())
      return Fail(st.code() == Status::Code::kExists ? ctl::kExUsage : ctl::kExIoErr, st.message());
    std::printf("wrote %s: identity \"%s\", 256-bit key, mode 0600\n", key_file.c_str(), key_identity.c_str());
    return 0;
  }
  json result;
  int rc = 0;
  auto print_array = [&](const char* what) {
    if (as_json) PrintJson(result);
    else std::printf("array %s: %s (%s)\n", name.c_str(), what,
                     result.value("state", std::string("?")).c_str());
  };
  if (exp_add->parsed()) {
    if (int(!path.empty()) + int(!exp_array.empty()) + int(!exp_volume.empty()) != 1)
      return Fail(ctl::kExUsage, "export add: give exactly one of PATH, --array, --volume");
    ctl::ExportAddOp op{name, path.empty() ? "" : Absolute(path), exp_array, exp_volume, size,
                        read_only, direct_io, grow_image, allow};
    if ((rc = Call(socket, op, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("export %s added: %s, %s\n", name.c_str(),
                     ctl::FormatSize(result.value("size", std::uint64_t{0})).c_str(),
                     result.value("device", std::string("?")).c_str());
    WarnNobody(name, allow);
  } else if (exp_allow->parsed()) {
    if ((rc = Call(socket, ctl::ExportAllowOp{name, allow}, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("export %s allows %s\n", name.c_str(),
                     allow.empty() ? "nobody" : fmt::format("{}", fmt::join(allow, ", ")).c_str());
    WarnNobody(name, allow);
  } else if (exp_list->parsed()) {
    if ((rc = Call(socket, "export.list", json::object(), &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::fputs(ctl::RenderExportList(result.value("exports", json::array())).c_str(), stdout);
  } else if (exp_rm->parsed()) {
    if ((rc = Call(socket, ctl::ExportRemoveOp{name}, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("export %s removed\n", name.c_str());
  } else if (vol_imp->parsed()) {
    if (uri.find("://") == std::string::npos) uri = Absolute(uri);
    ctl::VolumeImportOp op{name, uri, {}, {}, {}};
    if (queue_depth) op.queue_depth = std::uint32_t(queue_depth);
    if (timeout) op.io_timeout = std::uint32_t(timeout);
    if (keepalive) op.keepalive_timeout = std::uint32_t(keepalive);
    if ((rc = Call(socket, op, &result)) != 0) return rc;
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
    if ((rc = Call(socket, ctl::VolumeRemoveOp{name}, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("volume %s removed\n", name.c_str());
  } else if (mnt->parsed()) {
    if ((rc = Call(socket, ctl::MountOp{Absolute(dir)}, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("mounted at %s\n", result.value("mount", dir).c_str());
  } else if (umnt->parsed()) {
    if ((rc = Call(socket, "unmount", json::object(), &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("unmounted\n");
  } else if (loop_att->parsed()) {
    json p{{"name", name}};
    if (loop_ro) p["read_only"] = true;
    if ((rc = Call(socket, "loop.attach", p, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("%s\n", result.value("device", std::string()).c_str());
  } else if (loop_det->parsed()) {
    if ((rc = Call(socket, "loop.detach", json{{"name", name}}, &result)) != 0) return rc;
    if (as_json) {
      PrintJson(result);
    } else {
      for (const auto& d : result.value("detached", json::array()))
        if (d.is_string()) std::printf("%s detached\n", d.get<std::string>().c_str());
    }
  } else if (disc->parsed()) {
    json p{{"interface", iface}, {"timeout_ms", std::uint64_t(disc_timeout * 1000)}};
    if ((rc = Call(socket, "eth.discover", p, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::fputs(ctl::RenderDiscovery(result).c_str(), stdout);
  } else if (status->parsed()) {
    if ((rc = Call(socket, "status", json::object(), &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::fputs(ctl::RenderStatus(result).c_str(), stdout);
  } else if (arr_create->parsed()) {
    ctl::ArrayCreateOp op;
    op.name = name;
    op.level = level;
    for (auto& l : legs) op.legs.push_back(LegSpec(l));
    op.region_size = region_size;
    op.resync_rate_min = rate_min;
    op.resync_rate_max = rate_max;
    op.assume_clean = assume_clean;
    op.force = force;
    for (auto& kv : layer_keys) {
      auto eq = kv.find('=');
      if (eq == std::string::npos || eq == 0)
        return Fail(ctl::kExUsage, fmt::format("array create: --set {}: expected KEY=VALUE", kv));
      op.params[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    if ((rc = Call(socket, op, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("array %s created: %s %s, %s\n", name.c_str(), level.c_str(),
                     ctl::FormatSize(result.value("size", std::uint64_t{0})).c_str(),
                     result.value("state", std::string("?")).c_str());
  } else if (arr_layers->parsed()) {
    if ((rc = Call(socket, "array.layers", json::object(), &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::fputs(ctl::RenderLayers(result.value("layers", json::array())).c_str(), stdout);
  } else if (arr_list->parsed()) {
    if ((rc = Call(socket, "array.list", json::object(), &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::fputs(ctl::RenderArrayList(result.value("arrays", json::array())).c_str(), stdout);
  } else if (arr_rm->parsed()) {
    if ((rc = Call(socket, ctl::ArrayRemoveOp{name}, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("array %s removed\n", name.c_str());
  } else if (arr_add->parsed() || arr_grow->parsed()) {
    if ((rc = Call(socket, ctl::LegAddOp{name, LegSpec(leg), arr_grow->parsed()}, &result)) != 0)
      return rc;
    print_array(arr_add->parsed() ? "leg added" : "grown");
  } else if (arr_fail->parsed() || arr_rmleg->parsed() || arr_readd->parsed() || arr_detach->parsed()) {
    ctl::LegAction action = arr_fail->parsed()    ? ctl::LegAction::kFail
                            : arr_rmleg->parsed() ? ctl::LegAction::kRemove
                            : arr_readd->parsed() ? ctl::LegAction::kReAdd
                                                  : ctl::LegAction::kDetach;
    ctl::LegChangeOp op{name, action, slot, leg.empty() ? "" : LegSpec(leg), force};
    if ((rc = Call(socket, op, &result)) != 0) return rc;
    print_array(arr_fail->parsed() ? "leg failed" : arr_rmleg->parsed() ? "leg removed"
                : arr_readd->parsed() ? "leg re-added" : "leg detached");
  } else if (arr_resolve->parsed()) {
    json p{{"name", name}, {"keep", keep}, {"dry_run", dry_run}};
    if ((rc = Call(socket, "array.resolve", p, &result)) != 0) return rc;
    if (as_json) {
      PrintJson(result);
    } else {
      std::printf("array %s: %skeep leg %d\n", name.c_str(), dry_run ? "dry run: would " : "", keep);
      for (auto& l : result.value("legs", json::array()))
        if (!l.value("keep", false))
          std::printf("  leg %d (%s): %s %s (full resync from leg %d)\n", l.value("slot", -1),
                      l.value("spec", std::string()).c_str(), dry_run ? "would overwrite" : "overwriting",
                      ctl::FormatSize(l.value("bytes_overwritten", std::uint64_t{0})).c_str(), keep);
    }
  } else if (arr_import->parsed()) {
    json p{{"name", name}, {"legs", json::array()}};
    for (auto& l : legs) p["legs"].push_back(LegSpec(l));
    if ((rc = Call(socket, "array.import", p, &result)) != 0) return rc;
    print_array("imported");
  } else if (arr_release->parsed()) {
    if ((rc = Call(socket, "array.release", json{{"name", name}}, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::printf("array %s released (claims cleared; import it on another host)\n", name.c_str());
  } else if (arr_rate->parsed()) {
    if (rate_min.empty() && rate_max.empty())
      return Fail(ctl::kExUsage, "array resync-rate: give --min and/or --max");
    if ((rc = Call(socket, ctl::SetResyncRateOp{name, rate_min, rate_max}, &result)) != 0) return rc;
    print_array("resync rate set");
  } else if (arr_pause->parsed() || arr_resume->parsed()) {
    const bool pause = arr_pause->parsed();
    if ((rc = Call(socket, ctl::PauseResyncOp{name, pause}, &result)) != 0) return rc;
    print_array(pause ? "resync paused" : "resync resumed");
  } else if (arr_verify->parsed()) {
    if (repair && cancel) return Fail(ctl::kExUsage, "array verify: --repair and --cancel exclude each other");
    return Verify(socket, name, repair, cancel, no_wait, as_json);
  } else if (detail->parsed()) {
    rc = Call(socket, "array.detail", json{{"name", name}}, &result);
    if (rc != 0) return test ? 4 : rc;
    if (as_json) PrintJson(result);
    else std::fputs(ctl::RenderDetail(result).c_str(), stdout);
    if (test) return ctl::DetailTestCode(result);
  } else if (apply->parsed()) {
    std::FILE* f = std::fopen(file.c_str(), "rb");
    if (!f) return Fail(ctl::kExNoInput, fmt::format("{}: {}", file, std::strerror(errno)));
    std::string text;
    char buf[65536];
    std::size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
    std::fclose(f);
    json p{{"config", text}, {"source", Absolute(file)}, {"dry_run", dry_run}, {"prune", prune}};
    if ((rc = Call(socket, "apply", p, &result)) != 0) return rc;
    if (as_json) PrintJson(result);
    else std::fputs(ctl::RenderApply(result).c_str(), stdout);
    if (result.value("failed", false)) {
      // The steps are printed above; the exit code is that of the failed step's error.
      std::fprintf(stderr, "dstctl: apply: %s\n", result.value("error", std::string("a step failed")).c_str());
      return ctl::ExitCodeForError(result.value("error_code", std::string("io_error")));
    }
  } else if (batch->parsed()) {
    return Batch(socket, batch_file, dry_run, as_json);
  } else if (events->parsed()) {
    return Events(socket, as_json,
                  since_opt->count() ? std::optional<std::uint64_t>(since_seq) : std::nullopt);
  } else if (version->parsed()) {
    return Version(socket, as_json);
  }
  return 0;
}
