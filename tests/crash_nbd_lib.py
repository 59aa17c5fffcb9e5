"""The NBD crash torture: a real `cowblock serve` killed under a client.

The child process is the server (`python -m cowblock serve`, which is also the
pool's daemon); this process is its only client.  It drives a seeded random
workload one request at a time: NBD WRITEs (aligned or not, some FUA), TRIMs,
WRITE_ZEROES, READs checked against the model, FLUSHes, and through the
control socket creates, snapshots (of snapshots too, read-only or written
to over NBD), deletes (some deferred) and commits.  A timer SIGKILLs the
server at a random moment; the request in flight then fails with EOF or
ECONNRESET.  The pool is reopened and checked against what the client was
owed.

The model (Tracker) is the state after every request sent, plus, for each
4 KiB page changed since the last durable point, the set of contents it may
hold.  A durable point is a reply to a FLUSH, to a FUA write, trim or zeroing,
or the return of a create, snapshot, delete or commit (each commits the
whole pool, so everything before it is owed).  After it, a page may hold its
content at that point or the one any later request gave it (the server
commits on its own every second and overwrites blocks it owns alone in
place, and an unflushed request that allocated may be lost): a page holding
anything else, or a device too many or missing, is a failure.  4 KiB is the
unit because a SIGKILL can stop a write between pages, never inside one.

The request in flight at the kill may or may not have happened.  When it is
a create, snapshot or delete its effect shows (the device is there, or gone);
if it did happen, it committed and nothing came after it, so every page
must then equal the model exactly, and a new snapshot the origin's state.
"""
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import cowblock
from cowblock import Pool, errors
from cowblock.control.client import PoolProxy
from cowblock.runtime import RuntimeDir
from helpers import Model, pattern
from nbdclient import (CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
                       FLAG_FUA, FLAG_NO_HOLE, Client)

PAGE = 4096
MAX_DEVICES = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(cowblock.__file__)))


def digest(content):
    return hashlib.blake2b(content, digest_size=16).digest()


class Lost(Exception):
    """The server went away with a request in flight."""


class Tracker:
    """The model, and what each changed page may hold after a crash."""

    def __init__(self, block_size):
        self.model = Model(block_size)
        self.maybe = {}          # (name, page) -> contents it may hold
        self.inflight = None     # the request sent and not answered
        self.durable_points = 0
        self.changes = 0         # requests that changed pages, counted
        self.history = {}        # digest of a content -> (change, durable points, name, page)
                                 # of the first request that gave a page that content

    def page(self, name, p):
        return bytes(self.model.devs[name][p * PAGE:(p + 1) * PAGE])

    def change(self, name, offset, length, apply):
        pages = range(offset // PAGE, (offset + max(length, 1) - 1) // PAGE + 1)
        for p in pages:
            if (name, p) not in self.maybe:
                self.maybe[(name, p)] = {self.page(name, p)}
        apply()
        self.changes += 1
        for p in pages:
            content = self.page(name, p)
            self.maybe[(name, p)].add(content)
            self.history.setdefault(digest(content), (self.changes, self.durable_points, name, p))

    def provenance(self, content):
        """Where a page's content came from, to tell lost data from data written elsewhere."""
        if content == bytes(PAGE):
            return "zeroes"
        seen = self.history.get(digest(content))
        if seen is None:
            return "content no request of this run gave any page"
        change, points, name, p = seen
        return (f"the content request {change} of {self.changes} gave {name} page {p}, "
                f"{self.durable_points - points} durable points ago")

    def durable(self):
        self.maybe.clear()
        self.durable_points += 1


class Server:
    """The pool's daemon (`cowblock daemon`, in the foreground, in its own
    process group) with an NBD listener: the process that holds the pool."""

    def __init__(self, pool_dir, log_path):
        self.pool_dir = str(pool_dir)
        self.sock = os.path.join(self.pool_dir, "nbd.sock")
        self.control = RuntimeDir(self.pool_dir).control
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "cowblock", "--pool", self.pool_dir,
                                      "daemon"], stdout=self.log, stderr=self.log, env=env,
                                     start_new_session=True)
        self.killed_at = None          # when the SIGKILL went out
        deadline = time.monotonic() + 30
        rt = RuntimeDir(self.pool_dir)   # (a killed predecessor's socket may still be there)
        while not (rt.recorded_pid() == self.proc.pid and os.path.exists(self.control)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError("the daemon did not start: "
                                     + open(log_path, errors="replace").read())
            time.sleep(0.01)
        with cowblock.connect(self.pool_dir) as proxy:
            proxy.serve([], socket=self.sock, workers=2, owned=False)

    def kill(self):
        if self.proc.poll() is None:
            if self.killed_at is None:
                self.killed_at = time.monotonic()
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.log.close()


LOST = (EOFError, OSError)      # EOF, ECONNRESET, EPIPE, a timeout


class Workload:
    """The client side: one request at a time, the model kept up to date."""

    def __init__(self, rng, server, tracker, sizes, stats):
        self.rng, self.server, self.t, self.stats = rng, server, tracker, stats
        self.bs = tracker.model.block_size
        self.sizes = sizes                  # device size in blocks to choose from
        self.conns = {}                     # device name -> Client
        self.counter = 0
        self.sent = time.monotonic()
        self.proxy = cowblock.connect(server.pool_dir)
        assert isinstance(self.proxy, PoolProxy)

    # ---- transport ----
    def conn(self, name):
        c = self.conns.get(name)
        if c is None:
            try:
                c = Client(self.server.sock)
                c.s.settimeout(60)
                replies = c.go(name, structured=True, contexts=())
            except LOST as e:
                raise Lost() from e
            assert replies[-1][0] == 1, f"export {name}: {replies}"
            assert c.size == len(self.t.model.devs[name]), (name, c.size)
            self.conns[name] = c
        return c

    def nbd(self, name, cmd, offset=0, length=0, data=b"", flags=0):
        c = self.conn(name)
        self.sent = time.monotonic()
        try:
            r = c.call(cmd, offset, length, data, flags)
        except LOST as e:
            raise Lost() from e
        self.done()
        self.stats["requests"] += 1
        return r

    def control(self, call, *args, **kwargs):
        self.sent = time.monotonic()
        try:
            r = getattr(self.proxy, call)(*args, **kwargs)
        except errors.DaemonError as e:   # the daemon died under the call
            raise Lost() from e
        except errors.CowblockError:
            raise
        except LOST as e:
            raise Lost() from e
        self.done()
        self.stats["control calls"] += 1
        return r

    def done(self):
        ms = int((time.monotonic() - self.sent) * 1000)
        self.stats["slowest reply (ms)"] = max(self.stats["slowest reply (ms)"], ms)

    def disconnect(self, name):
        c = self.conns.pop(name, None)
        if c is not None:
            try:
                c.request(CMD_DISC, 0, 0)
            except LOST:
                pass
            c.close()

    def close(self):
        for c in self.conns.values():
            c.close()
        self.conns.clear()
        self.proxy.close()

    # ---- the workload ----
    def writable(self):
        m = self.t.model
        return [n for n in sorted(m.devs) if not m.read_only[n]]

    def new_name(self, prefix):
        self.counter += 1
        return f"{prefix}{self.counter}"

    def extent(self, name, sizes):
        size = len(self.t.model.devs[name])
        length = min(self.rng.choice(sizes), size)
        r = self.rng.random()
        if r < 0.4:       # block aligned
            offset = self.rng.randrange(0, size - length + 1) // self.bs * self.bs
        elif r < 0.6:     # page aligned
            offset = self.rng.randrange(0, size - length + 1) // PAGE * PAGE
        elif r < 0.7:     # to the very end
            offset = size - length
        else:
            offset = self.rng.randrange(0, size - length + 1)
        return offset, length

    def step(self):
        rng, t, m = self.rng, self.t, self.t.model
        r = rng.random()
        names = sorted(m.devs)
        if r < 0.60 or r >= 0.96:
            name = rng.choice(self.writable())
            bs = self.bs
            offset, length = self.extent(name, [1, 512, PAGE, 3 * PAGE, 5000, bs, 2 * bs + 100,
                                                 4 * bs, 17 * PAGE + 7])
            fua = rng.random() < 0.05
            seed = rng.randrange(1 << 20)
            data = pattern(seed, length)
            t.inflight = ("write", name)
            t.change(name, offset, length, lambda: m.write(name, offset, data))
            err = self.nbd(name, CMD_WRITE, offset, length, data, FLAG_FUA if fua else 0)
            assert err == 0, f"write {name} {offset}+{length}: error {err}"
            self.stats["writes"] += 1
            if fua:
                self.stats["fua"] += 1
                t.durable()
        elif r < 0.70:
            trim = r < 0.66
            name = rng.choice(self.writable())
            offset, length = self.extent(name, [PAGE, self.bs, 3 * self.bs + 100, 8 * self.bs,
                                                 len(m.devs[name])])
            fua = rng.random() < 0.08
            flags = FLAG_FUA if fua else 0
            if trim:
                t.inflight = ("trim", name)
                t.change(name, offset, length, lambda: m.discard(name, offset, length))
                err = self.nbd(name, CMD_TRIM, offset, length, flags=flags)
                self.stats["trims"] += 1
            else:
                if rng.random() < 0.5:
                    flags |= FLAG_NO_HOLE
                t.inflight = ("zeroes", name)
                t.change(name, offset, length, lambda: m.write_zeroes(name, offset, length))
                err = self.nbd(name, CMD_WRITE_ZEROES, offset, length, flags=flags)
                self.stats["zeroes"] += 1
            assert err == 0, f"{t.inflight} {offset}+{length}: error {err}"
            if fua:
                self.stats["fua"] += 1
                t.durable()
        elif r < 0.78:
            name = rng.choice(names)
            offset, length = self.extent(name, [1, 777, PAGE, 5 * self.bs + 3, len(m.devs[name])])
            t.inflight = ("read", name)
            got = self.nbd(name, CMD_READ, offset, length)
            expect = bytes(m.devs[name][offset:offset + length])
            assert got == expect, (f"live read of {name} {offset}+{length} differs from the "
                                   f"model (first at byte {first_difference(got, expect)})")
            self.stats["reads"] += 1
        elif r < 0.83:
            name = rng.choice(names)
            t.inflight = ("flush", name)
            err = self.nbd(name, CMD_FLUSH)
            assert err == 0, f"flush: error {err}"
            self.stats["flushes"] += 1
            t.durable()
        elif r < 0.88 and len(names) < MAX_DEVICES:
            origin = rng.choice(names)
            name = self.new_name("s")
            read_only = rng.random() < 0.5
            t.inflight = ("snapshot", origin, name, read_only)
            self.control("snapshot", origin, name, read_only)
            m.snapshot(origin, name, read_only)
            self.stats["snapshots"] += 1
            t.durable()
        elif r < 0.89 and len(names) < MAX_DEVICES:
            name = self.new_name("c")
            size = rng.choice(self.sizes) * self.bs
            t.inflight = ("create", name, size)
            self.control("create_thin", name, size)
            m.create(name, size)
            self.stats["creates"] += 1
            t.durable()
        elif r < 0.94 and len(self.writable()) > 1:
            name = rng.choice([n for n in names if n != self.writable()[0]])
            if name in self.conns:  # an exported device cannot go: disconnect now, delete later
                self.disconnect(name)
                return
            deferred = rng.random() < 0.3
            t.inflight = ("delete", name)
            deadline = time.monotonic() + 20
            while True:
                try:
                    self.control("delete", name, deferred=deferred)
                    break
                except errors.BusyError:  # the server has not seen the disconnect yet
                    assert time.monotonic() < deadline, f"delete {name}: busy after its client left"
                    self.stats["busy retries"] += 1
                    time.sleep(0.001)
            m.delete(name)
            self.stats["deletes"] += 1
            t.durable()
        elif r < 0.95:
            t.inflight = ("commit",)
            self.control("commit")
            self.stats["commits"] += 1
            t.durable()
        else:
            return
        t.inflight = None


def first_difference(a, b):
    if isinstance(a, int):
        return f"error {a}"
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))


def verify(pool, t, stats):
    """Check the reopened pool against the tracker; raises AssertionError."""
    m = t.model
    op = t.inflight or ("none",)
    stats[f"in flight at the kill: {op[0]}"] += 1
    names = {d.name for d in pool.list()}
    exact = False
    if op[0] == "snapshot" and op[2] in names:
        m.snapshot(op[1], op[2], op[3])
        exact = True
    elif op[0] == "create" and op[1] in names:
        m.create(op[1], op[2])
        exact = True
    elif op[0] == "delete" and op[1] not in names:
        m.delete(op[1])
        exact = True
    if op[0] in ("snapshot", "create", "delete"):
        stats[f"in-flight {op[0]}: {'done' if exact else 'not done'}"] += 1
    assert names == set(m.devs), (f"devices {sorted(names)} after the crash, expected "
                                  f"{sorted(m.devs)} (in flight: {op})")
    for name in sorted(names):
        info = pool.info(name)
        want = m.devs[name]
        assert info.size == len(want), f"{name}: size {info.size}, expected {len(want)}"
        assert info.read_only == m.read_only[name], f"{name}: read-only {info.read_only}"
        got = pool.device(name).pread(len(want), 0)
        for p in range(len(want) // PAGE):
            g = got[p * PAGE:(p + 1) * PAGE]
            w = bytes(want[p * PAGE:(p + 1) * PAGE])
            stats["pages checked"] += 1
            if g == w:
                continue
            allowed = () if exact else t.maybe.get((name, p), ())
            if g not in allowed:
                try:
                    checked = pool.check()
                except errors.CowblockError as e:
                    checked = e
                raise AssertionError(
                    f"device {name} page {p} (byte {p * PAGE}) "
                    + ("differs from its durable content (no request changed it since)"
                       if not allowed else
                       "holds neither its durable content nor one a later request gave it")
                    + f" (in flight: {op}; {'exact' if exact else 'since the last durable point'}:"
                    f" {len(t.maybe)} pages changed); it holds {t.provenance(g)}, it should hold "
                    f"{t.provenance(w)}; check: {checked}")
            stats["pages older than the model"] += 1
    report = pool.check()
    assert report.ok, f"check after the crash: {report}"
    if pool.pending_removals():
        pool.reclaim()
        report = pool.check()
        assert report.ok, f"check after reclaiming deferred removals: {report}"
    return exact


def run_iteration(tmp_path, it, seed, stats, kill_range=(0.05, 1.2)):
    """Create a pool, serve it, drive the workload until a random SIGKILL,
    reopen and verify.  Returns a one-line description."""
    rng = random.Random(seed)
    bs = rng.choice([4096, 4096, 65536])
    sizes = [64, 48] if bs == 4096 else [16, 12]
    pool_dir = tmp_path / f"p{it}"
    t = Tracker(bs)
    with Pool.create(pool_dir, 2048 * bs, bs, commit_interval=0) as pool:
        for name, blocks in (("d0", sizes[0]), ("d1", sizes[1])):
            dev = pool.create_thin(name, blocks * bs)
            t.model.create(name, blocks * bs)
            for _ in range(rng.randrange(6)):
                off = rng.randrange(blocks * bs - 3 * PAGE)
                data = pattern(rng.randrange(1 << 20), rng.choice([100, PAGE, 3 * PAGE]))
                dev.pwrite(data, off)
                t.model.write(name, off, data)
    server = Server(pool_dir, tmp_path / f"serve{it}.log")
    delay = rng.uniform(*kill_range)
    timer = threading.Timer(delay, server.kill)
    work = Workload(rng, server, t, sizes, stats)
    before = dict(stats)
    timer.start()
    try:
        for _ in range(1_000_000):
            work.step()
        raise AssertionError("the workload outlived the kill")
    except Lost as e:
        if server.killed_at is None:  # not our SIGKILL: the server failed or hung
            time.sleep(0.5)
            raise AssertionError(f"the server went away before the kill ({e.__cause__!r}; "
                                 f"in flight {t.inflight}, exit status {server.proc.poll()}): "
                                 + open(server.log.name, errors="replace").read()[-3000:])
    finally:
        timer.join()
        server.kill()
        work.close()
    assert server.proc.returncode == -signal.SIGKILL, \
        f"the server exited with {server.proc.returncode}, not by the SIGKILL"
    stats["kills"] += 1
    got_going = stats["requests"] > before.get("requests", 0) and t.durable_points > 0
    stats["got going"] += got_going
    with Pool.open(pool_dir, commit_interval=0, background_reclaim=False) as pool:
        exact = verify(pool, t, stats)
    return (f"block size {bs}, killed after {delay:.2f} s, "
            f"{stats['requests'] - before.get('requests', 0)} requests, "
            f"{t.durable_points} durable points, in flight {t.inflight}, "
            f"{len(t.maybe)} pages unowed{', exact' if exact else ''}")
