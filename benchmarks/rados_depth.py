"""Snapshot depth on RADOS: cowblock's snapshots against RBD's clone chains,
on one cluster, side by side (the memstore OSD of tools/ceph-cluster.sh
unless CEPH_CONF names another cluster; the JSON says which).

Set up once, in a Ceph pool of its own (removed at the end): a cowblock pool
rados:POOL/depth (64 KiB blocks) and RBD images (librbd's default features
and 4 MiB objects; the JSON has them).  For each of --sizes a device and an
image, each filled by one 1 MiB sequential fio write through its NBD server;
from the --mib one a chain of 32 levels, each rewriting one 4 KiB block at a
random place, as a layer chain does: cowblock L1..L32, each a snapshot of
the level below; RBD c1..c32, each a clone of a protected snapshot of the
level below.

Each round, at depth 1, 8 and 32 (the targets' order alternates by round):
  reads: 4 KiB random, QD16, --seconds each, IOPS
    cowblock-first  `cowblock serve` from a fresh cache directory: every read
                    is of a block never read on this host (the open empties
                    the cache anyway; fio's random map reads none twice)
    cowblock-warm   the same server after a 1 MiB sequential read of the
                    whole device: served from this host's cache
    rbd-nbd-first   qemu-nbd --cache none (rbd_cache=false), just started
    rbd-nbd-warm    the same after the same sequential read (no cache on
                    this host: librbd's is off)
    rbd-fio         fio's rbd engine with librbd's defaults (the JSON has
                    rbd_cache and its policy)
  snapshot creation, seconds, of the devices at depth 1, 8, 32 and of the
  filled devices of each size (depth 0):
    cowblock-cli     `cowblock snapshot`, no daemon: the process opens the
                     pool (connects, takes the lock), snapshots, commits
    cowblock-daemon  `cowblock snapshot` while `cowblock serve` runs: one call
                     to the pool's daemon (depths only)
    cowblock-api     Pool.snapshot + commit in an open pool
    rbd-cli          `rbd snap create` + `rbd snap protect` + `rbd clone`, what
                     one more level of a clone chain takes
  The chain's own levels 1..32 are timed as they are made (cowblock-api,
  rbd-cli): one sample a level.

  CEPH_CONF=... python benchmarks/rados_depth.py [--rounds 2] [--seconds 2]
      [--mib 128] [--sizes 32,128,1024] [--json benchmarks/results/rados_depth.json]
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from rados_nbd import MiB, fio, nbd_args, osd_objectstore, qemu_nbd, rbd_fio_args, serve, stop

DEPTHS = (1, 8, 32)
READS = ("cowblock-first", "cowblock-warm", "rbd-nbd-first", "rbd-nbd-warm", "rbd-fio")
SNAPSHOTS = ("cowblock-cli", "cowblock-daemon", "cowblock-api", "rbd-cli")


def run(*cmd, env=None):
    """A Ceph or cowblock command, with a timeout (Ceph's wait for ever when
    no OSD serves)."""
    return subprocess.run(["timeout", "300", *cmd], check=True, capture_output=True, text=True,
                          env=env).stdout


def seconds_of(*cmds, env=None):
    t = time.perf_counter()
    for cmd in cmds:
        run(*cmd, env=env)
    return time.perf_counter() - t


class Bench:
    def __init__(self, args, tmp):
        self.args, self.tmp = args, tmp
        self.size = args.mib * MiB
        self.ceph_pool = f"depth-{uuid.uuid4().hex[:6]}"
        self.pool = f"rados:{self.ceph_pool}/depth"
        self.rnd = random.Random(16)
        self.reads = {t: {d: [] for d in DEPTHS} for t in READS}
        self.keys = [f"depth {d}" for d in DEPTHS] + [f"{m} MiB" for m in args.sizes]
        self.snapshots = {t: {k: [] for k in self.keys} for t in SNAPSHOTS}
        self.chain = {"cowblock-api": [], "rbd-cli": []}
        self.made = 0

    def env(self, cache):
        """The environment of a cowblock command with this cache directory
        (another cache root is another host, as far as the cache goes)."""
        return dict(os.environ, COWBLOCK_RADOS_CACHE=os.path.join(self.tmp, "cache", cache),
                    COWBLOCK_RUNTIME_DIR=os.path.join(self.tmp, "run"))

    def cowblock(self, *args):
        return ["cowblock", "--pool", self.pool, *args]

    def rbd(self, *args):
        return ["rbd", "--pool", self.ceph_pool, *args]

    def name(self, prefix):
        self.made += 1
        return f"{prefix}-{self.made}"

    # ---- set-up ----
    def setup(self):
        run("ceph", "osd", "pool", "create", self.ceph_pool, "32", "32")
        run("ceph", "osd", "pool", "set", self.ceph_pool, "pg_autoscale_mode", "off")
        run("rbd", "pool", "init", self.ceph_pool)   # (returns once its placement groups serve)
        env = self.env("setup")
        room = (2 * sum(self.args.sizes) + 256) * MiB
        run(*self.cowblock("pool", "create", "--size", f"{room // MiB}M", "--block-size", "64K"),
            env=env)
        devices = [f"z{m}" for m in self.args.sizes]
        for m, dev in zip(self.args.sizes, devices):
            run(*self.cowblock("create", dev, "--size", f"{m}M"), env=env)
            run(*self.rbd("create", dev, "--size", f"{m}M"))
        sock = os.path.join(self.tmp, "fill.sock")
        proc = serve(self.pool, devices, sock, env=env)
        try:
            for m, dev in zip(self.args.sizes, devices):
                fio(nbd_args(sock, dev), "write", "1M", 0, False, size=m * MiB)
        finally:
            stop(proc)
        for m, dev in zip(self.args.sizes, devices):
            sock = os.path.join(self.tmp, f"{dev}.sock")
            proc = qemu_nbd(self.ceph_pool, dev, sock)
            try:
                fio(nbd_args(sock), "write", "1M", 0, False, size=m * MiB)
            finally:
                stop(proc)
        self.build_chains(f"z{self.args.mib}")

    def build_chains(self, base):
        from cowblock import Pool
        os.environ.update(self.env("api"))
        with Pool.open(self.pool, commit_interval=0, timeout=30) as p:
            below = base
            for level in range(1, max(DEPTHS) + 1):
                t = time.perf_counter()
                p.snapshot(below, f"L{level}")
                p.commit()
                self.chain["cowblock-api"].append(time.perf_counter() - t)
                p.device(f"L{level}").pwrite(self.rnd.randbytes(4096), self.block())
                p.commit()
                below = f"L{level}"
        below = base
        for level in range(1, max(DEPTHS) + 1):
            self.chain["rbd-cli"].append(self.rbd_level(below, f"c{level}"))
            run(*self.rbd("bench", "--io-type", "write", "--io-size", "4096", "--io-threads", "1",
                          "--io-total", "4096", "--io-pattern", "rand", f"c{level}"))
            below = f"c{level}"

    def block(self):
        return self.rnd.randrange(self.size // 4096) * 4096

    def rbd_level(self, parent, child):
        snap = f"{parent}@{self.name('s')}"
        return seconds_of(self.rbd("snap", "create", snap), self.rbd("snap", "protect", snap),
                          self.rbd("clone", snap, f"{self.ceph_pool}/{child}"))

    # ---- one round ----
    def round(self, r):
        for depth in DEPTHS:
            sides = [self.cowblock_reads, self.rbd_reads]
            for side in sides if r % 2 == 0 else sides[::-1]:
                side(depth)
        devices = [(f"L{d}", f"c{d}", f"depth {d}") for d in DEPTHS] + \
                  [(f"z{m}", f"z{m}", f"{m} MiB") for m in self.args.sizes]
        env = self.env("cli")
        for dev, image, key in devices:
            self.snapshots["cowblock-cli"][key].append(
                seconds_of(self.cowblock("snapshot", dev, self.name(dev)), env=env))
            self.snapshots["rbd-cli"][key].append(self.rbd_level(image, self.name(image)))
        from cowblock import Pool
        with Pool.open(self.pool, commit_interval=0, timeout=30) as p:
            for dev, _, key in devices:
                t = time.perf_counter()
                p.snapshot(dev, self.name(dev))
                p.commit()
                self.snapshots["cowblock-api"][key].append(time.perf_counter() - t)

    def randread(self, target_args):
        return fio(target_args, "randread", "4k", self.args.seconds, True, size=self.size)

    def read_all(self, target_args):
        fio(target_args, "read", "1M", 0, False, size=self.size)

    def cowblock_reads(self, depth):
        dev = f"L{depth}"
        env = self.env(self.name("fresh"))
        sock = os.path.join(self.tmp, f"{dev}.sock")
        proc = serve(self.pool, [dev], sock, env=env)
        try:
            self.reads["cowblock-first"][depth].append(self.randread(nbd_args(sock, dev)))
            self.read_all(nbd_args(sock, dev))
            self.reads["cowblock-warm"][depth].append(self.randread(nbd_args(sock, dev)))
            self.snapshots["cowblock-daemon"][f"depth {depth}"].append(
                seconds_of(self.cowblock("snapshot", dev, self.name(dev)), env=env))
        finally:
            stop(proc)

    def rbd_reads(self, depth):
        image = f"c{depth}"
        sock = os.path.join(self.tmp, f"{image}.sock")
        proc = qemu_nbd(self.ceph_pool, image, sock)
        try:
            self.reads["rbd-nbd-first"][depth].append(self.randread(nbd_args(sock)))
            self.read_all(nbd_args(sock))
            self.reads["rbd-nbd-warm"][depth].append(self.randread(nbd_args(sock)))
        finally:
            stop(proc)
        self.reads["rbd-fio"][depth].append(self.randread(rbd_fio_args(self.ceph_pool, image)))

    # ---- what the cluster ran with ----
    def rbd_settings(self):
        info = json.loads(run(*self.rbd("info", "--format", "json", f"c{max(DEPTHS)}")))
        conf = {k: run("ceph", "config", "get", "client.admin", k).strip()
                for k in ("rbd_cache", "rbd_cache_policy", "rbd_default_clone_format")}
        return {"features": info["features"], "object_bytes": info["object_size"],
                "fio_rbd_engine": conf, "qemu_nbd": {"rbd_cache": "false (--cache none)"}}

    def teardown(self):
        r = subprocess.run(["timeout", "120", "ceph", "osd", "pool", "rm", self.ceph_pool,
                            self.ceph_pool, "--yes-i-really-really-mean-it"],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"could not remove the Ceph pool {self.ceph_pool}: {r.stderr.strip()}",
                  file=sys.stderr)


def median(values):
    return statistics.median(values) if values else None


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2)
    ap.add_argument("--mib", type=int, default=128, help="size of the chain's base, MiB")
    ap.add_argument("--sizes", default="32,128,1024",
                    help="sizes of the filled devices whose snapshots are timed, MiB "
                         "(--mib among them)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="for caches and sockets")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.sizes = sorted({int(m) for m in args.sizes.split(",")} | {args.mib})
    if not os.environ.get("CEPH_CONF"):
        sys.exit("set CEPH_CONF to the cluster's ceph.conf (tools/ceph-cluster.sh start DIR)")
    tmp = tempfile.mkdtemp(prefix="cb-rados-depth-", dir=args.dir)
    bench = Bench(args, tmp)
    load = [os.getloadavg()[0]]
    started = time.monotonic()
    try:
        bench.setup()
        for r in range(args.rounds):
            bench.round(r)
        settings = bench.rbd_settings()
    finally:
        bench.teardown()
        shutil.rmtree(tmp, ignore_errors=True)
    load.append(os.getloadavg()[0])
    reads = {t: {d: round(median(v)) for d, v in by.items()} for t, by in bench.reads.items()}
    snaps = {t: {k: median(v) for k, v in by.items() if v} for t, by in bench.snapshots.items()}

    print(f"4 KiB random reads at QD16, IOPS, medians of {args.rounds} "
          f"({args.mib} MiB, {osd_objectstore()} OSD)")
    print(f"{'':16}" + "".join(f"{'depth ' + str(d):>10}" for d in DEPTHS) + f"{'32/1':>8}")
    for t, row in reads.items():
        print(f"{t:16}" + "".join(f"{row[d]:>10}" for d in DEPTHS) +
              f"{row[32] / row[1]:>8.2f}")
    for mine, theirs in (("cowblock-first", "rbd-nbd-first"), ("cowblock-warm", "rbd-nbd-warm")):
        print(f"{mine} / {theirs}: " +
              ", ".join(f"{reads[mine][d] / reads[theirs][d]:.2f} at {d}" for d in DEPTHS))
    print("snapshot creation, ms, medians")
    print(f"{'':16}" + "".join(f"{k:>10}" for k in bench.keys))
    for t, row in snaps.items():
        print(f"{t:16}" + "".join(f"{row[k] * 1000:>10.1f}" if k in row else f"{'':>10}"
                                  for k in bench.keys))
    for t, levels in bench.chain.items():
        print(f"chain levels 1..32, {t}: level 1 {levels[0] * 1000:.1f} ms, median "
              f"{median(levels) * 1000:.1f}, level 32 {levels[-1] * 1000:.1f}")
    print(f"{time.monotonic() - started:.0f} s; load average {load[0]:.1f} -> {load[1]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"osd_objectstore": osd_objectstore(), "rounds": args.rounds,
                       "seconds": args.seconds, "chain_base_mib": args.mib,
                       "sizes_mib": args.sizes, "cowblock_block_bytes": 65536,
                       "rbd": settings, "load_average": load,
                       "read_iops": reads, "snapshot_seconds": snaps,
                       "chain_level_seconds": bench.chain,
                       "rounds_raw": {"read_iops": bench.reads,
                                      "snapshot_seconds": bench.snapshots}}, f, indent=1)


if __name__ == "__main__":
    main()
