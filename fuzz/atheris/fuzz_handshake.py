#!/usr/bin/env python3
"""Atheris harness: the NBD fixed-newstyle handshake, server side.

Each input is one client: its first byte picks the catalog (every device,
only "disk" so the default export "" exists, or every device read-only);
the rest is what the client sends, client flags and then options (GO, INFO,
LIST, ABORT, EXPORT_NAME, STRUCTURED_REPLY, SET/LIST_META_CONTEXT, anything).
It goes through a real socketpair to cowblock.nbd.handshake.negotiate with
the real Catalog of the server over a real pool (made once, in /dev/shm),
and the client's writing half is shut after the input, so a server waiting
for more sees EOF.

A finding is: an exception other than HandshakeError (a protocol
violation, the connection is dropped) or EOFError (the client went away);
a server still blocked after HANG_SECONDS (its socket timeout); a reply
stream that is not well formed (each reply's magic, option and type, one
closing ACK or error per option, in order, error text UTF-8 and at most
4 KiB); or a Session that does not match the catalog.

    python fuzz/atheris/fuzz_handshake.py -runs=20000              # short
    python fuzz/atheris/fuzz_handshake.py -runs=1000000 -timeout=30 corpus-dir   # long

The seed corpus in corpus/handshake/ is always read and handshake.dict is
used as libFuzzer's dictionary (see common.libfuzzer_argv); a crash writes
crash-<sha1> (or -artifact_prefix=DIR/).  To replay one input:
python fuzz/atheris/fuzz_handshake.py crash-...
"""
import os
import socket
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets sys.path to this tree)

import atheris  # noqa: E402

import cowblock  # noqa: E402,F401  (the pool and core: not instrumented)
from cowblock import Pool  # noqa: E402

with atheris.instrument_imports(include=["cowblock"]):
    from cowblock.nbd import handshake  # noqa: E402
    from cowblock.nbd import protocol as P  # noqa: E402
    from cowblock.nbd.server import Catalog  # noqa: E402

HANG_SECONDS = 5.0
FINAL = {P.REP_ACK} | {t for t in range(1 << 31, (1 << 31) + 64)}   # ACK or an error
OPTION_REPLIES = {P.REP_ACK, P.REP_SERVER, P.REP_INFO, P.REP_META_CONTEXT}
WEIRD_NAME = "a.b:c@d-e_f+9"


def make_pool():
    path = os.path.join(common.scratch_dir("cowblock-fuzz-handshake-"), "pool")
    pool = Pool.create(path, 16 << 20, 65536, commit_interval=0)
    disk = pool.create_thin("disk", 4 << 20)
    disk.pwrite(b"cowblock" * 512, 65536)
    pool.snapshot("disk", "snap", read_only=True)
    pool.create_thin(WEIRD_NAME, 1 << 20)
    pool.commit()
    return pool


POOL = make_pool()
CATALOGS = [Catalog(POOL, None, False), Catalog(POOL, ["disk"], False), Catalog(POOL, None, True)]
DRAIN = common.Drain()


class Finding(Exception):
    pass


def parse_options(data):
    """What the server should have read: client flags, then (opt, length)
    of each complete option header, stopping where the server must stop."""
    if len(data) < 4:
        return None, []
    (cflags,) = struct.unpack_from(">I", data)
    opts, pos = [], 4
    while pos + 16 <= len(data):
        magic, opt, length = struct.unpack_from(">QII", data, pos)
        pos += 16
        opts.append((magic, opt, length, data[pos:pos + length]))
        if magic != P.IHAVEOPT or length > P.MAX_OPTION_LENGTH or pos + length > len(data):
            break
        pos += length
    return cflags, opts


def check_replies(out, data, session, exc):
    """The reply stream against the options the client sent."""
    if len(out) < 18 or struct.unpack_from(">QQH", out) != (P.NBDMAGIC, P.IHAVEOPT,
                                                            P.CLIENT_FLAGS):
        raise Finding(f"bad server greeting {out[:18].hex()}")
    cflags, opts = parse_options(data)
    pos = 18
    for magic, opt, length, body in opts:
        if magic != P.IHAVEOPT or (cflags & ~P.CLIENT_FLAGS):
            break  # dropped without a reply
        if length > P.MAX_OPTION_LENGTH:
            pos = expect_reply(out, pos, opt, {P.REP_ERR_TOO_BIG})
            break
        if len(body) < length:
            break  # EOF inside the option's data
        if opt == P.OPT_EXPORT_NAME:
            if session is not None:  # the export details close the stream
                tail = out[pos:]
                want = 10 if cflags & P.FLAG_NO_ZEROES else 134
                if len(tail) != want:
                    raise Finding(f"EXPORT_NAME reply of {len(tail)} bytes, not {want}")
                size, _ = struct.unpack_from(">QH", tail)
                if size != session.export.size:
                    raise Finding(f"EXPORT_NAME size {size} != {session.export.size}")
                return
            break  # an unknown name: dropped without a reply
        while True:
            pos, rtype = read_reply(out, pos, opt)
            if rtype in FINAL:
                break
        if opt == P.OPT_ABORT or (opt == P.OPT_GO and rtype == P.REP_ACK):
            break
    if pos != len(out):
        raise Finding(f"{len(out) - pos} bytes of reply after the last expected one "
                      f"(exception {exc!r})")


def read_reply(out, pos, opt):
    if pos + 20 > len(out):
        raise Finding(f"reply stream ends at {pos} waiting for a reply to option {opt}")
    magic, ropt, rtype, rlen = struct.unpack_from(">QIII", out, pos)
    if magic != P.REPLY_MAGIC or ropt != opt:
        raise Finding(f"reply at {pos}: magic {magic:#x}, option {ropt}, expected {opt}")
    if rtype not in OPTION_REPLIES and rtype not in FINAL:
        raise Finding(f"reply at {pos}: unknown type {rtype:#x}")
    body = out[pos + 20:pos + 20 + rlen]
    if len(body) != rlen:
        raise Finding(f"reply at {pos} announces {rlen} bytes, {len(body)} follow")
    if rtype >= 1 << 31:
        if rlen > 4096:
            raise Finding(f"error reply of {rlen} bytes")
        body.decode("utf-8")  # an error message is text
    return pos + 20 + rlen, rtype


def expect_reply(out, pos, opt, types):
    pos, rtype = read_reply(out, pos, opt)
    if rtype not in types:
        raise Finding(f"option {opt}: reply type {rtype:#x}, expected {types}")
    return pos


def check_session(session, catalog):
    names = catalog.names()
    export = session.export
    if export.name not in names:
        raise Finding(f"session on {export.name!r}, not an export ({names})")
    info = POOL.info(export.name)
    if (export.dev_id, export.size) != (info.id, info.size):
        raise Finding(f"session export {export} does not match the device {info}")
    if session.read_only != (catalog.read_only or info.read_only):
        raise Finding(f"session read_only {session.read_only} on {export.name!r}")
    if session.contexts and not session.structured:
        raise Finding(f"meta contexts {session.contexts} without structured replies")
    for name, cid in session.contexts.items():
        if P.CONTEXT_IDS.get(name) != cid:
            raise Finding(f"unknown meta context {name!r}={cid}")


def TestOneInput(data):
    if not data:
        return
    catalog = CATALOGS[data[0] % len(CATALOGS)]
    payload = data[1:1 + common.MAX_INPUT]
    srv, cli = common.connection(payload)
    DRAIN.start(cli)
    session = exc = None
    try:
        srv.settimeout(HANG_SECONDS)   # the server sets 60 s; no input here needs 1
        try:
            session = handshake.negotiate(srv, catalog)
        except (handshake.HandshakeError, EOFError) as e:
            exc = e
        except socket.timeout:
            raise Finding(f"the handshake hung for {HANG_SECONDS} s on a closed client") from None
    finally:
        srv.close()
        out = DRAIN.result(timeout=30)
        cli.close()
    check_replies(out, payload, session, exc)
    if session is not None:
        check_session(session, catalog)


def main():
    atheris.Setup(common.libfuzzer_argv(sys.argv, "handshake"), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
