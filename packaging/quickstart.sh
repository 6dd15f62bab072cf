#!/usr/bin/env bash
# dst quick start: installs the Debian 12 packages dst needs, builds it, then either runs a
# small end-to-end demo or the whole test suite.
#
#   bash packaging/quickstart.sh demo [--keep]   # a PSK, two exporters, a mirror over dsts:// (TLS 1.3), FUSE, ext4 on loop
#   bash packaging/quickstart.sh test            # ctest, every label (what .ci/run does first)
#   bash packaging/quickstart.sh test --sanitize # clang, ASan + UBSan, in ./build-sanitize: the unit
#                                                # and integration suites and the fuzz targets' replays
#   bash packaging/quickstart.sh build           # packages + build only
#   bash packaging/quickstart.sh deps            # packages only
#
# Options:  --keep            (demo) leave everything running and print how to clean up
#           --build-dir DIR   build tree (default: ./build in the repository root)
#           --no-deps         do not touch apt (for machines that already have everything)
#           --sanitize        build with clang-14, AddressSanitizer, UBSan and the libFuzzer targets
#                             (default build tree ./build-sanitize); test runs unit|integration
#           --labels REGEX    (test) only the CTest labels matching REGEX, e.g. 'unit|fuzz'
# Environment: DST_JOBS (default 2) parallel build and test jobs; DST_FUZZ_SECONDS (default 30)
#              per fuzz target in the fuzz_smoke_* tests (label fuzz); DST_DEMO_TIMEOUT (default 300)
#              seconds before a hung demo is torn down; DST_DEMO_MKFS_OPTIONS extra mkfs.ext4 options.
#
# Runs as root on a fresh Debian 12 machine (the demo needs root for FUSE, losetup and mount).
# Idempotent: packages already installed are not reinstalled, apt-get update runs at most once an
# hour, the build is incremental, the demo works in a fresh temporary directory every time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS="${DST_JOBS:-2}"
BUILD="$ROOT/build"
BUILD_SET=0
MODE=""
KEEP=0
NO_DEPS=0
SANITIZE=0
LABELS=""

# The package list is also quoted in README.md ("Dependencies"); keep the two in sync.
PACKAGES=(
  build-essential cmake pkg-config                  # compiler, build system
  libboost-dev libfuse3-dev libsqlite3-dev          # Asio, FUSE, state database
  libcli11-dev nlohmann-json3-dev libfmt-dev libspdlog-dev libxxhash-dev libtomlplusplus-dev
  libssl-dev                                        # OpenSSL 3: TLS 1.3 (dsts://), dstctl key generate
  qt6-base-dev                                      # Qt Test (tests) and the GUI
  fuse3 kmod util-linux mount e2fsprogs             # fusermount3, modprobe, losetup, mkfs.ext4
  fio jq                                            # benchmark and its JSON parsing
  nbdkit libnbd-bin qemu-utils                      # NBD comparison tests (nbdfuse is in libnbd-bin)
  iproute2 iptables procps                          # ss, fault injection, pgrep/ps in tests
  file                                              # CPack's dpkg-shlibdeps step (cpack -G DEB)
  clang-14 libclang-rt-14-dev                       # libFuzzer, ASan, UBSan (test --sanitize, tests/fuzz)
  git python3 python3-prometheus-client             # tools/get-maintainer; metrics format test
  libsystemd-dev lintian mmdebstrap                 # sd_notify (Type=notify, watchdog); package checks
  desktop-file-utils                                # desktop-file-validate (dst-gui.desktop test)
)

if [[ -t 1 ]]; then
  log() { printf '\033[1m==> %s\033[0m\n' "$*"; }
else
  log() { printf '==> %s\n' "$*"; }
fi
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
  exit 64
}

as_root() {
  if [[ $EUID -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "needs root for: $*"; fi
}

# ---------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------

missing_packages() {
  local p status
  for p in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)"
    [[ $status == installed ]] || echo "$p"
  done
}

# apt-get update at most once an hour: the newest of apt's own periodic stamp, our stamp and the
# lists directory.  A fresh container has empty lists, so always update then.
apt_lists_fresh() {
  local stamp="/var/lib/apt/periodic/dst-quickstart-update-stamp" newest=0 t f
  compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || return 1
  for f in /var/lib/apt/periodic/update-success-stamp "$stamp" /var/lib/apt/lists/partial; do
    [[ -e $f ]] || continue
    t="$(stat -c %Y "$f")"
    (( t > newest )) && newest=$t
  done
  (( $(date +%s) - newest < 3600 ))
}

install_deps() {
  local missing
  mapfile -t missing < <(missing_packages)
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "all ${#PACKAGES[@]} packages already installed"
    return
  fi
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt_lists_fresh; then
    as_root apt-get update
    as_root mkdir -p /var/lib/apt/periodic
    as_root touch /var/lib/apt/periodic/dst-quickstart-update-stamp
  fi
  as_root apt-get install -y --no-install-recommends "${missing[@]}"
}

# /dev/fuse and loop devices: load the modules if the nodes are missing (fresh VMs sometimes lack
# them until first use).  Failure is not fatal here: the tests report what is missing.
load_modules() {
  if [[ ! -e /dev/fuse ]]; then
    as_root modprobe fuse 2>/dev/null || echo "quickstart: warning: /dev/fuse missing and 'modprobe fuse' failed" >&2
  fi
  if [[ ! -e /dev/loop-control ]]; then
    as_root modprobe loop 2>/dev/null || echo "quickstart: warning: /dev/loop-control missing and 'modprobe loop' failed" >&2
  fi
}

# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------

build() {
  log "configuring $BUILD"
  # -g1: line tables only.  Backtraces and sanitizer reports still name functions, files and
  # lines; full debug info made objects 4-5x larger and the CI build minutes longer (about 90
  # executables link against Qt and Asio).  Developers' own build directories keep -g.
  local opt=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG"
             "-DCMAKE_C_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG")
  if [[ ! -f $BUILD/CMakeCache.txt && $SANITIZE -eq 1 ]]; then
    # DST_FUZZ builds every target with ASan + UBSan (and coverage feedback) plus the fuzzers.
    CC=clang-14 CXX=clang++-14 cmake -S "$ROOT" -B "$BUILD" "${opt[@]}" -DDST_FUZZ=ON -DDST_BUILD_GUI=OFF
  elif [[ ! -f $BUILD/CMakeCache.txt ]]; then
    cmake -S "$ROOT" -B "$BUILD" "${opt[@]}"
  else
    cmake -S "$ROOT" -B "$BUILD" >/dev/null
  fi
  # Only unit (and fuzz) tests wanted: build just their executables, not the daemons and tools.
  local targets=() l
  if [[ -n $LABELS ]]; then
    for l in ${LABELS//|/ }; do
      case "$l" in
        unit) targets+=(tests_unit) ;;
        fuzz) targets+=(fuzzers) ;;
        *) targets=(); break ;;
      esac
    done
  fi
  log "building ${targets[*]:-everything} with -j$JOBS"
  if [[ ${#targets[@]} -gt 0 ]]; then
    cmake --build "$BUILD" -j"$JOBS" --target "${targets[@]}"
  else
    cmake --build "$BUILD" -j"$JOBS"
  fi
}

# ---------------------------------------------------------------------------------------------
# Test
# ---------------------------------------------------------------------------------------------

run_tests() {
  local labels="$LABELS"
  if [[ -z $labels && $SANITIZE -eq 1 ]]; then labels='unit|integration'; fi
  local sel=()
  [[ -n $labels ]] && sel=(-L "$labels")
  if [[ $SANITIZE -eq 1 ]]; then
    # Any finding fails the test: UBSan aborts (also -fno-sanitize-recover), ASan reports leaks.
    export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:detect_stack_use_after_return=0}"
    export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
    export LSAN_OPTIONS="${LSAN_OPTIONS:-suppressions=$ROOT/tests/lsan.supp:print_suppressions=0}"
  fi
  log "running ctest (${labels:-all labels}) in $BUILD"
  # --no-tests=error: an empty test list is a failure, not a green run.
  ctest --test-dir "$BUILD" --output-on-failure -j"$JOBS" --timeout 600 --no-tests=error "${sel[@]}"
}

# ---------------------------------------------------------------------------------------------
# Demo
# ---------------------------------------------------------------------------------------------

BIN=""
WORK=""
PIDS=()      # daemons started by this script, in start order
LOOPDEV=""
WATCHDOG=""

# mountpoint(1) stats the directory, which fails on a dead FUSE mount (ENOTCONN): read the table.
is_mounted() { grep -qs " $1 " /proc/self/mounts; }

free_port() {
  local p i
  for i in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 40000 ))
    if [[ -z "$(ss -Hltn "sport = :$p" 2>/dev/null)" ]]; then echo "$p"; return; fi
  done
  die "no free TCP port found"
}

ctl() {  # ctl <daemon dir> args...
  local d="$1"; shift
  "$BIN/dstctl" --socket "$d/dstd.sock" "$@"
}

start_daemon() {  # start_daemon <dir> [extra dstd args...]; the config is <dir>/dstd.toml
  local d="$1"; shift
  # setsid: a terminal's Ctrl-C reaches this script (whose trap cleans up) but not the daemons
  # directly, so they get an orderly SIGTERM after the loop device and ext4 are gone.
  setsid "$BIN/dstd" --config "$d/dstd.toml" --state-dir "$d" --control "$d/dstd.sock" "$@" \
    >"$d/dstd.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  local i
  for i in $(seq 1 100); do
    if ! kill -0 "$pid" 2>/dev/null; then
      cat "$d/dstd.log" >&2
      die "dstd in $d exited during startup (log above)"
    fi
    if [[ -S $d/dstd.sock ]] && ctl "$d" status >/dev/null 2>&1; then return; fi
    sleep 0.1
  done
  cat "$d/dstd.log" >&2
  die "dstd in $d did not answer on its control socket within 10 s"
}

wait_for_file() {  # wait_for_file <path> <seconds>
  local i
  for i in $(seq 1 $(( $2 * 10 ))); do
    [[ -e $1 ]] && return 0
    sleep 0.1
  done
  return 1
}

stop_daemon() {  # SIGTERM (dstd drains, flushes, unmounts), SIGKILL after 30 s
  local pid="$1" i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 200); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  echo "quickstart: dstd $pid ignored SIGTERM for 20 s, killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

demo_cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [[ -n $WATCHDOG ]]; then kill "$WATCHDOG" 2>/dev/null; wait "$WATCHDOG" 2>/dev/null; fi
  if [[ $KEEP -eq 1 && $rc -eq 0 ]]; then
    demo_print_keep
    return
  fi
  log "cleaning up $WORK"
  if is_mounted "$WORK/fs"; then umount "$WORK/fs" || umount -l "$WORK/fs"; fi
  if [[ -n $LOOPDEV ]]; then losetup -d "$LOOPDEV"; fi
  local i
  # Stop the importer(s) before the exporter so they do not spend io_timeout reconnecting.
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do stop_daemon "${PIDS[$i]}"; done
  # A daemon that died without unmounting leaves a dead FUSE mount behind.
  if is_mounted "$WORK/mnt"; then fusermount3 -u -z "$WORK/mnt" 2>/dev/null || umount -l "$WORK/mnt"; fi
  rm -rf --one-file-system "$WORK"
  if [[ $rc -ne 0 ]]; then echo "quickstart: demo FAILED (exit $rc)" >&2; fi
  exit "$rc"
}

demo_print_keep() {
  cat <<EOF

Demo left running (--keep).  Look around:
  $BIN/dstctl --socket $WORK/a/dstd.sock status
  $BIN/dstctl --socket $WORK/b/dstd.sock volume list
  ls -l $WORK/mnt; df -h $WORK/fs
Clean up with:
  umount $WORK/fs
  losetup -d $LOOPDEV
  kill -TERM ${PIDS[1]}; sleep 2   # dstd B (importer): drains, flushes, unmounts $WORK/mnt
  kill -TERM ${PIDS[0]}            # dstd A (exporter)
  rm -rf $WORK
EOF
}

run_demo() {
  [[ $EUID -eq 0 ]] || die "the demo needs root (FUSE mount, losetup, mount): run it with sudo"
  BIN="$BUILD/bin"
  [[ -x $BIN/dstd && -x $BIN/dstctl ]] || die "dstd/dstctl not found in $BIN (did the build fail?)"
  load_modules

  WORK="$(mktemp -d /tmp/dst-demo.XXXXXX)"
  trap demo_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  mkdir -p "$WORK/a" "$WORK/c" "$WORK/b" "$WORK/mnt" "$WORK/fs"
  local port_a port_b port_c d name port
  port_a="$(free_port)"
  port_b="$(free_port)"
  port_c="$(free_port)"

  # One pre-shared key for the lab (docs/security.md): every daemon speaks DST only inside
  # TLS 1.3 with it, and the mirror's legs dial dsts://.
  log "key: dstctl key generate --identity demo $WORK/lab.psk (TLS 1.3 PSK, mode 0600)"
  "$BIN/dstctl" key generate --identity demo "$WORK/lab.psk"
  local tls
  tls="tls_psk_file = \"$WORK/lab.psk\""

  # Daemons A and C: two exporters ("hosts" on loopback), one sparse 256 MiB image each.
  log "daemon A: exporting disk0 on 127.0.0.1:$port_a; daemon C: exporting disk1 on 127.0.0.1:$port_c (TLS, allow = [\"demo:rw\"]: only the lab key may use them)"
  truncate -s 256M "$WORK/a/disk0.img" "$WORK/c/disk1.img"
  for d in a c; do
    if [[ $d == a ]]; then name=disk0 port=$port_a; else name=disk1 port=$port_c; fi
    printf '[daemon]\nlisten = "127.0.0.1:%s"\nnbd_listen = ""\nbatching = true\n%s\n\n[[export]]\nname = "%s"\npath = "%s"\nallow = ["demo:rw"]\n' \
      "$port" "$tls" "$name" "$WORK/$d/$name.img" >"$WORK/$d/dstd.toml"
    start_daemon "$WORK/$d"
  done

  # Daemon B: assembles the mirror, configured at run time through dstctl.
  log "daemon B: mirror 'demo' = dsts://127.0.0.1:$port_a/disk0 + dsts://127.0.0.1:$port_c/disk1, FUSE at $WORK/mnt"
  printf '[daemon]\nlisten = "127.0.0.1:%s"\nnbd_listen = ""\nbatching = true\n%s\n' "$port_b" "$tls" >"$WORK/b/dstd.toml"
  start_daemon "$WORK/b"
  start_watchdog
  ctl "$WORK/b" array create demo --level mirror \
    "dsts://127.0.0.1:$port_a/disk0" "dsts://127.0.0.1:$port_c/disk1"
  ctl "$WORK/b" mount "$WORK/mnt"
  wait_for_file "$WORK/mnt/demo.img" 10 || die "$WORK/mnt/demo.img did not appear"
  ls -l "$WORK/mnt"

  log "loop device with direct I/O on $WORK/mnt/demo.img, ext4 on top"
  LOOPDEV="$(losetup --find --show --direct-io=on "$WORK/mnt/demo.img")"
  echo "loop device: $LOOPDEV (direct I/O: $(cat "/sys/block/${LOOPDEV#/dev/}/loop/dio" 2>/dev/null || echo '?'))"
  # shellcheck disable=SC2086  # word splitting of the options is wanted
  mkfs.ext4 -q -F ${DST_DEMO_MKFS_OPTIONS:-} "$LOOPDEV"
  mount "$LOOPDEV" "$WORK/fs"

  log "writing files through ext4 -> loop -> FUSE -> dstd B (mirror) -> TLS 1.3 -> dstd A + dstd C"
  echo "hello from dst, $(date -u)" >"$WORK/fs/hello.txt"
  dd if=/dev/urandom of="$WORK/fs/random.bin" bs=1M count=16 status=none
  sync -f "$WORK/fs"
  local sum_before sum_after
  sum_before="$(sha256sum <"$WORK/fs/random.bin")"
  # Read back past the page cache: drop it, then compare.
  echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  sum_after="$(sha256sum <"$WORK/fs/random.bin")"
  [[ $sum_before == "$sum_after" ]] || die "read-back mismatch: $sum_before vs $sum_after"
  cat "$WORK/fs/hello.txt"
  echo "random.bin (16 MiB) sha256 ${sum_after%% *} read back OK"
  df -h "$WORK/fs" | sed 's/^/  /'

  log "dstctl status (daemon A, exporter)"
  ctl "$WORK/a" status
  log "dstctl status (daemon B, mirror)"
  ctl "$WORK/b" status
  log "dstctl detail demo (daemon B)"
  ctl "$WORK/b" detail demo
  # The initial full sync of the new leg runs in the background; wait for [UU] (detail --test 0).
  local i
  for (( i = 0; i < 120; i++ )); do
    ctl "$WORK/b" detail demo --test >/dev/null 2>&1 && break
    sleep 0.5
  done
  log "after the initial sync (daemon B)"
  ctl "$WORK/b" status | sed -n '/^arrays:/,$p'
  log "demo OK"
}

# A hung I/O path leaves mkfs or mount in uninterruptible sleep, where neither a signal to this
# script nor its EXIT trap can run.  After DST_DEMO_TIMEOUT seconds, SIGKILL the importing daemon:
# the kernel then aborts its FUSE connection, the blocked I/O fails, and the trap cleans up.
start_watchdog() {
  local t="${DST_DEMO_TIMEOUT:-300}" main=$$ importer="${PIDS[${#PIDS[@]}-1]}" i
  (
    for (( i = 0; i < t; i++ )); do sleep 1; kill -0 "$main" 2>/dev/null || exit 0; done
    echo "quickstart: demo still running after $t s: killing dstd $importer to release blocked I/O" >&2
    kill -KILL "$importer" 2>/dev/null
    kill -TERM "$main" 2>/dev/null
  ) &
  WATCHDOG=$!
}

# ---------------------------------------------------------------------------------------------

[[ $# -ge 1 ]] || usage
MODE="$1"; shift
while [[ $# -gt 0 ]]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --no-deps) NO_DEPS=1 ;;
    --build-dir) [[ $# -ge 2 ]] || usage; BUILD="$(realpath -m "$2")"; BUILD_SET=1; shift ;;
    --sanitize) SANITIZE=1 ;;
    --labels) [[ $# -ge 2 ]] || usage; LABELS="$2"; shift ;;
    -h|--help) usage ;;
    *) echo "quickstart: unknown option $1" >&2; usage ;;
  esac
  shift
done

if [[ $SANITIZE -eq 1 && $BUILD_SET -eq 0 ]]; then BUILD="$ROOT/build-sanitize"; fi

case "$MODE" in
  deps) install_deps ;;
  build) [[ $NO_DEPS -eq 1 ]] || install_deps; build ;;
  test)
    [[ $NO_DEPS -eq 1 ]] || install_deps
    load_modules
    build
    run_tests
    ;;
  demo)
    [[ $NO_DEPS -eq 1 ]] || install_deps
    build
    run_demo
    ;;
  -h|--help|help) usage ;;
  *) echo "quickstart: unknown command '$MODE'" >&2; usage ;;
esac
