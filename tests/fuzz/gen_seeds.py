#!/usr/bin/env python3
# Writes the binary seed corpora of the server fuzz targets (corpus/fuzz_dst_server,
# corpus/fuzz_nbd_server): valid sessions as a client sends them, from the first byte on.
# Wire formats: docs/protocol.md (DST), docs/nbd.md and the NBD protocol (NBD).
# Run from anywhere: python3 tests/fuzz/gen_seeds.py
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- DST (docs/protocol.md §2, §6): 48-byte header, HELLO payload.
def dst_hdr(cmd, length=0, rid=0, offset=0, flags=0, digest=0):
    h = struct.pack(">IHHIIQQ", 0x44535431, cmd, flags, 0, length, rid, offset)
    return h + struct.pack(">Q", digest if flags & 4 else 0) + bytes(8)


def dst_hello(name, features=0, session=0x1234):
    body = struct.pack(">HHIQH", 1, 0, features, session, len(name)) + name
    return dst_hdr(1, len(body), 1) + body


HELLO, READ, WRITE, FLUSH, TRIM, WZ, PING, DISC = 1, 2, 3, 4, 5, 6, 7, 8
write("fuzz_dst_server", "hello_only", dst_hello(b"disk0"))
write("fuzz_dst_server", "hello_unknown_export", dst_hello(b"nope"))
write("fuzz_dst_server", "read_write_flush",
      dst_hello(b"disk0") + dst_hdr(WRITE, 4096, 2, 8192) + bytes(range(256)) * 16 +
      dst_hdr(READ, 4096, 3, 8192) + dst_hdr(FLUSH, 0, 4) + dst_hdr(PING, 0, 5) + dst_hdr(DISC, 0, 6))
write("fuzz_dst_server", "trim_zeroes_fua",
      dst_hello(b"disk0") + dst_hdr(TRIM, 65536, 2, 0) + dst_hdr(WZ, 8192, 3, 4096, flags=2) +
      dst_hdr(WRITE, 512, 4, 512, flags=1) + b"x" * 512 + dst_hdr(READ, 1024, 5, 0))
write("fuzz_dst_server", "read_only_export",
      dst_hello(b"ro") + dst_hdr(WRITE, 512, 2, 0) + b"y" * 512 + dst_hdr(READ, 512, 3, 0))
# Digest negotiated; the WRITE's digest is wrong on purpose (EBADMSG path), the server still reads on.
write("fuzz_dst_server", "digest",
      dst_hello(b"disk0", features=1) + dst_hdr(WRITE, 512, 2, 0, flags=4, digest=0xdeadbeef) + b"z" * 512 +
      dst_hdr(READ, 512, 3, 0))

# --- NBD (fixed newstyle): client flags, options, then transmission requests.
IHAVEOPT = 0x49484156454F5054
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO, OPT_SR, OPT_LIST_META, OPT_SET_META = 1, 2, 3, 6, 7, 8, 9, 10


def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go_data(name, infos=(3,)):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_data(name, queries):
    d = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return d + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def req(cmd, handle, offset=0, length=0, flags=0):
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, handle, offset, length)


CLIENT_FLAGS = struct.pack(">I", 3)  # fixed newstyle, no zeroes
R, W, DISCC, F, T, CACHE, WZC, BS = 0, 1, 2, 3, 4, 5, 6, 7
write("fuzz_nbd_server", "list_abort", CLIENT_FLAGS + opt(OPT_LIST) + opt(OPT_ABORT))
write("fuzz_nbd_server", "info_go", CLIENT_FLAGS + opt(OPT_INFO, go_data(b"disk0", (0, 1, 2, 3))) +
      opt(OPT_GO, go_data(b"disk0")) + req(R, 1, 0, 4096) + req(DISCC, 2))
write("fuzz_nbd_server", "export_name_old", CLIENT_FLAGS + opt(OPT_EXPORT_NAME, b"disk0") +
      req(W, 1, 4096, 512) + b"a" * 512 + req(R, 2, 4096, 512) + req(F, 3) + req(DISCC, 4))
write("fuzz_nbd_server", "structured_meta",
      CLIENT_FLAGS + opt(OPT_SR) + opt(OPT_LIST_META, meta_data(b"disk0", [b"base:"])) +
      opt(OPT_SET_META, meta_data(b"disk0", [b"base:allocation", b"dst:dirty:leg0"])) +
      opt(OPT_GO, go_data(b"disk0")) +
      req(BS, 1, 0, 65536) + req(R, 2, 0, 16384) + req(WZC, 3, 0, 8192, flags=16) +
      req(T, 4, 8192, 4096) + req(CACHE, 5, 0, 4096) + req(W, 6, 0, 512, flags=1) + b"b" * 512 +
      req(R, 7, 0, 512, flags=4) + req(DISCC, 8))
write("fuzz_nbd_server", "read_only_default",
      CLIENT_FLAGS + opt(OPT_GO, go_data(b"ro", ())) + req(W, 1, 0, 512) + b"c" * 512 + req(R, 2, 0, 512))
write("fuzz_nbd_server", "default_export", CLIENT_FLAGS + opt(OPT_GO, go_data(b"")) + req(R, 1, 0, 512))
