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
# STARTTLS (5): unsupported without TLS (with data too), negotiation goes on.
OPT_STARTTLS = 5
write("fuzz_nbd_server", "starttls_unsup", CLIENT_FLAGS + opt(OPT_STARTTLS) + opt(OPT_STARTTLS, b"x") +
      opt(OPT_GO, go_data(b"disk0")) + req(R, 1, 0, 512))
# Require mode (fuzz_nbd_server_tls): every option refused before TLS, EXPORT_NAME closes, an
# acknowledged STARTTLS hands the (in-memory) transport to the TLS upgrade, which refuses it.
write("fuzz_nbd_server_tls", "refused_then_abort",
      CLIENT_FLAGS + opt(OPT_LIST) + opt(OPT_INFO, go_data(b"disk0", (0, 1))) + opt(OPT_GO, go_data(b"disk0")) +
      opt(OPT_SR) + opt(OPT_LIST_META, meta_data(b"disk0", [])) + opt(99, b"zz") + opt(OPT_STARTTLS, b"x") +
      opt(OPT_ABORT))
write("fuzz_nbd_server_tls", "export_name_closes", CLIENT_FLAGS + opt(OPT_EXPORT_NAME, b"disk0") + req(R, 1, 0, 512))
write("fuzz_nbd_server_tls", "starttls_pipelined",
      CLIENT_FLAGS + opt(OPT_STARTTLS) + opt(OPT_GO, go_data(b"disk0")) + req(R, 1, 0, 512))

# --- Client targets (fuzz_dst_client, fuzz_nbd_client): one option byte, then what the server
# sends.  The client submits the requests of client_harness.h (kClientOps) after the handshake;
# their ids are 1 << 32 | slot, slots 0..6 in this order:
OPS = [("flush", 0, 0), ("read", 0, 4096), ("write", 4096, 4096), ("read", 8192, 8192),
       ("trim", 16384, 4096), ("wz", 20480, 4096), ("read", 512, 512)]
DST_CMD = {"flush": FLUSH, "read": READ, "write": WRITE, "trim": TRIM, "wz": WZ}


def rid(slot):
    return 1 << 32 | slot


def dst_reply(cmd, length=0, ident=0, offset=0, status=0, flags=0, digest=0):
    h = struct.pack(">IHHIIQQ", 0x44535431, cmd | 0x8000, flags, status, length, ident, offset)
    return h + struct.pack(">Q", digest if flags & 4 else 0) + bytes(8)


def dst_hello_reply(size=1 << 20, features=0, flags=0x1E, block=512, perms=3):
    body = struct.pack(">HHIQIII", 1, flags, features, size, block, 1 << 20, perms)
    return dst_reply(HELLO, len(body), 1) + body


# `order`: which of OPS to answer, in reply order.  Requests refused at submission (a read-only
# export) take no slot, so `accepted` lists the OPS that went out: slot = position in it.
def dst_replies(order=range(7), status=0, accepted=range(7)):
    out = b""
    for i in order:
        op, off, length = OPS[i]
        slot = list(accepted).index(i)
        if op == "read" and status == 0:
            out += dst_reply(READ, length, rid(slot), off) + bytes((off + i) & 0xFF for i in range(length))
        else:
            out += dst_reply(DST_CMD[op], length if op != "flush" else 0, rid(slot), off if op != "flush" else 0, status)
    return out


write("fuzz_dst_client", "in_order", b"\0" + dst_hello_reply() + dst_replies())
write("fuzz_dst_client", "reversed", b"\0" + dst_hello_reply() + dst_replies(reversed(range(7))))
write("fuzz_dst_client", "errors", b"\0" + dst_hello_reply() + dst_replies(status=5))
write("fuzz_dst_client", "read_only", b"\0" + dst_hello_reply(flags=0x3, perms=1) +
      dst_replies([0, 1, 3, 6], accepted=[0, 1, 3, 6]))
write("fuzz_dst_client", "refused", b"\0" + dst_reply(HELLO, 0, 1, status=2))
# Stale id with a payload, an unsolicited PING reply, ESHUTDOWN, then a DISCONNECT naming a request.
write("fuzz_dst_client", "odd_frames",
      b"\0" + dst_hello_reply() + dst_reply(READ, 512, 0xdead00000001) + b"s" * 512 + dst_reply(PING, 0, 77) +
      dst_replies([0, 1, 2]) + dst_reply(READ, 0, rid(3), 8192, status=108) + dst_reply(DISC, 0, rid(4), status=71))
# Digests negotiated (option byte 1, feature echoed); the READ digests are wrong, so reads are re-sent.
write("fuzz_dst_client", "digest",
      b"\1" + dst_hello_reply(features=1) + dst_reply(READ, 4096, rid(1), 0, flags=4, digest=0x1234) + b"d" * 4096 +
      dst_reply(WRITE, 4096, rid(2), 4096, status=74) + dst_replies([0, 3, 4, 5, 6]))

NBD_MAGIC, OPT_REPLY_MAGIC = 0x4E42444D41474943, 0x0003E889045565A9
REP_ACK, REP_SERVER, REP_INFO, REP_ERR_UNSUP = 1, 2, 3, (1 << 31) + 1
NBD_CMD = {"flush": F, "read": R, "write": W, "trim": T, "wz": WZC}
TX_FLAGS = 1 | 4 | 8 | 32 | 64  # HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES


def greeting(flags=3):
    return struct.pack(">QQH", NBD_MAGIC, IHAVEOPT, flags)


def opt_reply(option, rtype, data=b""):
    return struct.pack(">QIII", OPT_REPLY_MAGIC, option, rtype, len(data)) + data


def go_replies(size=1 << 20, tx=TX_FLAGS, block=True):
    out = opt_reply(OPT_GO, REP_INFO, struct.pack(">HIII", 3, 512, 4096, 1 << 20)) if block else b""
    out += opt_reply(OPT_GO, REP_INFO, struct.pack(">HH", 1, 5) + b"disk0")
    return out + opt_reply(OPT_GO, REP_INFO, struct.pack(">HQH", 0, size, tx)) + opt_reply(OPT_GO, REP_ACK)


def simple(cookie, err=0, data=b""):
    return struct.pack(">IIQ", 0x67446698, err, cookie) + data


def chunk(cookie, ctype, payload=b"", flags=1):
    return struct.pack(">IHHQI", 0x668E33EF, flags, ctype, cookie, len(payload)) + payload


def pattern(off, length):
    return bytes((off + i) & 0xFF for i in range(length))


def nbd_replies(structured, order=range(7), accepted=range(7)):
    out = b""
    for i in order:
        op, off, length = OPS[i]
        slot = list(accepted).index(i)
        if op != "read":
            out += chunk(rid(slot), 0) if structured else simple(rid(slot))
        elif not structured:
            out += simple(rid(slot), 0, pattern(off, length))
        elif length > 4096:  # second half as data, first half as a hole, out of order
            half = length // 2
            out += chunk(rid(slot), 1, struct.pack(">Q", off + half) + pattern(off + half, half), flags=0)
            out += chunk(rid(slot), 2, struct.pack(">QI", off, half))
        else:
            out += chunk(rid(slot), 1, struct.pack(">Q", off) + pattern(off, length))
    return out


SR_ACK = opt_reply(OPT_SR, REP_ACK)
write("fuzz_nbd_client", "structured_go", b"\3" + greeting() + SR_ACK + go_replies() + nbd_replies(True))
write("fuzz_nbd_client", "simple_go", b"\2" + greeting() + go_replies(block=False) + nbd_replies(False, reversed(range(7))))
write("fuzz_nbd_client", "structured_refused", b"\3" + greeting() + opt_reply(OPT_SR, REP_ERR_UNSUP) + go_replies() +
      nbd_replies(False))
write("fuzz_nbd_client", "export_name", b"\0" + greeting(3) + struct.pack(">QH", 1 << 20, TX_FLAGS) + nbd_replies(False))
write("fuzz_nbd_client", "export_name_zeroes", b"\0" + greeting(1) + struct.pack(">QH", 1 << 20, TX_FLAGS) + bytes(124) +
      nbd_replies(False))
write("fuzz_nbd_client", "go_unsupported", b"\2" + greeting() + opt_reply(OPT_GO, REP_ERR_UNSUP) +
      struct.pack(">QH", 1 << 20, 1 | 2) + nbd_replies(False, [1, 3, 6], accepted=[1, 3, 6]))
# Error chunks, a stale cookie drained, a BLOCK_STATUS nobody asked for, ESHUTDOWN.
write("fuzz_nbd_client", "structured_errors",
      b"\3" + greeting() + SR_ACK + opt_reply(OPT_GO, REP_SERVER, struct.pack(">I", 0)) + go_replies() +
      chunk(0xdead00000001, 1, struct.pack(">Q", 0) + b"s" * 512) +
      chunk(rid(1), 0x8001, struct.pack(">IH", 5, 4) + b"oops", flags=0) + chunk(rid(1), 0) +
      chunk(rid(3), 0x8002, struct.pack(">IHQ", 28, 0, 8192)) +
      chunk(rid(6), 5, struct.pack(">III", 1, 512, 0)) + nbd_replies(True, [0, 2, 4, 5]) + simple(rid(6), 108))
# Hostile handshakes the client refuses (hostile_server_test has them too): an absurd size, an
# endless NBD_REP_SERVER list, a 4 GiB option reply.
write("fuzz_dst_client", "size_2_63", b"\0" + dst_hello_reply(size=1 << 63) + dst_replies())
write("fuzz_nbd_client", "endless_rep_server",
      b"\3" + greeting() + opt_reply(OPT_SR, REP_SERVER, struct.pack(">I", 1) + b"x") * 80 + SR_ACK + go_replies())
write("fuzz_nbd_client", "huge_option_reply",
      b"\3" + greeting() + SR_ACK + struct.pack(">QIII", OPT_REPLY_MAGIC, OPT_GO, REP_INFO, 0xFFFFFFF0) + bytes(64))
