# Shared by the bench scripts (sourced): free loopback ports and orderly daemon shutdown.
# Callers define die().

free_port() {
  local p i
  for i in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 40000 ))
    if [[ -z "$(ss -Hltn "sport = :$p" 2>/dev/null)" ]]; then echo "$p"; return; fi
  done
  die "no free TCP port found"
}

stop_daemon() {
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

# Installs the usual traps around the caller's cleanup() (EXIT runs it; INT and TERM exit with
# the conventional codes, which runs it too).
install_traps() {
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# end_cleanup <rc> <work dir>: the tail of a cleanup(): unmounts <work dir>/tmpfs, removes the
# work directory, exits with rc.
end_cleanup() {
  if grep -qs " $2/tmpfs " /proc/self/mounts; then umount "$2/tmpfs" || umount -l "$2/tmpfs"; fi
  rm -rf --one-file-system "$2"
  exit "$1"
}
