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

}  // namespace dst::control
