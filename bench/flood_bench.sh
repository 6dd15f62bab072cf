#!/usr/bin/env bash
# Connection-flood benchmark (issue 11 item 3): a legitimate NBD client's IOPS alone and while
# 2,000 connections from other loopback addresses send one byte and hold (reconnecting when dstd
# closes them), with dstd's RSS and fd count.  dstd runs with its default [limits].
#
#   bash bench/flood_bench.sh [--quick] [--build-dir DIR] [--conns N] [--seconds S]
#                             [--reconnect-ms MS]
#
# A flood connection dstd closes (over a cap, handshake deadline) is opened again after
# --reconnect-ms (default 1000; 0 adds a connect flood on top).
# The last line is machine-readable: RESULT ratio=... alone_iops=... loaded_iops=...
# max_stall_ms=... rss_mib=... fds=... ok=...   --quick (the `bench` CTest smoke): 300
# connections, 1 s per phase.  Connects only to 127.0.0.1 (from 127.0.0.1 and 127.0.1.x).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${DST_BUILD_DIR:-$ROOT/build}"
CONNS=2000
SECONDS_PER_PHASE=5
RECONNECT_MS=1000

die() { printf 'flood-bench: %s\n' "$*" >&2; exit 1; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 64; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) CONNS=300; SECONDS_PER_PHASE=1 ;;
    --build-dir) [[ $# -ge 2 ]] || usage; BUILD="$2"; shift ;;
    --conns) [[ $# -ge 2 ]] || usage; CONNS="$2"; shift ;;
    --seconds) [[ $# -ge 2 ]] || usage; SECONDS_PER_PHASE="$2"; shift ;;
    --reconnect-ms) [[ $# -ge 2 ]] || usage; RECONNECT_MS="$2"; shift ;;
    -h|--help) usage ;;
    *) echo "flood-bench: unknown option $1" >&2; usage ;;
  esac
  shift
done

BIN="$BUILD/bin"
[[ -x $BIN/dstd && -x $BIN/conn_flood ]] || die "dstd/conn_flood not found in $BIN (build first, or pass --build-dir)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

WORK="$(mktemp -d /tmp/dst-flood-bench-XXXXXX)"
DSTD_PID=""
cleanup() {
  local rc=$?
  [[ -n $DSTD_PID ]] && stop_daemon "$DSTD_PID"
  end_cleanup "$rc" "$WORK"
}
install_traps

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
(( $(ulimit -n) >= CONNS + 64 )) || die "ulimit -n $(ulimit -n) is below $CONNS + 64"

# free_port only probes: another process may take a port before dstd binds it.  Retry then.
start_dstd() {
  PORT=$(free_port)
  NBD_PORT=$(free_port)
  cat > "$WORK/dstd.toml" <<TOML
[daemon]
listen = "127.0.0.1:$PORT"
nbd_listen = "127.0.0.1:$NBD_PORT"

[[export]]
allow = ["anonymous:rw"]  # plaintext loopback clients (docs/security.md "Default deny")
name = "disk"
path = "$WORK/disk.img"
size = "64M"
TOML
  "$BIN/dstd" --config "$WORK/dstd.toml" --state-dir "$WORK/state" --control "$WORK/dstd.sock" \
    > "$WORK/dstd.log" 2>&1 &
  DSTD_PID=$!
  for _ in $(seq 1 100); do
    [[ -S $WORK/dstd.sock ]] && return 0
    kill -0 "$DSTD_PID" 2>/dev/null || break
    sleep 0.1
  done
  stop_daemon "$DSTD_PID"
  DSTD_PID=""
  rm -f "$WORK/dstd.sock"
  return 1
}
for attempt in 1 2 3; do
  start_dstd && break
  cat "$WORK/dstd.log" >&2
  [[ $attempt -lt 3 ]] || die "dstd did not start"
done
sleep 0.5  # the NBD listener
"$BIN/conn_flood" --port "$NBD_PORT" --export disk --pid "$DSTD_PID" --conns "$CONNS" \
  --seconds "$SECONDS_PER_PHASE" --reconnect-ms "$RECONNECT_MS"
printf 'flood-bench: dstd log lines during the run: %s\n' "$(wc -l < "$WORK/dstd.log")" >&2
