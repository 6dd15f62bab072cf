#!/usr/bin/env bash
# Flood and fairness benchmark (issue 11 item 3): a legitimate NBD client's IOPS alone and under
# each attack from other loopback addresses (conn_flood --attack), with dstd's RSS and fd count:
#   held       2,000 connections that send one byte and hold
#   slowdrain  8 connections that keep 32 READs of 4 MiB queued and read the replies at ~200 KB/s
#   trickle    2,000 connections that send a handshake byte every 8 s
# dstd runs with its default [limits] (plus --min-drain-rate when given).
#
#   bash bench/flood_bench.sh [--quick] [--build-dir DIR] [--conns N] [--seconds S]
#                             [--reconnect-ms MS] [--attacks held,slowdrain,trickle]
#                             [--slow-conns 8] [--drain-kbps 200] [--min-drain-rate BYTES]
#                             [--dstd PATH]   (another dstd, e.g. an older build, to compare)
#
# An attack connection dstd closes (over a cap, a deadline, too slow a reader) is opened again
# after --reconnect-ms (default 1000; 0 adds a connect flood on top).
# One machine-readable line per attack: RESULT ratio=... alone_iops=... loaded_iops=...
# max_stall_ms=... rss_mib=... fds=... ok=... attack=...   Target: ratio >= 0.8 and no request
# over 1 s.  --quick (the `bench` CTest smoke): 300 connections, 1 s per phase.  Connects only
# to 127.0.0.1 (from 127.0.0.1 and 127.0.x.y).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${DST_BUILD_DIR:-$ROOT/build}"
CONNS=2000
SECONDS_PER_PHASE=5
RECONNECT_MS=1000
ATTACKS=held,slowdrain,trickle
SLOW_CONNS=8
DRAIN_KBPS=200
MIN_DRAIN_RATE=""

die() { printf 'flood-bench: %s\n' "$*" >&2; exit 1; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 64; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) CONNS=300; SECONDS_PER_PHASE=1 ;;
    --build-dir) [[ $# -ge 2 ]] || usage; BUILD="$2"; shift ;;
    --conns) [[ $# -ge 2 ]] || usage; CONNS="$2"; shift ;;
    --seconds) [[ $# -ge 2 ]] || usage; SECONDS_PER_PHASE="$2"; shift ;;
    --reconnect-ms) [[ $# -ge 2 ]] || usage; RECONNECT_MS="$2"; shift ;;
    --attacks) [[ $# -ge 2 ]] || usage; ATTACKS="$2"; shift ;;
    --slow-conns) [[ $# -ge 2 ]] || usage; SLOW_CONNS="$2"; shift ;;
    --drain-kbps) [[ $# -ge 2 ]] || usage; DRAIN_KBPS="$2"; shift ;;
    --min-drain-rate) [[ $# -ge 2 ]] || usage; MIN_DRAIN_RATE="$2"; shift ;;
    --dstd) [[ $# -ge 2 ]] || usage; DSTD="$2"; shift ;;
    -h|--help) usage ;;
    *) echo "flood-bench: unknown option $1" >&2; usage ;;
  esac
  shift
done

BIN="$BUILD/bin"
DSTD="${DSTD:-$BIN/dstd}"
[[ -x $DSTD && -x $BIN/conn_flood ]] || die "dstd/conn_flood not found in $BIN (build first, or pass --build-dir)"
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
  [[ -z $MIN_DRAIN_RATE ]] || printf '[limits]\nmin_drain_rate = %s\n' "$MIN_DRAIN_RATE" >> "$WORK/dstd.toml"
  "$DSTD" --config "$WORK/dstd.toml" --state-dir "$WORK/state" --control "$WORK/dstd.sock" \
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
rc=0
IFS=, read -ra attack_list <<< "$ATTACKS"
for attack in "${attack_list[@]}"; do
  n=$CONNS
  [[ $attack != slowdrain ]] || n=$SLOW_CONNS
  printf '\n== attack %s (%s connections)\n' "$attack" "$n"
  "$BIN/conn_flood" --port "$NBD_PORT" --export disk --pid "$DSTD_PID" --conns "$n" --attack "$attack" \
    --seconds "$SECONDS_PER_PHASE" --reconnect-ms "$RECONNECT_MS" --drain-kbps "$DRAIN_KBPS" || rc=1
  sleep 1  # the attack's connections close
done
printf 'flood-bench: dstd log lines during the run: %s\n' "$(wc -l < "$WORK/dstd.log")" >&2
exit "$rc"
