// Human output of dstctl, rendered from the JSON results of the control protocol (so the text
// and `--json` can never disagree).  Shapes follow docs/ux conventions: aligned tables for lists,
// a DRBD-like indented tree for `status`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dst::control {

// "512 MiB", "1.5 GiB", "4096 B".
std::string FormatSize(std::uint64_t bytes);
// "3s", "5m02s", "2h03m", "4d02h".
std::string FormatDuration(double seconds);

// Aligned columns, two spaces apart; the last column is not padded.
std::string RenderTable(const std::vector<std::string>& header,
                        const std::vector<std::vector<std::string>>& rows);

std::string RenderExportList(const nlohmann::json& exports);  // array of export objects
std::string RenderVolumeList(const nlohmann::json& volumes);  // array of volume objects
std::string RenderStatus(const nlohmann::json& status);       // the status result
std::string RenderDiscovery(const nlohmann::json& result);    // the eth.discover result

// Arrays (issue 3).  `array` is one object of status "arrays" / array.detail.
// /proc/mdstat-like block (2 or 3 lines); every percentage clamped to 0..100:
//   m0 : active mirror dst://127.0.0.1:7401/d1[0] dst://127.0.0.1:7402/d2[1](F)
//         1048576 KiB [2/1] [U_]
//         [=====>...............]  recovery = 27.3% (286720/1048576) finish=0.3min speed=40960K/sec
std::string RenderMdstat(const nlohmann::json& array);
// The 21-character md progress bar for a permille value (clamped to 0..1000).
std::string ProgressBar(int permille);
// mdadm --detail shape: "Key : Value" lines, then the leg table.
std::string RenderDetail(const nlohmann::json& array);
std::string RenderArrayList(const nlohmann::json& arrays);
// `dstctl array layers`: per layer its title, help, leg rules and keys (`layers` of the
// array.layers result: the daemon's registry, dst/layer.h).
std::string RenderLayers(const nlohmann::json& layers);
// `dstctl detail --test` exit code (mdadm.8): 0 healthy, 1 degraded (or recovering), 2 unusable,
// 4 error (no usable information).
int DetailTestCode(const nlohmann::json& array);
// Online verify (issue 9).  `verify` is the "verify" member of an array object.
// `dstctl array verify` exit codes (dstctl.8 EXIT STATUS): 0 legs identical or every mismatch
// repaired, kExVerifyMismatch mismatches found (not repaired; like cmp(1)), 74 the verify failed
// (a leg read error, too few legs), 75 cancelled.
inline constexpr int kExVerifyMismatch = 1;
int VerifyExitCode(const nlohmann::json& verify);
// The result block `dstctl array verify` prints (offsets of the listed mismatches included).
std::string RenderVerify(const nlohmann::json& verify, const std::string& array);
// One progress line: "verify 42.0% (420 MiB/1.0 GiB) 10 MiB/s eta 58s, 0 mismatches".
std::string RenderVerifyProgress(const nlohmann::json& verify);
// One human line per event of `dstctl events` (without --json).
std::string RenderEvent(const nlohmann::json& event);
// `dstctl apply` plan/result.
std::string RenderApply(const nlohmann::json& result);

}  // namespace dst::control
