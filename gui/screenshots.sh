#!/usr/bin/env bash
# Renders dst-gui's review screenshots to PNG files (offscreen, no display needed):
#   main-window.png                       the window with three hosts and a mirror across them
#   canvas-resyncing-mirror-3-hosts.png   the canvas while that mirror's initial sync runs
#   refused-drop.png                      a drop the engine refused, its reason at the drop point
#   apply-dialog.png                      the Apply dialog after running the staged plan
# They come from tests/gui/three_hosts_test.cc (three real dstd: two exporters, one assembler),
# so the pictures show what the tests check.
#
#   bash gui/screenshots.sh [OUT_DIR] [--build-dir DIR]     (defaults: ./screenshots, ./build)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/screenshots"
BUILD="$ROOT/build"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build-dir) BUILD="$(realpath -m "$2")"; shift ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) OUT="$(realpath -m "$1")" ;;
  esac
  shift
done
[[ -f $BUILD/CMakeCache.txt ]] || { echo "screenshots: no build in $BUILD (bash packaging/quickstart.sh test first)" >&2; exit 1; }
cmake --build "$BUILD" -j"${DST_JOBS:-2}" --target three_hosts_test dstd dstctl
mkdir -p "$OUT"
DST_BUILD_DIR="$BUILD" DST_SOURCE_DIR="$ROOT" QT_QPA_PLATFORM=offscreen DST_SCREENSHOT_DIR="$OUT" \
  "$BUILD/bin/three_hosts_test"
ls -l "$OUT"/*.png
