#!/usr/bin/env bash
# dst benchmark: fio through the whole stack versus the same file read locally.
#
#   bash bench/run.sh [--quick] [--build-dir DIR] [--out FILE] [--runtime S] [--size MiB]
#
# Rows: sequential 1 MiB read/write and random 4 KiB read/write, each at iodepth 1 and 32
# (fio, ioengine=libaio).  Columns:
#   local          fio on the backing file itself
#   dst batched    dstd A exports the backing file, dstd B imports it and serves it over FUSE;
#                  fio runs on <mnt>/vol.img (batching = true on both daemons)
#   dst unbatched  the same with batching = false on both daemons (one frame per send call)
# plus the ratios and the frames per send call of each daemon's transmitters over that row
# (from `dstctl status --json`: B->A carries requests and write data, A->B replies and read data).
# Both dst stacks run side by side for the whole run and every row measures the three columns
# back to back, so a change in machine load hits a row's columns alike.
#
# Backing store and O_DIRECT (see docs/benchmarks.md): the backing file lives on a private
# tmpfs so that the numbers measure the stack, not a disk.  fio uses direct=1 on the FUSE file
# (no page cache between fio and dstd B).  On tmpfs the page cache *is* the storage, so a local
# direct=1 and direct=0 both cost one memory copy; direct=1 is used when the kernel accepts
# O_DIRECT on tmpfs (Linux >= 6.6), else direct=0, and the table says which.  The exporter opens
# the file without O_DIRECT for the same reason.
#
# Needs root (FUSE mount, tmpfs mount), fio and jq.  A full run takes about 4 minutes; --quick
# (1 s per cell, small file) takes well under a minute and is what the `bench` CTest label runs.
# Results go to stdout and to --out (default bench/results/latest.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${DST_BUILD_DIR:-$ROOT/build}"
OUT="$ROOT/bench/results/latest.md"
QUICK=0
RUNTIME=""
SIZE_MIB=""

die() { printf 'bench: %s\n' "$*" >&2; exit 1; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 64; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --build-dir) [[ $# -ge 2 ]] || usage; BUILD="$2"; shift ;;
    --out) [[ $# -ge 2 ]] || usage; OUT="$2"; shift ;;
    --runtime) [[ $# -ge 2 ]] || usage; RUNTIME="$2"; shift ;;
    --size) [[ $# -ge 2 ]] || usage; SIZE_MIB="$2"; shift ;;
    -h|--help) usage ;;
    *) echo "bench: unknown option $1" >&2; usage ;;
  esac
  shift
done

if [[ $QUICK -eq 1 ]]; then
  RUNTIME="${RUNTIME:-1}"; RAMP=0; SIZE_MIB="${SIZE_MIB:-128}"
else
  RUNTIME="${RUNTIME:-8}"; RAMP=1; SIZE_MIB="${SIZE_MIB:-1024}"
fi

BIN="$BUILD/bin"
[[ $EUID -eq 0 ]] || die "needs root (tmpfs and FUSE mounts)"
[[ -x $BIN/dstd && -x $BIN/dstctl ]] || die "dstd/dstctl not found in $BIN (build first, or pass --build-dir)"
command -v fio >/dev/null || die "fio not found (apt-get install fio)"
command -v jq >/dev/null || die "jq not found (apt-get install jq)"
[[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || die "/dev/fuse missing"

# name  fio-rw     bs    iodepth  unit
ROWS=(
  "seq-read-1M-qd1    read       1m  1   MB/s"
  "seq-read-1M-qd32   read       1m  32  MB/s"
  "seq-write-1M-qd1   write      1m  1   MB/s"
  "seq-write-1M-qd32  write      1m  32  MB/s"
  "rand-read-4K-qd1   randread   4k  1   IOPS"
  "rand-read-4K-qd32  randread   4k  32  IOPS"
  "rand-write-4K-qd1  randwrite  4k  1   IOPS"
  "rand-write-4K-qd32 randwrite  4k  32  IOPS"
)

WORK="$(mktemp -d /tmp/dst-bench.XXXXXX)"
PIDS=()
cleanup() {
  local rc=$? i m
  set +e
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do stop_daemon "${PIDS[$i]}"; done
  # /proc/self/mounts, not mountpoint(1): a dead FUSE mount fails stat() with ENOTCONN.
  for m in "$WORK/mnt-batched" "$WORK/mnt-unbatched"; do
    if grep -qs " $m " /proc/self/mounts; then fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m"; fi
  done
  if grep -qs " $WORK/tmpfs " /proc/self/mounts; then umount "$WORK/tmpfs" || umount -l "$WORK/tmpfs"; fi
  rm -rf --one-file-system "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# free_port, stop_daemon
source "$ROOT/bench/lib.sh"

start_daemon() {  # start_daemon <dir>; config in <dir>/dstd.toml
  local d="$1" pid i
  "$BIN/dstd" --config "$d/dstd.toml" --state-dir "$d" --control "$d/dstd.sock" >"$d/dstd.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || { cat "$d/dstd.log" >&2; die "dstd in $d exited during startup"; }
    if [[ -S $d/dstd.sock ]] && "$BIN/dstctl" --socket "$d/dstd.sock" status >/dev/null 2>&1; then return; fi
    sleep 0.1
  done
  cat "$d/dstd.log" >&2
  die "dstd in $d did not answer within 10 s"
}

# Transmitter counters of one daemon from `dstctl status --json`: the exporter's aggregate
# (replies) plus every remote volume's connection (requests).  Per-export entries are not added:
# they repeat the exporter's counters.  Prints "<frames> <send calls>".
tx_counters() {
  "$BIN/dstctl" --socket "$1/dstd.sock" status --json | jq -r '
    def f: (.frames_sent // .frames // 0);
    def c: (.send_calls // .syscalls // 0);
    [ (.exporter // empty | objects), (.volumes // [] | .[] | objects) ] as $t
    | "\([$t[] | f] | add // 0) \([$t[] | c] | add // 0)"'
}

can_odirect() { dd if="$1" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null; }

# fio_run <file> <direct> <rw> <bs> <iodepth> <unit> -> prints MB/s or IOPS
fio_run() {
  local file="$1" direct="$2" rw="$3" bs="$4" qd="$5" unit="$6" json dir
  json="$(fio --name=bench --filename="$file" --size="${SIZE_MIB}m" --ioengine=libaio --direct="$direct" \
      --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 --time_based --runtime="$RUNTIME" \
      --ramp_time="$RAMP" --randrepeat=1 --norandommap --invalidate=1 --output-format=json 2>"$WORK/fio.err")" \
    || { cat "$WORK/fio.err" >&2; die "fio failed on $file ($rw $bs qd$qd)"; }
  case "$rw" in *read) dir="read" ;; *) dir="write" ;; esac
  if [[ $unit == MB/s ]]; then
    jq -r ".jobs[0].$dir.bw_bytes / 1e6 | . * 10 | round / 10" <<<"$json"
  else
    jq -r ".jobs[0].$dir.iops | round" <<<"$json"
  fi
}

# --- backing file on a private tmpfs ---------------------------------------------------------
mkdir -p "$WORK/tmpfs"
mount -t tmpfs -o "size=$(( SIZE_MIB + 64 ))m,mode=0700" dst-bench "$WORK/tmpfs"
BACKING="$WORK/tmpfs/vol.img"
echo "bench: filling ${SIZE_MIB} MiB backing file on tmpfs" >&2
# Random content: a hole or a zero page on tmpfs reads faster than real data would.
dd if=/dev/urandom of="$BACKING" bs=1M count="$SIZE_MIB" status=none
LOCAL_DIRECT=0
can_odirect "$BACKING" && LOCAL_DIRECT=1

declare -A RESULT FPS_AB FPS_BA
DST_DIRECT=""

# start_stack <batched|unbatched>: dstd A (exporter) and dstd B (importer + FUSE at mnt-<mode>)
# in <mode>-a and <mode>-b.  Both stacks run side by side over the same backing file (only one
# is ever under load), so that each row measures local, batched and unbatched back to back and
# a change in the machine's load during the run hits all three columns alike.
start_stack() {
  local mode="$1" batching=true port_a port_b a="$WORK/$1-a" b="$WORK/$1-b" mnt="$WORK/mnt-$1" i
  [[ $mode == unbatched ]] && batching=false
  mkdir -p "$a" "$b" "$mnt"
  port_a="$(free_port)"; port_b="$(free_port)"
  cat >"$a/dstd.toml" <<EOF
[daemon]
listen = "127.0.0.1:$port_a"
batching = $batching

[[export]]
allow = ["anonymous:rw"]  # plaintext loopback clients (docs/security.md "Default deny")
name = "vol"
path = "$BACKING"
direct_io = false
EOF
  cat >"$b/dstd.toml" <<EOF
[daemon]
listen = "127.0.0.1:$port_b"
mountpoint = "$mnt"
batching = $batching

[[volume]]
name = "vol"
remote = "dst://127.0.0.1:$port_a/vol"
queue_depth = 64
EOF
  start_daemon "$a"
  start_daemon "$b"
  for i in $(seq 1 100); do [[ -e $mnt/vol.img ]] && break; sleep 0.1; done
  [[ -e $mnt/vol.img ]] || die "$mnt/vol.img did not appear ($mode)"
  if [[ -z $DST_DIRECT ]]; then
    DST_DIRECT=0
    can_odirect "$mnt/vol.img" && DST_DIRECT=1
    [[ $DST_DIRECT -eq 1 ]] || echo "bench: WARNING: O_DIRECT refused on the FUSE file, using buffered I/O" >&2
  fi
}

measure_dst() {  # measure_dst <mode> <name> <rw> <bs> <qd> <unit>
  local mode="$1" name="$2" rw="$3" bs="$4" qd="$5" unit="$6" a="$WORK/$1-a" b="$WORK/$1-b" \
    fa ca fb cb a0 a1 b0 b1
  read -r fa ca <<<"$(tx_counters "$a")"
  read -r fb cb <<<"$(tx_counters "$b")"
  RESULT[$mode,$name]="$(fio_run "$WORK/mnt-$mode/vol.img" "$DST_DIRECT" "$rw" "$bs" "$qd" "$unit")"
  read -r a0 a1 <<<"$(tx_counters "$a")"
  read -r b0 b1 <<<"$(tx_counters "$b")"
  FPS_AB[$mode,$name]="$(awk -v f=$(( a0 - fa )) -v c=$(( a1 - ca )) 'BEGIN { if (c > 0) printf "%.2f", f / c; else print "-" }')"
  FPS_BA[$mode,$name]="$(awk -v f=$(( b0 - fb )) -v c=$(( b1 - cb )) 'BEGIN { if (c > 0) printf "%.2f", f / c; else print "-" }')"
  printf 'bench: %-18s %-9s %10s %s (frames/send B->A %s, A->B %s)\n' "$name" "$mode" \
    "${RESULT[$mode,$name]}" "$unit" "${FPS_BA[$mode,$name]}" "${FPS_AB[$mode,$name]}" >&2
}

run_all() {
  local row name rw bs qd unit m
  start_stack batched
  start_stack unbatched
  for row in "${ROWS[@]}"; do
    read -r name rw bs qd unit <<<"$row"
    RESULT[local,$name]="$(fio_run "$BACKING" "$LOCAL_DIRECT" "$rw" "$bs" "$qd" "$unit")"
    printf 'bench: %-18s %-9s %10s %s\n' "$name" local "${RESULT[local,$name]}" "$unit" >&2
    measure_dst batched "$name" "$rw" "$bs" "$qd" "$unit"
    measure_dst unbatched "$name" "$rw" "$bs" "$qd" "$unit"
  done
  # Importers first, so they do not reconnect to a vanished exporter; then check that each
  # importer took its FUSE mount down on SIGTERM.
  stop_daemon "${PIDS[3]}"; stop_daemon "${PIDS[1]}"
  stop_daemon "${PIDS[2]}"; stop_daemon "${PIDS[0]}"
  PIDS=()
  for m in batched unbatched; do
    if grep -qs " $WORK/mnt-$m " /proc/self/mounts; then die "FUSE mount $m still present after dstd exited"; fi
  done
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

START=$(date +%s)
run_all
ELAPSED=$(( $(date +%s) - START ))

table() {
  local row name rw bs qd unit l b u
  echo "| row | unit | local | dst batched | dst unbatched | dst/local | batched/unbatched | frames/send batched (B->A, A->B) | frames/send unbatched (B->A, A->B) |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
  for row in "${ROWS[@]}"; do
    read -r name rw bs qd unit <<<"$row"
    l="${RESULT[local,$name]}"; b="${RESULT[batched,$name]}"; u="${RESULT[unbatched,$name]}"
    echo "| $name | $unit | $l | $b | $u | $(ratio "$b" "$l") | $(ratio "$b" "$u") | ${FPS_BA[batched,$name]}, ${FPS_AB[batched,$name]} | ${FPS_BA[unbatched,$name]}, ${FPS_AB[unbatched,$name]} |"
  done
}

{
  echo "# dst benchmark results"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), kernel $(uname -r)"
  echo "- mode: $([[ $QUICK -eq 1 ]] && echo quick || echo full), ${RUNTIME} s per cell (+${RAMP} s ramp), ${SIZE_MIB} MiB file on tmpfs, fio ioengine=libaio, numjobs=1"
  echo "- O_DIRECT: local direct=$LOCAL_DIRECT (tmpfs), dst direct=$DST_DIRECT (FUSE file); exporter opens the tmpfs file buffered"
  echo "- path: fio -> FUSE (dstd B) -> TCP 127.0.0.1 -> dstd A -> tmpfs file; both daemons on this machine"
  echo "- wall time: ${ELAPSED} s"
  echo
  table
} >"$WORK/result.md"

cat "$WORK/result.md"
mkdir -p "$(dirname "$OUT")"
cp "$WORK/result.md" "$OUT"
echo "bench: results written to $OUT" >&2
