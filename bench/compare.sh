#!/usr/bin/env bash
# dst old-versus-new benchmark: builds two revisions and runs the quick NBD and FUSE benchmark
# rows against both, side by side in one run, so that a change to the data path is judged against
# the code it replaces on the same machine at the same time.
#
#   bash bench/compare.sh OLD_REV NEW_REV [--reps N] [--runtime S] [--size MiB] [--out FILE]
#                         [--min-ratio R] [--old-build DIR] [--new-build DIR] [--work DIR]
#
# OLD_REV / NEW_REV: anything `git rev-parse` takes (a commit, a tag, HEAD~3); WORKTREE means the
# checkout as it is now, uncommitted changes included.  Each revision is exported with
# `git archive` (or copied, for WORKTREE) and built (dstd, dstctl; ccache when installed) under
# --work (default /var/tmp/dst-compare/<commit>); a finished build is reused.  --old-build /
# --new-build use an existing build tree instead (its bin/dstd and bin/dstctl).
#
# Per side: dstd A exports a file from a private tmpfs over DST and over NBD (nbd_listen); dstd B
# imports it over DST and serves it as a FUSE file.  Both sides run at the same time for the whole
# run, each with its own copy of the backing data.  Groups:
#   nbd    fio --ioengine=nbd against dstd A's NBD port
#   fuse   fio (libaio, direct=1) on dstd B's FUSE file (FUSE -> DST client -> DST exporter)
# Rows: seq 1 MiB read/write at QD8, random 4 KiB read/write at QD32 (bench/nbd_bench.sh --quick's
# rows).  Every row is measured --reps times (default 3) for both sides back to back, old and new
# alternating which goes first; the table shows the medians and new/old.
#
# Exit status: 0 when every row's new/old is at least --min-ratio (default 0.90), 1 when a row is
# below it, other values on errors.  Needs root (tmpfs and FUSE mounts), fio with its nbd engine,
# jq, git, cmake.  Default settings take about 2 minutes once both revisions are built.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPS=3
RUNTIME=1
SIZE_MIB=128
MIN_RATIO=0.90
OUT="$ROOT/bench/results/compare-latest.md"
OLD_BUILD=""
NEW_BUILD=""
WORK_ROOT=/var/tmp/dst-compare
REVS=()

die() { printf 'compare: %s\n' "$*" >&2; exit 2; }
log() { printf 'compare: %s\n' "$*" >&2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 64; }
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --reps|--runtime|--size|--out|--min-ratio|--old-build|--new-build|--work)
      [[ $# -ge 2 ]] || usage
      case "$1" in
        --reps) REPS="$2" ;; --runtime) RUNTIME="$2" ;; --size) SIZE_MIB="$2" ;; --out) OUT="$2" ;;
        --min-ratio) MIN_RATIO="$2" ;; --old-build) OLD_BUILD="$2" ;; --new-build) NEW_BUILD="$2" ;;
        --work) WORK_ROOT="$2" ;;
      esac
      shift ;;
    -h|--help) usage ;;
    -*) echo "compare: unknown option $1" >&2; usage ;;
    *) REVS+=("$1") ;;
  esac
  shift
done
[[ ${#REVS[@]} -eq 2 ]] || usage
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "--reps takes a positive whole number"
[[ $EUID -eq 0 ]] || die "needs root (tmpfs and FUSE mounts)"
for t in fio jq git cmake fusermount3 ss; do command -v "$t" >/dev/null || die "$t not found"; done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine"

# --- builds -------------------------------------------------------------------------------------
# resolve <rev> -> the commit (or WORKTREE)
resolve() {
  [[ $1 == WORKTREE ]] && { echo WORKTREE; return; }
  git -C "$ROOT" rev-parse --verify --quiet "$1^{commit}" || die "unknown revision '$1'"
}
# build_rev <commit|WORKTREE> -> prints the build directory (holds bin/dstd, bin/dstctl)
build_rev() {
  local rev="$1" dir src build launcher=()
  if [[ $rev == WORKTREE ]]; then dir="$WORK_ROOT/worktree"; else dir="$WORK_ROOT/$rev"; fi
  # The build tree sits inside the source tree, as in a checkout, so ccache (with base_dir set)
  # finds the objects a checkout's own build left.
  src="$dir/src"; build="$dir/src/build"
  if [[ $rev == WORKTREE || ! -x $build/bin/dstd || ! -x $build/bin/dstctl ]]; then
    mkdir -p "$dir"
    rm -rf "$src"; mkdir -p "$src"
    if [[ $rev == WORKTREE ]]; then
      # Tracked and untracked-but-not-ignored files, as they are now.
      (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
         xargs -0 cp --parents -t "$src" 2>/dev/null) || true
    else
      git -C "$ROOT" archive "$rev" | tar -x -C "$src"
    fi
    command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
    log "building ${rev:0:12} in $build"
    cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDST_BUILD_TESTS=OFF \
      -DDST_BUILD_GUI=OFF "${launcher[@]}" >"$dir/configure.log" 2>&1 \
      || { tail -20 "$dir/configure.log" >&2; die "configuring ${rev:0:12} failed"; }
    cmake --build "$build" -j"${DST_JOBS:-2}" --target dstd dstctl >"$dir/build.log" 2>&1 \
      || { tail -30 "$dir/build.log" >&2; die "building ${rev:0:12} failed"; }
  fi
  echo "$build"
}
OLD_REV="$(resolve "${REVS[0]}")"; NEW_REV="$(resolve "${REVS[1]}")"
[[ -n $OLD_BUILD ]] || OLD_BUILD="$(build_rev "$OLD_REV")"
[[ -n $NEW_BUILD ]] || NEW_BUILD="$(build_rev "$NEW_REV")"
for b in "$OLD_BUILD" "$NEW_BUILD"; do
  [[ -x $b/bin/dstd && -x $b/bin/dstctl ]] || die "$b/bin/dstd or dstctl missing"
done

# --- servers ------------------------------------------------------------------------------------
WORK="$(mktemp -d /tmp/dst-compare.XXXXXX)"
PIDS=()
cleanup() {
  local rc=$? i m
  set +e
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do stop_daemon "${PIDS[$i]}"; done
  for m in "$WORK"/*/mnt; do
    grep -qs " $m " /proc/self/mounts && { fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m"; }
  done
  end_cleanup "$rc" "$WORK"
}
install_traps

mkdir -p "$WORK/tmpfs"
mount -t tmpfs -o "size=$(( 2 * SIZE_MIB + 64 ))m,mode=0700" dst-compare "$WORK/tmpfs"
log "filling two ${SIZE_MIB} MiB backing files on tmpfs"
# Random content: a hole or a zero page on tmpfs reads faster than real data would.
dd if=/dev/urandom of="$WORK/tmpfs/old.img" bs=1M count="$SIZE_MIB" status=none
cp "$WORK/tmpfs/old.img" "$WORK/tmpfs/new.img"

# start_dstd <bin dir> <state dir> -> 0 once it answers on its control socket
start_dstd() {
  local bin="$1" d="$2" pid i
  "$bin/dstd" --config "$d/dstd.toml" --state-dir "$d" --control "$d/dstd.sock" >"$d/dstd.log" 2>&1 &
  pid=$!
  for i in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || { cat "$d/dstd.log" >&2; die "dstd in $d exited during startup"; }
    if "$bin/dstctl" --socket "$d/dstd.sock" status >/dev/null 2>&1; then PIDS+=("$pid"); return 0; fi
    sleep 0.1
  done
  cat "$d/dstd.log" >&2; die "dstd in $d did not answer within 15 s"
}

# start_side <old|new> <build dir>: sets NBD_PORT[side] and FILE[side]
declare -A NBD_PORT FILE
start_side() {
  local side="$1" bin="$2/bin" a="$WORK/$1/a" b="$WORK/$1/b" port_a port_b i
  mkdir -p "$a" "$b" "$b/mnt"
  port_a="$(free_port)"; port_b="$(free_port)"
  printf '[daemon]\nlisten = "127.0.0.1:%s"\nnbd_listen = "127.0.0.1:0"\n\n[[export]]\nname = "vol"\npath = "%s"\nallow = ["anonymous:rw"]\n' \
    "$port_a" "$WORK/tmpfs/$side.img" >"$a/dstd.toml"
  start_dstd "$bin" "$a"
  NBD_PORT[$side]="$("$bin/dstctl" --socket "$a/dstd.sock" status --json | jq -r '.nbd.port // empty')"
  [[ -n ${NBD_PORT[$side]} && ${NBD_PORT[$side]} != 0 ]] || die "$side dstd A has no NBD port"
  printf '[daemon]\nlisten = "127.0.0.1:%s"\nmountpoint = "%s"\n\n[[volume]]\nname = "vol"\nremote = "dst://127.0.0.1:%s/vol"\nqueue_depth = 64\n' \
    "$port_b" "$b/mnt" "$port_a" >"$b/dstd.toml"
  start_dstd "$bin" "$b"
  FILE[$side]="$b/mnt/vol.img"
  for i in $(seq 1 100); do [[ -e ${FILE[$side]} ]] && return 0; sleep 0.1; done
  die "$side dstd B did not show ${FILE[$side]}"
}
start_side old "$OLD_BUILD"
start_side new "$NEW_BUILD"

# --- measurements -------------------------------------------------------------------------------
# cell <group> <side> <unit> <rw> <bs> <qd> -> MB/s or IOPS
cell() {
  local group="$1" side="$2" unit="$3" rw="$4" bs="$5" qd="$6" target json dir mem=malloc
  if [[ $group == nbd ]]; then target=(--ioengine=nbd "--uri=nbd://127.0.0.1:${NBD_PORT[$side]}/vol")
  else target=(--ioengine=libaio "--filename=${FILE[$side]}" --direct=1 "--size=${SIZE_MIB}m" --invalidate=1); fi
  [[ $bs == 1m ]] && mem=mmap  # fio's default buffers cap large reads near 2 GiB/s
  json="$(fio --name=cmp "${target[@]}" --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 --iomem="$mem" \
      --time_based --runtime="$(awk -v s="$RUNTIME" 'BEGIN { printf "%dms", s * 1000 }')" --randrepeat=1 \
      --norandommap --output-format=json 2>"$WORK/fio.err" | sed -n '/^{/,$p')" \
    || { cat "$WORK/fio.err" >&2; die "fio failed ($group $side $rw $bs qd$qd)"; }
  case "$rw" in *read) dir=read ;; *) dir=write ;; esac
  if [[ $unit == MB/s ]]; then jq -r ".jobs[0].$dir.bw_bytes / 1e6 | . * 10 | round / 10" <<<"$json"
  else jq -r ".jobs[0].$dir.iops | round" <<<"$json"; fi
}
median() { tr ' ' '\n' <<<"$*" | sed '/^$/d' | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

ROWS=(
  "seq-read-1M-qd8    read       1m  8   MB/s"
  "seq-write-1M-qd8   write      1m  8   MB/s"
  "rand-read-4K-qd32  randread   4k  32  IOPS"
  "rand-write-4K-qd32 randwrite  4k  32  IOPS"
)
GROUPS_=(nbd fuse)
declare -A V
T0=$(date +%s)
for (( rep=1; rep<=REPS; rep++ )); do
  if (( rep % 2 )); then order=(old new); else order=(new old); fi
  for row in "${ROWS[@]}"; do
    read -r name rw bs qd unit <<<"$row"
    for g in "${GROUPS_[@]}"; do
      for side in "${order[@]}"; do
        v="$(cell "$g" "$side" "$unit" "$rw" "$bs" "$qd")"
        V[$g,$name,$side]+="$v "
        printf 'compare: rep %d %-5s %-18s %-3s %10s %s\n' "$rep" "$g" "$name" "$side" "$v" "$unit" >&2
      done
    done
  done
done
T1=$(date +%s)

# --- table --------------------------------------------------------------------------------------
label() { [[ $1 == WORKTREE ]] && echo "worktree" || git -C "$ROOT" log -1 --format='%h %s' "$1" | cut -c1-72; }
BELOW=0
{
  echo "# dst old/new comparison"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- old: $(label "$OLD_REV") (build $OLD_BUILD)"
  echo "- new: $(label "$NEW_REV") (build $NEW_BUILD)"
  echo "- machine: $(nproc) CPUs, kernel $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- $REPS reps x ${RUNTIME} s per cell, medians; ${SIZE_MIB} MiB backing file per side on tmpfs; $(fio --version)"
  echo "- nbd: fio nbd engine -> dstd A's NBD port; fuse: fio libaio direct=1 -> dstd B FUSE file -> DST -> dstd A"
  echo "- wall time: $(( T1 - T0 )) s of measurement; pass mark new/old >= $MIN_RATIO"
  echo
  echo "| group | row | unit | old (median) | new (median) | new/old | old runs | new runs | met |"
  echo "|---|---|---|---:|---:|---:|---|---|---|"
  for g in "${GROUPS_[@]}"; do
    for row in "${ROWS[@]}"; do
      read -r name _ _ _ unit <<<"$row"
      o="$(median ${V[$g,$name,old]})"; n="$(median ${V[$g,$name,new]})"
      r="$(awk -v a="$n" -v b="$o" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "0" }')"
      met=yes
      awk -v r="$r" -v m="$MIN_RATIO" 'BEGIN { exit !(r + 0 < m + 0) }' && { met=no; BELOW=$(( BELOW + 1 )); }
      echo "| $g | $name | $unit | $o | $n | $r | ${V[$g,$name,old]% } | ${V[$g,$name,new]% } | $met |"
    done
  done
  echo
  if (( BELOW )); then echo "verdict: $BELOW row(s) below ${MIN_RATIO}x"; else echo "verdict: every row at or above ${MIN_RATIO}x"; fi
} >"$WORK/table.md"
cat "$WORK/table.md"
mkdir -p "$(dirname "$OUT")"; cp "$WORK/table.md" "$OUT"
(( BELOW == 0 ))
