#!/usr/bin/env bash
# dst array benchmark (issue 3 item 7): one run, one table, every row a ratio against its baseline.
#
#   bash bench/arrays_bench.sh [--quick] [--build-dir DIR] [--out FILE] [--runtime S] [--size MiB]
#
# Topology (all daemons on 127.0.0.1, images on a private tmpfs so the numbers measure the stack):
#   dstd E0 exports s0 (single leg), d0, n0;  dstd E1 exports d1, n1, fresh (replacement), c1
#   dstd A  imports volume "single" = dst://E0/s0, volume "copy" = dst://E1/c1 and assembles
#           mwi   = mirror(dst://E0/d0, dst://E1/d1), write_intent = true
#           mnowi = mirror(dst://E0/n0, dst://E1/n1), write_intent = false
#   fio (libaio, direct=1) runs on A's FUSE files.
# Rows:
#   seq-write-1M-qd32      single leg vs 2-leg mirror (MB/s)
#   rand-write-4K-qd32     single leg vs 2-leg mirror (IOPS)
#   rand-read-4K-qd32      single leg vs 2-leg mirror (IOPS; reads balanced over both legs)
#   intent-rand-write-4K   mirror without write_intent vs with it (IOPS)
#   resync-time            full resync (replaced leg) vs partial resync of 1 % dirty regions (s)
#   resync-bytes           the same in bytes (from bytes_resynced_total)
#   resync-vs-copy         plain copy (dd, 1 MiB direct, FUSE volume -> FUSE volume over the same
#                          links) vs the full resync (MB/s)
#   sqlite-commits         application writes/s vs SQLite group commits/s during the intent row,
#                          which starts with a drained intent map (ratio = commits per write)
# Needs root (tmpfs and FUSE mounts), fio and jq.  --quick (the `bench` CTest smoke) takes < 60 s.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${DST_BUILD_DIR:-$ROOT/build}"
OUT="$ROOT/bench/results/arrays-latest.md"
QUICK=0
RUNTIME=""
SIZE_MIB=""

die() { printf 'arrays-bench: %s\n' "$*" >&2; exit 1; }
log() { printf 'arrays-bench: %s\n' "$*" >&2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 64; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --build-dir) [[ $# -ge 2 ]] || usage; BUILD="$2"; shift ;;
    --out) [[ $# -ge 2 ]] || usage; OUT="$2"; shift ;;
    --runtime) [[ $# -ge 2 ]] || usage; RUNTIME="$2"; shift ;;
    --size) [[ $# -ge 2 ]] || usage; SIZE_MIB="$2"; shift ;;
    -h|--help) usage ;;
    *) echo "arrays-bench: unknown option $1" >&2; usage ;;
  esac
  shift
done

if [[ $QUICK -eq 1 ]]; then
  RUNTIME="${RUNTIME:-1}"; SIZE_MIB="${SIZE_MIB:-64}"
else
  RUNTIME="${RUNTIME:-8}"; SIZE_MIB="${SIZE_MIB:-512}"
fi
FIO_MIB=$(( SIZE_MIB - 1 ))  # the mirror loses its 4 KiB leg header

BIN="$BUILD/bin"
CTL="$BIN/dstctl"
[[ $EUID -eq 0 ]] || die "needs root (tmpfs and FUSE mounts)"
[[ -x $BIN/dstd && -x $CTL ]] || die "dstd/dstctl not found in $BIN (build first, or pass --build-dir)"
command -v fio >/dev/null || die "fio not found"
command -v jq >/dev/null || die "jq not found"

WORK="$(mktemp -d /tmp/dst-arrays-bench.XXXXXX)"
PIDS=()
cleanup() {
  local rc=$? i
  set +e
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do stop_daemon "${PIDS[$i]}"; done
  if grep -qs " $WORK/mnt " /proc/self/mounts; then fusermount3 -u -z "$WORK/mnt" 2>/dev/null || umount -l "$WORK/mnt"; fi
  if grep -qs " $WORK/tmpfs " /proc/self/mounts; then umount "$WORK/tmpfs" || umount -l "$WORK/tmpfs"; fi
  rm -rf --one-file-system "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# free_port, stop_daemon
source "$ROOT/bench/lib.sh"

start_daemon() {  # start_daemon <dir> [extra args]; config in <dir>/dstd.toml
  local d="$1" pid i
  shift
  "$BIN/dstd" --config "$d/dstd.toml" --state-dir "$d" --control "$d/dstd.sock" "$@" >"$d/dstd.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || { cat "$d/dstd.log" >&2; die "dstd in $d exited during startup"; }
    if [[ -S $d/dstd.sock ]] && "$CTL" --socket "$d/dstd.sock" status >/dev/null 2>&1; then return; fi
    sleep 0.1
  done
  cat "$d/dstd.log" >&2
  die "dstd in $d did not answer within 10 s"
}

A="$WORK/a"
actl() { "$CTL" --socket "$A/dstd.sock" "$@"; }
detail() { actl detail "$1" --json; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3g", a / b; else print "-" }'; }
resynced() { detail "$1" | jq -r '(.bytes_resynced_total // ([.progress[]?.bytes_resynced_total // empty] | add) // ([.legs[]?.bytes_resynced_total // empty] | add) // -1)'; }

# wait_clean <array> <timeout s>: state clean, nothing resyncing, every leg up to date.
wait_clean() {
  local name="$1" limit="$2" t0 j
  t0=$(date +%s)
  while :; do
    j="$(detail "$name" 2>/dev/null || true)"
    if [[ -n $j ]] && jq -e '.state == "clean" and ((.resync == null) or (.resync.state != "running" and .resync.state != "pending"))
                             and ([.legs[] | select((.state | gsub("-"; "_")) != "up_to_date")] | length == 0)' <<<"$j" >/dev/null; then
      return 0
    fi
    (( $(date +%s) - t0 < limit )) || { echo "$j" >&2; die "$name not clean within $limit s"; }
    sleep 0.05
  done
}

# fio_run <file> <rw> <bs> <iodepth> <unit> -> MB/s or IOPS
fio_run() {
  local file="$1" rw="$2" bs="$3" qd="$4" unit="$5" json dir
  json="$(fio --name=bench --filename="$file" --size="${FIO_MIB}m" --ioengine=libaio --direct=1 \
      --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 --time_based --runtime="$RUNTIME" \
      --randrepeat=1 --norandommap --invalidate=1 --output-format=json 2>"$WORK/fio.err")" \
    || { cat "$WORK/fio.err" >&2; die "fio failed on $file ($rw $bs qd$qd)"; }
  case "$rw" in *read) dir="read" ;; *) dir="write" ;; esac
  if [[ $unit == MB/s ]]; then
    jq -r ".jobs[0].$dir.bw_bytes / 1e6 | . * 10 | round / 10" <<<"$json"
  else
    jq -r ".jobs[0].$dir.iops | round" <<<"$json"
  fi
}

# --- setup ---------------------------------------------------------------------------------------
mkdir -p "$WORK/tmpfs" "$WORK/e0" "$WORK/e1" "$A" "$WORK/mnt"
mount -t tmpfs -o "size=$(( SIZE_MIB * 8 + 64 ))m,mode=0700" dst-arrays-bench "$WORK/tmpfs"
IMG="$WORK/tmpfs"
log "filling ${SIZE_MIB} MiB leg images on tmpfs"
# Random content in the source legs (a hole on tmpfs reads faster than real data).
for f in s0 d0 n0; do dd if=/dev/urandom of="$IMG/$f.img" bs=1M count="$SIZE_MIB" status=none; done
for f in d1 n1 fresh c1; do truncate -s "${SIZE_MIB}M" "$IMG/$f.img"; done

P0=$(free_port); P1=$(free_port); PA=$(free_port)
export_toml() { printf '[[export]]\nname = "%s"\npath = "%s"\nallow = ["anonymous:rw"]\n\n' "$1" "$IMG/$1.img"; }
{ printf '[daemon]\nlisten = "127.0.0.1:%s"\n\n' "$P0"; export_toml s0; export_toml d0; export_toml n0; } >"$WORK/e0/dstd.toml"
{ printf '[daemon]\nlisten = "127.0.0.1:%s"\n\n' "$P1"; export_toml d1; export_toml n1; export_toml fresh; export_toml c1; } >"$WORK/e1/dstd.toml"
cat >"$A/dstd.toml" <<EOF
[daemon]
listen = "127.0.0.1:$PA"
mountpoint = "$WORK/mnt"

[[volume]]
name = "single"
remote = "dst://127.0.0.1:$P0/s0"
queue_depth = 64

[[volume]]
name = "copy"
remote = "dst://127.0.0.1:$P1/c1"
queue_depth = 64

[[array]]
name = "mwi"
level = "mirror"
legs = ["dst://127.0.0.1:$P0/d0", "dst://127.0.0.1:$P1/d1"]
region_size = "64K"
resync_rate_min = "4G"
resync_rate_max = "4G"
write_intent = true

[[array]]
name = "mnowi"
level = "mirror"
legs = ["dst://127.0.0.1:$P0/n0", "dst://127.0.0.1:$P1/n1"]
region_size = "64K"
resync_rate_min = "4G"
resync_rate_max = "4G"
write_intent = false
EOF
start_daemon "$WORK/e0"
start_daemon "$WORK/e1"
start_daemon "$A"
for f in single copy mwi mnowi; do
  for i in $(seq 1 100); do [[ -e $WORK/mnt/$f.img ]] && break; sleep 0.1; done
  [[ -e $WORK/mnt/$f.img ]] || die "$WORK/mnt/$f.img did not appear"
done
log "waiting for the initial mirror syncs"
wait_clean mwi 300
wait_clean mnowi 300

START=$(date +%s)
declare -A V

# --- fio rows ------------------------------------------------------------------------------------
cell() {  # cell <key> <file> <rw> <bs> <qd> <unit>
  V[$1]="$(fio_run "$2" "$3" "$4" "$5" "$6")"
  log "$(printf '%-28s %10s %s' "$1" "${V[$1]}" "$6")"
}
M="$WORK/mnt"
cell seqw.single "$M/single.img" write 1m 32 MB/s
cell seqw.mirror "$M/mwi.img" write 1m 32 MB/s
cell randw.single "$M/single.img" randwrite 4k 32 IOPS
cell randw.mirror "$M/mwi.img" randwrite 4k 32 IOPS
cell randr.single "$M/single.img" randread 4k 32 IOPS
cell randr.mirror "$M/mwi.img" randread 4k 32 IOPS
cell intent.off "$M/mnowi.img" randwrite 4k 32 IOPS
# Cold intent map: wait for the lazy clear (regions untouched for the quiet period) to empty it,
# so that the row pays for marking regions and the commits below are real group commits.
log "waiting for the write-intent map of mwi to drain"
for i in $(seq 1 300); do
  [[ "$(detail mwi | jq -r '.stats.intent_regions // -1')" == 0 ]] && break
  sleep 0.1
done
c0="$(detail mwi | jq -r '.stats.commits // 0')"
w0="$(detail mwi | jq -r '.stats.writes // 0')"
t0=$(now)
cell intent.on "$M/mwi.img" randwrite 4k 32 IOPS
t1=$(now)
c1="$(detail mwi | jq -r '.stats.commits // 0')"
V[commits]="$(awk -v c=$(( c1 - c0 )) -v t="$(elapsed "$t0" "$t1")" 'BEGIN { printf "%.0f", c / t }')"
V[writes]="${V[intent.on]}"
log "sqlite commits/s ${V[commits]} (commits $(( c1 - c0 )), array writes counter $w0 -> $(detail mwi | jq -r '.stats.writes // 0'), intent regions now $(detail mwi | jq -r '.stats.intent_regions'))"

# --- resync rows ---------------------------------------------------------------------------------
# Partial: detach leg 1, dirty 1 % of the regions (spread out), re-add.
REGIONS=$(( SIZE_MIB * 16 - 1 ))
DIRTY=$(( REGIONS / 100 )); (( DIRTY > 0 )) || DIRTY=1
actl array detach-leg mwi 1 >/dev/null
for (( i=0; i<DIRTY; i++ )); do
  r=$(( (i * 100 + 37) % REGIONS ))
  dd if=/dev/urandom of="$M/mwi.img" bs=64K seek="$r" count=1 oflag=direct conv=notrunc status=none
done
b0="$(resynced mwi)"
t0=$(now)
actl array re-add-leg mwi 1 >/dev/null
wait_clean mwi 300
t1=$(now)
V[partial.s]="$(elapsed "$t0" "$t1")"
V[partial.bytes]=$(( $(resynced mwi) - b0 ))
log "partial resync: $DIRTY regions dirty, ${V[partial.bytes]} bytes in ${V[partial.s]} s"

# Full: leg 1 replaced by a fresh empty image.
actl array fail-leg mwi 1 >/dev/null
b0="$(resynced mwi)"
t0=$(now)
actl array re-add-leg mwi 1 "dst://127.0.0.1:$P1/fresh" >/dev/null
wait_clean mwi 600
t1=$(now)
V[full.s]="$(elapsed "$t0" "$t1")"
V[full.bytes]=$(( $(resynced mwi) - b0 ))
V[resync.mbs]="$(awk -v b="${V[full.bytes]}" -v t="${V[full.s]}" 'BEGIN { printf "%.1f", b / t / 1e6 }')"
log "full resync: ${V[full.bytes]} bytes in ${V[full.s]} s (${V[resync.mbs]} MB/s)"

# Plain copy of the same bytes over the same links: E0 -> A -> E1 through two FUSE volumes.
t0=$(now)
dd if="$M/single.img" of="$M/copy.img" bs=1M count=$(( V[full.bytes] / 1048576 )) iflag=direct oflag=direct conv=notrunc status=none
t1=$(now)
V[copy.mbs]="$(awk -v b=$(( V[full.bytes] / 1048576 * 1048576 )) -v t="$(elapsed "$t0" "$t1")" 'BEGIN { printf "%.1f", b / t / 1e6 }')"
log "plain copy: ${V[copy.mbs]} MB/s"
ELAPSED=$(( $(date +%s) - START ))

row() { echo "| $1 | $2 | $3 | $4 | $5 | $(ratio "$5" "$4") |"; }
{
  echo "# dst array benchmark"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- machine: $(nproc) CPUs, kernel $(uname -r); all daemons on 127.0.0.1, leg images on tmpfs"
  echo "- mode: $([[ $QUICK -eq 1 ]] && echo quick || echo full), ${RUNTIME} s per fio cell, ${SIZE_MIB} MiB legs, fio libaio direct=1 on the FUSE files, region 64 KiB"
  echo "- wall time of the measurements: ${ELAPSED} s"
  echo
  echo "| row | unit | baseline | baseline value | array value | array/baseline |"
  echo "|---|---|---|---:|---:|---:|"
  row seq-write-1M-qd32 MB/s "single leg vs 2-leg mirror" "${V[seqw.single]}" "${V[seqw.mirror]}"
  row rand-write-4K-qd32 IOPS "single leg vs 2-leg mirror" "${V[randw.single]}" "${V[randw.mirror]}"
  row rand-read-4K-qd32 IOPS "single leg vs 2-leg mirror" "${V[randr.single]}" "${V[randr.mirror]}"
  row intent-rand-write-4K-qd32 IOPS "write_intent off vs on" "${V[intent.off]}" "${V[intent.on]}"
  row resync-time s "full vs partial (1 % dirty)" "${V[full.s]}" "${V[partial.s]}"
  row resync-bytes bytes "full vs partial (1 % dirty, $DIRTY regions = $(( DIRTY * 65536 )) B)" "${V[full.bytes]}" "${V[partial.bytes]}"
  row resync-vs-copy MB/s "plain dd copy vs full resync" "${V[copy.mbs]}" "${V[resync.mbs]}"
  row sqlite-commits per-s "writes/s vs group commits/s" "${V[writes]}" "${V[commits]}"
} >"$WORK/result.md"

cat "$WORK/result.md"
mkdir -p "$(dirname "$OUT")"
cp "$WORK/result.md" "$OUT"
log "results written to $OUT"
