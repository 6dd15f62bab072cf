// Human texts for the models: sizes in binary units, engine states in the GUI's words.
#pragma once

#include <QString>

namespace dst::gui {

// 16777216 -> "16.0 MiB"; below 1 KiB plain bytes ("512 B").
QString HumanSize(qint64 bytes);
// Bytes per second: "38.0 MiB/s".
QString HumanRate(double bytes_per_second);
// Seconds: "15 s", "4 min 05 s", "2 h 03 min"; negative: "unknown".
QString HumanDuration(double seconds);
// Engine state words (docs/control.md: clean, up-to-date, split-brain...) -> "up to date",
// "split brain"...; unknown words pass through with '-' as a space.
QString HumanState(const QString& engine_state);

}  // namespace dst::gui
