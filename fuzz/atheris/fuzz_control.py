#!/usr/bin/env python3
"""Atheris harness: the pool daemon's control socket (cowblock.daemon).

Each input is what one client sends on the control socket: length-prefixed
messages (4 bytes big-endian, then JSON), any bytes at all.  It goes through
a real socketpair to ControlServer._serve, the daemon's own loop (framing,
JSON parsing, decoding, dispatch to the pool, replies), over a real pool
(in /dev/shm) with devices "disk", "snap" (a read-only snapshot) and "busy"
(which the fake NBD server says is exported).  The client's writing half is
shut after the input, so the loop ends at EOF.

Inputs may change the pool (create, delete, write, resize...): that is
what it is for.  After each input the harness puts back what later inputs
rely on (the three devices, an empty configuration), and makes a new pool
when the old one is read-only, short of space or crowded.  Growing the pool
past 1 GiB of data or 256 MiB of metadata is refused by the harness (it is
correct, only slow: a pool of 2^30 blocks takes seconds to check).

A finding is: an exception out of _serve; a reply that is not a
well-formed {"ok": ...} or {"error": {"class", "message", "errno"}}; an
error class other than a cowblock error or TypeError (wrong arguments);
not one reply per complete message (and one error reply for a message
over the size limit, then the end); any access by the daemon to a
private attribute (a name starting with "_") of the pool or a device;
a "busy" device removed, renamed, rolled back or shrunk; an input taking
over HANG_SECONDS; and every CHECK_EVERY inputs, a pool.check() that is
not clean.

    python fuzz/atheris/fuzz_control.py -runs=20000                 # short
    python fuzz/atheris/fuzz_control.py -runs=1000000 -timeout=60 corpus-dir   # long

The seed corpus in corpus/control/ is always read and control.dict is used
as libFuzzer's dictionary (see common.libfuzzer_argv).
"""
import json
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets sys.path to this tree)

import atheris  # noqa: E402

with atheris.instrument_imports(include=["cowblock"]):
    import cowblock  # noqa: E402
    from cowblock import errors  # noqa: E402
    from cowblock.control import protocol, server as control_server  # noqa: E402

HANG_SECONDS = 20.0
CHECK_EVERY = 500
MAX_DATA = 1 << 30
MAX_METADATA = 256 << 20
DEVICE_SIZE = 1 << 20
MAX_PREAD = 1 << 20     # the daemon allows 32 MiB a call; the harness less, to stay fast
BUSY = "busy"
ALLOWED = {name for name, cls in vars(errors).items()
           if isinstance(cls, type) and issubclass(cls, errors.CowblockError)} | {"TypeError"}


class Finding(Exception):
    pass


VIOLATIONS = []   # what the audit wrappers saw; raised after the input


class AuditDevice:
    """A Device as the daemon sees it: public attributes only."""

    def __init__(self, dev):
        object.__setattr__(self, "_dev", dev)

    def __getattr__(self, name):
        dev = object.__getattribute__(self, "_dev")
        if name.startswith("_"):
            VIOLATIONS.append(f"the daemon read device attribute {name!r}")
        if name == "pread":
            return _bounded(dev.pread, "length", MAX_PREAD)
        return getattr(dev, name)


class AuditPool:
    """The Pool as the daemon sees it: public attributes only, and growth
    bounded so that the harness stays fast."""

    def __init__(self, pool):
        object.__setattr__(self, "_pool", pool)

    def __getattr__(self, name):
        pool = object.__getattribute__(self, "_pool")
        if name.startswith("_"):
            VIOLATIONS.append(f"the daemon read pool attribute {name!r}")
        if name == "device":
            return lambda *a, **k: AuditDevice(pool.device(*a, **k))
        if name == "resize":
            return _bounded(pool.resize, "data_size", MAX_DATA)
        if name == "resize_metadata":
            return _bounded(pool.resize_metadata, "metadata_size", MAX_METADATA)
        return getattr(pool, name)

    def __contains__(self, name):
        return name in object.__getattribute__(self, "_pool")


def _bounded(fn, key, limit):
    """fn, refusing its first argument (key, positional or not) over limit."""
    def call(*args, **kwargs):
        value = args[0] if args else kwargs.get(key)
        if isinstance(value, int) and value > limit:
            raise errors.InvalidArgumentError(f"harness limit: {key} {value} over {limit}")
        return fn(*args, **kwargs)
    return call


class Harness:
    def __init__(self):
        self.dir = common.scratch_dir("cowblock-fuzz-control-")
        self.generation = 0
        self.pool = None
        self.server = None
        self.inputs = 0
        self.new_pool()

    def new_pool(self):
        if self.pool is not None:
            try:
                self.pool.close()
            except errors.CowblockError:
                pass
        self.generation += 1
        path = os.path.join(self.dir, f"pool{self.generation}")
        self.pool = cowblock.Pool.create(path, 64 << 20, 65536, commit_interval=0)
        if self.generation > 1:
            import shutil
            shutil.rmtree(os.path.join(self.dir, f"pool{self.generation - 1}"), True)
        self.restore()
        self.server = control_server.ControlServer(AuditPool(self.pool), lambda: {BUSY})

    def restore(self):
        """Put back what the seeds rely on; a new pool when that fails."""
        pool = self.pool
        if pool.config != {}:
            pool.set_config({})
        if "disk" not in pool:
            pool.create_thin("disk", DEVICE_SIZE)
        elif pool.info("disk").read_only:
            pool.set_read_only("disk", False)
        if "snap" not in pool:
            pool.snapshot("disk", "snap", read_only=True)
        if BUSY not in pool:
            pool.create_thin(BUSY, DEVICE_SIZE)

    def healthy(self):
        s = self.pool.stats()
        return (not s.read_only and not s.needs_check and s.devices <= 64
                and s.data_free * 4 >= s.data_blocks)

    def after_input(self):
        try:
            if not self.healthy():
                raise errors.CowblockError("rebuild")
            self.restore()
        except errors.CowblockError:
            self.new_pool()


H = Harness()
DRAIN = common.Drain()


def expected_replies(payload):
    """(complete messages, whether one was over the limit) in the input."""
    n, pos = 0, 0
    while pos + 4 <= len(payload):
        (length,) = struct.unpack_from(">I", payload, pos)
        if length > protocol.MAX_MESSAGE:
            return n + 1, True
        if pos + 4 + length > len(payload):
            break
        n += 1
        pos += 4 + length
    return n, False


def parse_replies(out):
    replies, pos = [], 0
    while pos < len(out):
        if pos + 4 > len(out):
            raise Finding(f"a partial reply header at {pos}")
        (n,) = struct.unpack_from(">I", out, pos)
        body = out[pos + 4:pos + 4 + n]
        if len(body) != n:
            raise Finding(f"reply at {pos} announces {n} bytes, {len(body)} follow")
        try:
            replies.append(json.loads(body))
        except ValueError as e:
            raise Finding(f"reply at {pos} is not JSON: {e}") from None
        pos += 4 + n
    return replies


def check_reply(reply, i):
    if not isinstance(reply, dict) or (set(reply) - {"health"}) not in ({"ok"}, {"error"}):
        raise Finding(f"reply {i} is not {{ok}} or {{error}}: {str(reply)[:300]}")
    err = reply.get("error")
    if err is None:
        return
    if not isinstance(err, dict) or set(err) != {"class", "message", "errno"}:
        raise Finding(f"reply {i}: malformed error {str(err)[:300]}")
    if err["class"] not in ALLOWED:
        raise Finding(f"reply {i}: {err['class']}: {err['message'][:500]}")
    if not err["message"]:
        raise Finding(f"reply {i}: {err['class']} without a message")


def TestOneInput(data):
    payload = data[:common.MAX_INPUT]
    busy_before = H.pool.info(BUSY)
    srv, cli = common.connection(payload)
    DRAIN.start(cli)
    started = time.monotonic()
    try:
        H.server.serve_connection(srv)        # closes srv at the end
    finally:
        srv.close()
        out = DRAIN.result(timeout=60)
        cli.close()
    elapsed = time.monotonic() - started
    if elapsed > HANG_SECONDS:
        raise Finding(f"the control loop took {elapsed:.1f} s on this input")
    if VIOLATIONS:
        found = list(VIOLATIONS)
        VIOLATIONS.clear()
        raise Finding("; ".join(found))
    replies = parse_replies(out)
    want, _ = expected_replies(payload)
    if len(replies) != want:
        raise Finding(f"{len(replies)} replies to {want} messages")
    for i, reply in enumerate(replies):
        check_reply(reply, i)
    if BUSY not in H.pool:
        raise Finding("the busy device was removed or renamed")
    busy_after = H.pool.info(BUSY)
    if busy_after.id != busy_before.id or busy_after.size < busy_before.size:
        raise Finding(f"the busy device changed under its NBD client: {busy_before} -> {busy_after}")
    H.inputs += 1
    if H.inputs % CHECK_EVERY == 0:
        report = H.pool.check()
        if not report.ok:
            raise Finding(f"pool check after {H.inputs} inputs:\n{report}")
    H.after_input()


def main():
    atheris.Setup(common.libfuzzer_argv(sys.argv, "control"), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
