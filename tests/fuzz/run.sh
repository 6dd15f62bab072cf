#!/usr/bin/env bash
# Runs the libFuzzer targets of tests/fuzz (built with -DDST_FUZZ=ON, see CMakeLists.txt there).
#
#   bash tests/fuzz/run.sh [TARGET...]            # DST_FUZZ_SECONDS (default 30) each: the CI smoke
#   bash tests/fuzz/run.sh --long [TARGET...]     # DST_FUZZ_RUNS (default 10,000,000) executions each,
#                                                 # resumable (see below)
#   bash tests/fuzz/run.sh --replay [TARGET...]   # every seed and saved crash input once
#
# Options: --build-dir DIR (default ./build-sanitize, as `quickstart.sh test --sanitize` makes it).
# TARGET defaults to every fuzz_* binary in DIR/bin.  Seeds: tests/fuzz/corpus/<target>; inputs
# found on the way go to DIR/fuzz/<target>/corpus, crash inputs to DIR/fuzz/<target>/ (crash-*,
# leak-*, timeout-*: copy one to tests/fuzz/regressions/<target>/ when you fix it).
# --long runs in chunks of DST_FUZZ_CHUNK (default 1,000,000) executions and records the
# executions and seconds done in DIR/fuzz/<target>/long.state after each chunk: stopped or
# killed, it resumes from the saved corpus and count, losing at most one chunk.  A target whose
# state has reached DST_FUZZ_RUNS is only summarised; delete long.state to start over.
# Prints one summary line per target; exits non-zero if any target crashed, leaked or hung.
# A faster build for long runs of allocation-heavy targets (fuzz_control: ASan's allocator is
# most of its time): UBSan plus libstdc++ assertions instead of ASan,
#   CC=clang-14 CXX=clang++-14 cmake -S . -B build-fuzz-ub -DDST_FUZZ=ON \
#       -DDST_FUZZ_SANITIZERS=undefined -DDST_BUILD_GUI=OFF
#   cmake --build build-fuzz-ub -j2 --target fuzz_control
#   bash tests/fuzz/run.sh --long --build-dir build-fuzz-ub fuzz_control
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BUILD="$ROOT/build-sanitize"
MODE=smoke
TARGETS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --long) MODE=long ;;
    --replay) MODE=replay ;;
    --build-dir) BUILD="$(realpath -m "$2")"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 64 ;;
    *) TARGETS+=("$1") ;;
  esac
  shift
done
if [[ ${#TARGETS[@]} -eq 0 ]]; then
  for f in "$BUILD"/bin/fuzz_*; do [[ -x $f ]] && TARGETS+=("$(basename "$f")"); done
fi
[[ ${#TARGETS[@]} -gt 0 ]] || { echo "run.sh: no fuzz_* binaries in $BUILD/bin (configure with -DDST_FUZZ=ON)" >&2; exit 1; }

# halt_on_error: a UBSan finding is a crash; detect_leaks: a leak per input is one too.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"

failed=0
for t in "${TARGETS[@]}"; do
  bin="$BUILD/bin/$t"
  [[ -x $bin ]] || { echo "run.sh: $bin missing" >&2; failed=1; continue; }
  seeds="$HERE/corpus/$t"
  regress="$HERE/regressions/$t"
  out="$BUILD/fuzz/$t"
  mkdir -p "$out/corpus"
  dirs=()
  [[ -d $seeds ]] && dirs+=("$seeds")
  [[ -d $regress ]] && dirs+=("$regress")
  # -close_fd_mask=2: the servers log every protocol violation to stderr; libFuzzer keeps its own
  # output and the sanitizer reports.
  common=(-artifact_prefix="$out/" -print_final_stats=1 -close_fd_mask=2 -timeout=10 -rss_limit_mb=2048
          -max_len=16384)
  log="$out/$MODE.log"
  rc=0
  if [[ $MODE == long ]]; then
    # -detect_leaks=0: no leak check after each input that frees less than it allocated (the
    # client targets leave the device's teardown to their io thread, so that is every input, and
    # the check halves their rate).  Leaks still fail the run: LSan checks at exit, and memory
    # that grows per input hits -rss_limit_mb.  The smoke and replay modes check every input.
    total="${DST_FUZZ_RUNS:-10000000}"
    chunk="${DST_FUZZ_CHUNK:-1000000}"
    state="$out/long.state"
    execs=0 secs=0 chunks=0
    [[ -f $state ]] && read -r execs secs chunks < "$state"
    while [[ $rc -eq 0 && $execs -lt $total ]]; do
      n=$(( total - execs < chunk ? total - execs : chunk ))
      start=$(date +%s)
      "$bin" "${common[@]}" -runs="$n" -detect_leaks=0 "$out/corpus" "${dirs[@]}" >"$log" 2>&1 || rc=$?
      [[ $rc -eq 0 ]] || break
      execs=$(( execs + n ))
      secs=$(( secs + $(date +%s) - start ))
      chunks=$(( chunks + 1 ))
      echo "$execs $secs $chunks" > "$state.tmp" && mv "$state.tmp" "$state"
    done
    what="$execs executions in $secs s ($chunks runs of at most $chunk)"
  else
    case "$MODE" in
      replay) args=(-runs=0 "${dirs[@]}") ;;
      smoke) args=(-max_total_time="${DST_FUZZ_SECONDS:-30}" "$out/corpus" "${dirs[@]}") ;;
    esac
    start=$(date +%s)
    "$bin" "${common[@]}" "${args[@]}" >"$log" 2>&1 || rc=$?
    secs=$(( $(date +%s) - start ))
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    what="${execs:-?} executions in ${secs} s"
  fi
  cov="$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" 2>/dev/null | tail -1 || true)"
  corpus="$(ls "$out/corpus" | wc -l) files"
  [[ $MODE == replay ]] && corpus="${#dirs[@]} dirs"
  if [[ $rc -eq 0 ]]; then
    echo "fuzz: $t ($MODE): $what, ${cov:-cov: ?}, corpus ${corpus}, crashes: 0"
  else
    failed=1
    echo "fuzz: $t ($MODE): FAILED (exit $rc) after $what; log $log" >&2
    grep -A40 -m1 'ERROR: \|runtime error\|==ERROR\|deadly signal' "$log" >&2 || tail -40 "$log" >&2
    ls "$out"/crash-* "$out"/leak-* "$out"/timeout-* "$out"/oom-* 2>/dev/null >&2 || true
  fi
done
exit "$failed"
