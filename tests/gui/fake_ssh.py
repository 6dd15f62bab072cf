#!/usr/bin/env python3
# A stand-in for `ssh -N [-o OPT]... -L LOCAL:REMOTE TARGET` in ssh_forward_test: it accepts the
# same arguments and forwards the unix socket LOCAL to REMOTE on this machine, one relay per
# connection, like ssh's stream-local forwarding.  It never contacts any host.  The target must
# start with "fake" or it fails the way ssh does (a stderr line, exit status 255).
import os
import socket
import sys
import threading


def relay(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def serve(client, remote):
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(remote)
    except OSError as e:
        print(f"channel 2: open failed: connect failed: {e.strerror}", file=sys.stderr, flush=True)
        client.close()
        return
    threading.Thread(target=relay, args=(client, upstream), daemon=True).start()
    relay(upstream, client)


def main(argv):
    forward, target, i = None, None, 0
    while i < len(argv):
        a = argv[i]
        if a == "-N":
            pass
        elif a in ("-o", "-L"):
            i += 1
            if a == "-L":
                forward = argv[i]
        else:
            target = a
        i += 1
    if not forward or not target or ":" not in forward:
        print("usage: fake_ssh -N [-o OPT]... -L LOCAL:REMOTE TARGET", file=sys.stderr)
        return 255
    host = target.split("@")[-1]
    if not host.startswith("fake"):
        print(f"ssh: Could not resolve hostname {host}: Name or service not known", file=sys.stderr)
        return 255
    local, remote = forward.split(":", 1)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(local)
    except OSError as e:
        print(f"unix_listener: cannot bind to path {local}: {e.strerror}", file=sys.stderr)
        return 255
    server.listen(16)
    while True:
        client, _ = server.accept()
        threading.Thread(target=serve, args=(client, remote), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
