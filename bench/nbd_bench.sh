#!/usr/bin/env bash
# dst side-by-side benchmark (issue 4 item 5): dst against nbdkit, qemu-nbd and nbdfuse.
#
#   bash bench/nbd_bench.sh [--quick] [--build-dir DIR] [--out FILE] [--runtime S] [--size MiB]
#                           [--dst-nbd auto|dstd|serve]
#
# Starts every server itself, on 127.0.0.1, against the same backing file on a private tmpfs,
# and prints one table of absolute figures and dst/anchor ratios, all from one run.  Groups:
#   nbd            fio --ioengine=nbd against dst's NBD server, nbdkit (file plugin), qemu-nbd
#   fuse-direct    fio (libaio, direct=1) on dst's FUSE volume file (dstd A exports, dstd B
#                  imports and mounts) against nbdfuse over nbdkit
#   fuse-buffered  the same with direct=0
#   fuse-local     dst's FUSE file over a local file-backed volume against bench/fuse_ram_ceiling
#                  (a minimal in-RAM libfuse file: the FUSE ceiling)
#   e2e            losetup --direct-io=on -> mkfs.ext4 -> fio file (direct=1), over the dst FUSE
#                  volume file against the same stack over a plain tmpfs file (the ceiling)
#   protocol       DST vs NBD, both served by dstd A: dst's FUSE volume over DST against nbdfuse
#                  over dst's NBD port (same server process and backing file)
# then heap allocations per I/O of every dst process in steady state (LD_PRELOAD counter,
# bench/alloc_probe).  Rows: seq 1 MiB read/write at QD1 and QD8, random 4 KiB read/write at QD1
# and QD32 (--quick: only QD8/QD32, 0.7 s per cell).  Each row measures all columns back to back.
#
# dst's NBD server: dstd's own port (`[daemon] nbd_listen`) when the daemon supports it
# (--dst-nbd dstd), else bench/nbd_serve, a bench-only binary running the same NbdServer over a
# FileDevice in-process (--dst-nbd serve).  auto (default) tries dstd first.  The header says which.
#
# Needs root, fio, jq, nbdkit, qemu-nbd, nbdfuse, losetup, mkfs.ext4.  Full run < 10 min,
# --quick < 90 s.  Results: stdout and --out (default bench/results/nbd-latest.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${DST_BUILD_DIR:-$ROOT/build}"
OUT="$ROOT/bench/results/nbd-latest.md"
QUICK=0
RUNTIME=""
SIZE_MIB=""
DST_NBD=auto

die() { printf 'nbd_bench: %s\n' "$*" >&2; exit 1; }
log() { printf 'nbd_bench: %s\n' "$*" >&2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 64; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --build-dir) [[ $# -ge 2 ]] || usage; BUILD="$2"; shift ;;
    --out) [[ $# -ge 2 ]] || usage; OUT="$2"; shift ;;
    --runtime) [[ $# -ge 2 ]] || usage; RUNTIME="$2"; shift ;;
    --size) [[ $# -ge 2 ]] || usage; SIZE_MIB="$2"; shift ;;
    --dst-nbd) [[ $# -ge 2 ]] || usage; DST_NBD="$2"; shift ;;
    -h|--help) usage ;;
    *) echo "nbd_bench: unknown option $1" >&2; usage ;;
  esac
  shift
done
case "$DST_NBD" in auto|dstd|serve) ;; *) usage ;; esac

if [[ $QUICK -eq 1 ]]; then
  RUNTIME="${RUNTIME:-0.7}"; RAMP=0; SIZE_MIB="${SIZE_MIB:-128}"; E2E_MIB=192
else
  RUNTIME="${RUNTIME:-3}"; RAMP=1; SIZE_MIB="${SIZE_MIB:-512}"; E2E_MIB=384
fi
FIO_MIB=$(( E2E_MIB / 2 ))  # fio's file inside ext4

BIN="$BUILD/bin"
PROBE="$BUILD/lib/libdst_alloc_probe.so"
[[ $EUID -eq 0 ]] || die "needs root (tmpfs, FUSE, loop and ext4 mounts)"
for b in dstd dstctl fuse_ram_ceiling nbd_serve; do
  [[ -x $BIN/$b ]] || die "$BIN/$b not found (build first, or pass --build-dir)"
done
[[ -f $PROBE ]] || die "$PROBE not found (target dst_alloc_probe)"
for t in fio jq nbdkit qemu-nbd nbdfuse losetup mkfs.ext4 fusermount3; do
  command -v "$t" >/dev/null || die "$t not found"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine"
[[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || die "/dev/fuse missing"

# name  fio-rw     bs  iodepth unit
if [[ $QUICK -eq 1 ]]; then
  ROWS=(
    "seq-read-1M-qd8    read       1m  8   MB/s"
    "seq-write-1M-qd8   write      1m  8   MB/s"
    "rand-read-4K-qd32  randread   4k  32  IOPS"
    "rand-write-4K-qd32 randwrite  4k  32  IOPS"
  )
else
  ROWS=(
    "seq-read-1M-qd1    read       1m  1   MB/s"
    "seq-read-1M-qd8    read       1m  8   MB/s"
    "seq-write-1M-qd1   write      1m  1   MB/s"
    "seq-write-1M-qd8   write      1m  8   MB/s"
    "rand-read-4K-qd1   randread   4k  1   IOPS"
    "rand-read-4K-qd32  randread   4k  32  IOPS"
    "rand-write-4K-qd1  randwrite  4k  1   IOPS"
    "rand-write-4K-qd32 randwrite  4k  32  IOPS"
  )
fi

T_BEGIN=$(date +%s)
WORK="$(mktemp -d /tmp/dst-nbdbench.XXXXXX)"
PIDS=()        # daemons and servers we started, in start order
FUSE_MNTS=()   # FUSE mounts we created (nbdfuse, ram ceiling); dstd unmounts its own
EXT4_MNTS=()
LOOPS=()
cleanup() {
  local rc=$? i m
  set +e
  for m in "${EXT4_MNTS[@]}"; do grep -qs " $m " /proc/self/mounts && { umount "$m" || umount -l "$m"; }; done
  for m in "${LOOPS[@]}"; do losetup -d "$m" 2>/dev/null; done
  for m in "${FUSE_MNTS[@]}"; do grep -qs " $m " /proc/self/mounts && { fusermount3 -u "$m" 2>/dev/null || fusermount3 -u -z "$m"; }; done
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do stop_pid "${PIDS[$i]}"; done
  for m in "$WORK"/mnt-*; do
    grep -qs " $m " /proc/self/mounts && { fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m"; }
  done
  if grep -qs " $WORK/tmpfs " /proc/self/mounts; then umount "$WORK/tmpfs" || umount -l "$WORK/tmpfs"; fi
  rm -rf --one-file-system "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  local p i
  for i in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 40000 ))
    if [[ -z "$(ss -Hltn "sport = :$p" 2>/dev/null)" ]]; then echo "$p"; return; fi
  done
  die "no free TCP port found"
}

stop_pid() {
  local pid="$1" i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

wait_port() {  # wait_port <port> <pid> <what>
  local i
  for i in $(seq 1 100); do
    kill -0 "$2" 2>/dev/null || die "$3 exited during startup"
    [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]] && return 0
    sleep 0.1
  done
  die "$3 did not listen on port $1 within 10 s"
}

# start_daemon <dir> -> 0 when dstd answers on its control socket, 1 if it exited (config refused)
start_daemon() {
  local d="$1" pid i
  LD_PRELOAD="$PROBE" ALLOC_PROBE_FILE="$d/allocs" \
    "$BIN/dstd" --config "$d/dstd.toml" --state-dir "$d" --control "$d/dstd.sock" >"$d/dstd.log" 2>&1 &
  pid=$!
  for i in $(seq 1 100); do
    if ! kill -0 "$pid" 2>/dev/null; then wait "$pid" 2>/dev/null || true; return 1; fi
    if [[ -S $d/dstd.sock ]] && "$BIN/dstctl" --socket "$d/dstd.sock" status >/dev/null 2>&1; then
      PIDS+=("$pid"); echo "$pid" >"$d/pid"; return 0
    fi
    sleep 0.1
  done
  cat "$d/dstd.log" >&2
  die "dstd in $d did not answer within 10 s"
}

wait_file() {  # wait_file <path> <what>
  local i
  for i in $(seq 1 100); do [[ -e $1 ]] && return 0; sleep 0.1; done
  die "$2: $1 did not appear"
}

can_odirect() { dd if="$1" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null; }

# fio_cell <unit> <rw> <bs> <qd> <fio target args...> -> prints MB/s or IOPS
fio_cell() {
  local unit="$1" rw="$2" bs="$3" qd="$4" json dir mem=malloc
  shift 4
  [[ $bs == 1m ]] && mem=mmap  # fio's default buffers cap large reads near 2 GiB/s
  json="$(fio --name=bench "$@" --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 --iomem="$mem" \
      --time_based --runtime="$(awk -v s="$RUNTIME" 'BEGIN { printf "%dms", s * 1000 }')" --ramp_time="$RAMP" --randrepeat=1 --norandommap \
      --output-format=json 2>"$WORK/fio.err" | sed -n '/^{/,$p')" \
    || { cat "$WORK/fio.err" >&2; die "fio failed ($* $rw $bs qd$qd)"; }
  case "$rw" in *read) dir="read" ;; *) dir="write" ;; esac
  if [[ $unit == MB/s ]]; then
    jq -r ".jobs[0].$dir.bw_bytes / 1e6 | . * 10 | round / 10" <<<"$json"
  else
    jq -r ".jobs[0].$dir.iops | round" <<<"$json"
  fi
}

# --- backing files on a private tmpfs ---------------------------------------------------------
mkdir -p "$WORK/tmpfs"
mount -t tmpfs -o "size=$(( SIZE_MIB + 3 * E2E_MIB + 64 ))m,mode=0700" dst-nbdbench "$WORK/tmpfs"
BACKING="$WORK/tmpfs/vol.img"
log "filling ${SIZE_MIB} MiB backing file on tmpfs"
# Random content: a hole or a zero page on tmpfs reads faster than real data would.
dd if=/dev/urandom of="$BACKING" bs=1M count="$SIZE_MIB" status=none
truncate -s "${E2E_MIB}M" "$WORK/tmpfs/e2e.img" "$WORK/tmpfs/e2e-ceiling.img"

# --- servers ------------------------------------------------------------------------------------
A="$WORK/dstd-a"; B="$WORK/dstd-b"; mkdir -p "$A" "$B" "$WORK/mnt-dst"
PORT_A="$(free_port)"; PORT_B="$(free_port)"; DST_NBD_PORT=""; DST_NBD_KIND=""
write_a_config() {  # write_a_config <nbd_listen line or "">
  cat >"$A/dstd.toml" <<EOF
[daemon]
listen = "127.0.0.1:$PORT_A"
$1

[[export]]
allow = ["anonymous:rw"]  # plaintext loopback clients (docs/security.md "Default deny")
name = "vol"
path = "$BACKING"

[[export]]
allow = ["anonymous:rw"]  # plaintext loopback clients (docs/security.md "Default deny")
name = "e2e"
path = "$WORK/tmpfs/e2e.img"
EOF
}
if [[ $DST_NBD != serve ]]; then
  write_a_config 'nbd_listen = "127.0.0.1:0"'
  if start_daemon "$A"; then
    DST_NBD_PORT="$("$BIN/dstctl" --socket "$A/dstd.sock" status --json | jq -r '.nbd.port // empty')"
    [[ -n $DST_NBD_PORT && $DST_NBD_PORT != 0 ]] && DST_NBD_KIND="dstd (nbd_listen)"
  fi
  if [[ -z $DST_NBD_KIND ]]; then
    [[ $DST_NBD == dstd ]] && { cat "$A/dstd.log" >&2; die "dstd has no NBD port (nbd_listen)"; }
    log "dstd does not serve NBD yet: using bench/nbd_serve for dst's NBD server"
    if [[ ${#PIDS[@]} -gt 0 ]]; then stop_pid "${PIDS[0]}"; PIDS=(); rm -f "$A/dstd.sock"; fi
  fi
fi
if [[ -z $DST_NBD_KIND ]]; then
  write_a_config ""
  start_daemon "$A" || { cat "$A/dstd.log" >&2; die "dstd A exited during startup"; }
  DST_NBD_PORT="$(free_port)"
  mkdir -p "$WORK/nbd-serve"
  LD_PRELOAD="$PROBE" ALLOC_PROBE_FILE="$WORK/nbd-serve/allocs" \
    "$BIN/nbd_serve" --file "$BACKING" --port "$DST_NBD_PORT" --name vol >"$WORK/nbd-serve/log" 2>&1 &
  NBD_SERVE_PID=$!; PIDS+=("$NBD_SERVE_PID")
  wait_port "$DST_NBD_PORT" "$NBD_SERVE_PID" nbd_serve
  DST_NBD_KIND="bench/nbd_serve (NbdServer over FileDevice, in-process)"
fi
# Which process serves dst's NBD port (for the allocation count).
if [[ $DST_NBD_KIND == dstd* ]]; then NBD_ALLOC_DIR="$A"; NBD_ALLOC_PID="$(cat "$A/pid")"
else NBD_ALLOC_DIR="$WORK/nbd-serve"; NBD_ALLOC_PID="$NBD_SERVE_PID"; fi

cat >"$B/dstd.toml" <<EOF
[daemon]
listen = "127.0.0.1:$PORT_B"
mountpoint = "$WORK/mnt-dst"

[[volume]]
name = "vol"
remote = "dst://127.0.0.1:$PORT_A/vol"
queue_depth = 64

[[volume]]
name = "e2e"
remote = "dst://127.0.0.1:$PORT_A/e2e"
queue_depth = 64

[[volume]]
name = "local"
path = "$BACKING"
queue_depth = 64
EOF
start_daemon "$B" || { cat "$B/dstd.log" >&2; die "dstd B exited during startup"; }
DST_FILE="$WORK/mnt-dst/vol.img"; LOCAL_FILE="$WORK/mnt-dst/local.img"
wait_file "$DST_FILE" "dstd B"; wait_file "$LOCAL_FILE" "dstd B"; wait_file "$WORK/mnt-dst/e2e.img" "dstd B"
can_odirect "$DST_FILE" || die "O_DIRECT refused on the dst FUSE file"

PORT_K="$(free_port)"
nbdkit -f -i 127.0.0.1 -p "$PORT_K" -e vol file "$BACKING" >"$WORK/nbdkit.log" 2>&1 &
PIDS+=("$!"); wait_port "$PORT_K" "$!" nbdkit
PORT_Q="$(free_port)"
qemu-nbd -f raw -b 127.0.0.1 -p "$PORT_Q" -x vol --persistent --shared=8 --cache=writeback --aio=threads \
  "$BACKING" >"$WORK/qemu-nbd.log" 2>&1 &
PIDS+=("$!"); wait_port "$PORT_Q" "$!" qemu-nbd

start_nbdfuse() {  # start_nbdfuse <dir> <uri>: file is <dir>/nbd
  mkdir -p "$1"
  nbdfuse -P "$1.pid" "$1" "$2" >"$1.log" 2>&1 &
  FUSE_MNTS+=("$1")
  local i
  for i in $(seq 1 100); do [[ -s $1.pid ]] && grep -qs " $1 " /proc/self/mounts && return 0; sleep 0.1; done
  cat "$1.log" >&2; die "nbdfuse on $1 did not come up"
}
start_nbdfuse "$WORK/mnt-nbdfuse-nbdkit" "nbd://127.0.0.1:$PORT_K/vol"
start_nbdfuse "$WORK/mnt-nbdfuse-dst" "nbd://127.0.0.1:$DST_NBD_PORT/vol"
NBDFUSE_DIRECT=1
can_odirect "$WORK/mnt-nbdfuse-nbdkit/nbd" || { NBDFUSE_DIRECT=0; log "WARNING: nbdfuse refuses O_DIRECT, buffered"; }

mkdir -p "$WORK/mnt-ram" "$WORK/ram"
LD_PRELOAD="$PROBE" ALLOC_PROBE_FILE="$WORK/ram/allocs" \
  "$BIN/fuse_ram_ceiling" "$WORK/mnt-ram" "$SIZE_MIB" >"$WORK/ram.log" 2>&1 &
RAM_PID=$!; PIDS+=("$RAM_PID"); FUSE_MNTS+=("$WORK/mnt-ram")
wait_file "$WORK/mnt-ram/file.img" fuse_ram_ceiling

# End to end: loop (direct I/O) -> ext4 -> fio file, over the dst FUSE file and over tmpfs.
setup_e2e() {  # setup_e2e <image> <mnt> -> sets E2E_LOOP
  local dev
  dev="$(losetup --direct-io=on -f --show "$1")" || die "losetup --direct-io=on $1 failed"
  LOOPS+=("$dev")
  [[ "$(cat "/sys/block/${dev#/dev/}/loop/dio" 2>/dev/null)" == 1 ]] || log "WARNING: $dev did not enable direct I/O"
  mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$dev" >/dev/null
  mkdir -p "$2"; mount -t ext4 "$dev" "$2"; EXT4_MNTS+=("$2")
  # Lay out fio's file once (random data), outside any measured cell.
  fio --name=layout --filename="$2/fio.dat" --size="${FIO_MIB}m" --rw=write --bs=1m --direct=1 \
    --ioengine=libaio --iodepth=8 --output-format=terse >/dev/null 2>&1 || die "fio layout on $2 failed"
}
log "creating loop+ext4 stacks"
setup_e2e "$WORK/mnt-dst/e2e.img" "$WORK/e2e-dst"
setup_e2e "$WORK/tmpfs/e2e-ceiling.img" "$WORK/e2e-tmpfs"

log "servers: dst NBD = $DST_NBD_KIND (port $DST_NBD_PORT), nbdkit $PORT_K, qemu-nbd $PORT_Q, dstd A $PORT_A"

# --- measurements -------------------------------------------------------------------------------
declare -A R
nbd_args() { echo "--ioengine=nbd --uri=nbd://127.0.0.1:$1/vol"; }
file_args() { echo "--ioengine=libaio --filename=$1 --direct=$2 --size=$3m --invalidate=1"; }

# Column id -> fio target arguments
declare -A COL
COL[nbd-dst]="$(nbd_args "$DST_NBD_PORT")"
COL[nbd-nbdkit]="$(nbd_args "$PORT_K")"
COL[nbd-qemu]="$(nbd_args "$PORT_Q")"
COL[fuse-dst-d]="$(file_args "$DST_FILE" 1 "$SIZE_MIB")"
COL[fuse-nbdkit-d]="$(file_args "$WORK/mnt-nbdfuse-nbdkit/nbd" "$NBDFUSE_DIRECT" "$SIZE_MIB")"
COL[fuse-dst-b]="$(file_args "$DST_FILE" 0 "$SIZE_MIB")"
COL[fuse-nbdkit-b]="$(file_args "$WORK/mnt-nbdfuse-nbdkit/nbd" 0 "$SIZE_MIB")"
COL[fuse-local]="$(file_args "$LOCAL_FILE" 1 "$SIZE_MIB")"
COL[fuse-ram]="$(file_args "$WORK/mnt-ram/file.img" 1 "$SIZE_MIB")"
COL[proto-nbd]="$(file_args "$WORK/mnt-nbdfuse-dst/nbd" "$NBDFUSE_DIRECT" "$SIZE_MIB")"
COL[e2e-dst]="$(file_args "$WORK/e2e-dst/fio.dat" 1 "$FIO_MIB")"
COL[e2e-tmpfs]="$(file_args "$WORK/e2e-tmpfs/fio.dat" 1 "$FIO_MIB")"
ORDER=(nbd-dst nbd-nbdkit nbd-qemu fuse-dst-d fuse-nbdkit-d fuse-dst-b fuse-nbdkit-b fuse-local fuse-ram
       proto-nbd e2e-dst e2e-tmpfs)

START=$(date +%s)
for row in "${ROWS[@]}"; do
  read -r name rw bs qd unit <<<"$row"
  for c in "${ORDER[@]}"; do
    # shellcheck disable=SC2086  # COL holds an argument list
    R[$c,$name]="$(fio_cell "$unit" "$rw" "$bs" "$qd" ${COL[$c]})"
    printf 'nbd_bench: %-18s %-14s %10s %s\n' "$name" "$c" "${R[$c,$name]}" "$unit" >&2
  done
done

# --- heap allocations per I/O in steady state --------------------------------------------------
# The probe counts malloc/calloc/realloc/memalign calls in the whole process.  Snapshots (SIGUSR2)
# are taken after 0.4 s of load and $ALLOC_WIN s later, while fio still runs; I/Os in that window =
# fio's IOPS x the window length.  Connection setup (fio's NBD handshake, open) happens before the
# first snapshot.  The in-RAM FUSE ceiling runs under the probe too: it shows what libfuse's own
# session loop allocates per request, which every libfuse filesystem pays.
ALLOC_WIN=$([[ $QUICK -eq 1 ]] && echo 0.6 || echo "$RUNTIME")
alloc_snap() {  # alloc_snap <dir> <pid> -> prints the count
  local n=0 i
  [[ -f $1/allocs ]] && n=$(wc -l <"$1/allocs")
  kill -USR2 "$2"
  for i in $(seq 1 100); do
    [[ -f $1/allocs && $(wc -l <"$1/allocs") -gt $n ]] && break
    sleep 0.01
  done
  tail -n1 "$1/allocs"
}
declare -a ALLOC_LINES
# alloc_cell <rw> <"label|dir|pid" ...> -- <fio target args...>: all listed processes in one window
alloc_cell() {
  local rw="$1" t0 t1 json iops dir ios per p label d pid
  local -a procs=() c0=() c1=()
  shift
  while [[ $1 != -- ]]; do procs+=("$1"); shift; done
  shift
  fio --name=alloc "$@" --rw="$rw" --bs=4k --iodepth=32 --numjobs=1 --time_based \
    --runtime="$(awk -v w="$ALLOC_WIN" 'BEGIN { printf "%dms", (w + 0.9) * 1000 }')" --ramp_time=0 --norandommap \
    --output-format=json >"$WORK/alloc.json" 2>"$WORK/fio.err" &
  local fpid=$!
  sleep 0.4
  for p in "${procs[@]}"; do IFS='|' read -r label d pid <<<"$p"; c0+=("$(alloc_snap "$d" "$pid")"); done
  t0=$(date +%s.%N)
  sleep "$ALLOC_WIN"
  for p in "${procs[@]}"; do IFS='|' read -r label d pid <<<"$p"; c1+=("$(alloc_snap "$d" "$pid")"); done
  t1=$(date +%s.%N)
  wait "$fpid" || { cat "$WORK/fio.err" >&2; die "fio failed (allocation run $rw)"; }
  json="$(sed -n '/^{/,$p' "$WORK/alloc.json")"
  case "$rw" in *read) dir="read" ;; *) dir="write" ;; esac
  iops=$(jq -r ".jobs[0].$dir.iops" <<<"$json")
  ios=$(awk -v i="$iops" -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", i * (b - a) }')
  local k
  for k in "${!procs[@]}"; do
    IFS='|' read -r label d pid <<<"${procs[$k]}"
    per=$(awk -v n=$(( c1[k] - c0[k] )) -v i="$ios" 'BEGIN { if (i > 0) printf "%.4f", n / i; else print "-" }')
    ALLOC_LINES+=("| $label | $rw 4k qd32 | $(( c1[k] - c0[k] )) | $ios | $per |")
    log "allocations: $label $rw: $(( c1[k] - c0[k] )) over ~$ios I/Os"
  done
}
PID_A="$(cat "$A/pid")"; PID_B="$(cat "$B/pid")"
NBD_LABEL="NBD server ($([[ $NBD_ALLOC_DIR == "$A" ]] && echo dstd A || echo nbd_serve)), fio nbd engine"
for rw in randread randwrite; do
  # shellcheck disable=SC2086
  alloc_cell "$rw" "$NBD_LABEL|$NBD_ALLOC_DIR|$NBD_ALLOC_PID" -- ${COL[nbd-dst]}
  # shellcheck disable=SC2086
  alloc_cell "$rw" "FUSE remote volume: importer dstd B|$B|$PID_B" \
    "FUSE remote volume: exporter dstd A|$A|$PID_A" -- ${COL[fuse-dst-d]}
  # shellcheck disable=SC2086
  alloc_cell "$rw" "FUSE local volume: dstd B|$B|$PID_B" -- ${COL[fuse-local]}
  # shellcheck disable=SC2086
  alloc_cell "$rw" "in-RAM libfuse ceiling (reference, not dst)|$WORK/ram|$RAM_PID" -- ${COL[fuse-ram]}
done
ELAPSED=$(( $(date +%s) - START ))

# --- table ----------------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
# target <group> <row> <anchor col> -> minimum dst/anchor ratio of issue 4 item 6, or "-"
target() {
  case "$1:$3" in
    nbd:nbd-nbdkit) [[ $2 == rand-*-4K-qd32 ]] && echo 1.3 || echo 1.0 ;;
    fuse-direct:*|fuse-buffered:*)
      case "$2" in rand-*-4K-qd32) echo 2.0 ;; seq-*) echo 1.5 ;; *) echo - ;; esac ;;
    fuse-local:*) [[ $2 == rand-*-4K-qd32 ]] && echo 0.5 || echo - ;;
    e2e:*) echo 0.5 ;;
    nbd:nbd-qemu) echo 1.0 ;;
    *) echo - ;;
  esac
}
line() {  # line <group> <row> <unit> <dst col> <anchor name> <anchor col>
  local r t met=-
  r="$(ratio "${R[$4,$2]}" "${R[$6,$2]}")"
  t="$(target "$1" "$2" "$6")"
  [[ $t != - && $r != - ]] && met="$(awk -v r="$r" -v t="$t" 'BEGIN { print (r >= t) ? "yes" : "no" }')"
  echo "| $1 | $2 | $3 | ${R[$4,$2]} | $5 | ${R[$6,$2]} | $r | $t | $met |"
}
table() {
  local row name rw bs qd unit
  echo "| group | row | unit | dst | anchor | anchor value | dst/anchor | target | met |"
  echo "|---|---|---|---:|---|---:|---:|---:|---|"
  for row in "${ROWS[@]}"; do read -r name rw bs qd unit <<<"$row"
    line nbd "$name" "$unit" nbd-dst nbdkit nbd-nbdkit
    line nbd "$name" "$unit" nbd-dst qemu-nbd nbd-qemu; done
  for row in "${ROWS[@]}"; do read -r name rw bs qd unit <<<"$row"
    line fuse-direct "$name" "$unit" fuse-dst-d nbdfuse+nbdkit fuse-nbdkit-d; done
  for row in "${ROWS[@]}"; do read -r name rw bs qd unit <<<"$row"
    line fuse-buffered "$name" "$unit" fuse-dst-b nbdfuse+nbdkit fuse-nbdkit-b; done
  for row in "${ROWS[@]}"; do read -r name rw bs qd unit <<<"$row"
    line fuse-local "$name" "$unit" fuse-local ram-fuse-ceiling fuse-ram; done
  for row in "${ROWS[@]}"; do read -r name rw bs qd unit <<<"$row"
    line e2e "$name" "$unit" e2e-dst loop+ext4-tmpfs e2e-tmpfs; done
  for row in "${ROWS[@]}"; do read -r name rw bs qd unit <<<"$row"
    line protocol "$name" "$unit" fuse-dst-d nbdfuse+dst-nbd proto-nbd; done
}

{
  echo "# dst NBD / FUSE side-by-side benchmark"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), kernel $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- mode: $([[ $QUICK -eq 1 ]] && echo quick || echo full), ${RUNTIME} s per cell (+${RAMP} s ramp), ${SIZE_MIB} MiB backing file on tmpfs, fio $(fio --version), numjobs=1, iomem=mmap for 1M"
  echo "- dst NBD server: $DST_NBD_KIND; nbdkit $(nbdkit --version | awk '{print $2}') file plugin; $(qemu-nbd --version | head -1)"
  echo "- dst FUSE: dstd A exports over DST, dstd B imports and mounts; local volume = dstd B [[volume]] path on the same tmpfs file"
  echo "- nbdfuse direct=$NBDFUSE_DIRECT; e2e: losetup --direct-io=on, ext4, ${FIO_MIB} MiB fio file, direct=1"
  echo "- protocol group: dst = dst FUSE volume over DST (same cell as fuse-direct), anchor = nbdfuse over the NBD port of the same dst server"
  echo "- wall time: ${ELAPSED} s of measurement, $(( $(date +%s) - T_BEGIN )) s in all"
  echo
  table
  echo
  echo "Heap allocations per I/O in steady state (LD_PRELOAD counter, bench/alloc_probe):"
  echo
  echo "| process | workload | allocations | I/Os | allocations/I/O |"
  echo "|---|---|---:|---:|---:|"
  printf '%s\n' "${ALLOC_LINES[@]}"
} >"$WORK/result.md"

cat "$WORK/result.md"
mkdir -p "$(dirname "$OUT")"
cp "$WORK/result.md" "$OUT"
log "results written to $OUT"
