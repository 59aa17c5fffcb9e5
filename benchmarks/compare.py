"""Side-by-side figures for the core engine's performance targets.

    python benchmarks/compare.py [--runs 5] [--scale 1.0] [--dir /var/tmp] [--json out.json]

Every figure is the median of --runs rounds, and in each round our
measurement and its peer's run back to back (interleaved), so that the
noise of a shared machine hits both alike.  Ratios are medians of the
per-round ratios.  Nothing here asserts a timing: it prints the figures
next to their targets (README.md quotes them with this command).
"""
import argparse
import json
import mmap
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from cowblock import Pool

MiB = 1 << 20


def settle():
    os.sync()
    time.sleep(1)


def median(xs):
    return statistics.median(xs)


def fill(dev, nbytes, chunk=MiB):
    buf = os.urandom(chunk)
    for off in range(0, nbytes, chunk):
        dev.pwrite(buf[:min(chunk, nbytes - off)], off)


def raw_file(path, nbytes):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    buf = os.urandom(MiB)
    for off in range(0, nbytes, MiB):
        os.pwrite(fd, buf, off)
    return fd


class Bench:
    def __init__(self, root, runs, scale):
        self.root, self.runs, self.scale = root, runs, scale
        self.results = []

    def path(self, name):
        p = os.path.join(self.root, name)
        shutil.rmtree(p, ignore_errors=True)
        return p

    def report(self, name, value, unit, target, ok, **extra):
        self.results.append(dict(name=name, value=value, unit=unit, target=target, ok=ok, **extra))
        mark = "ok  " if ok else ("MISS" if ok is not None else "    ")
        print(f"[{mark}] {name}: {value:.3g} {unit}   (target {target})", flush=True)
        for k, v in extra.items():
            print(f"         {k}: {v}", flush=True)

    # ---- snapshot cost and open time, at 10^3 / 10^4 / 10^6 mapped blocks ----
    def snapshots_and_open(self):
        bs = 4096
        sizes = {"empty": 0, "1e3": 1000, "1e4": 10_000, "1e6": int(1_000_000 * self.scale)}
        pools = {}
        for key, n in sizes.items():
            path = self.path(f"snap-{key}")
            pool = Pool.create(path, max(n, 1024) * bs * 2, bs, commit_interval=0)
            dev = pool.create_thin("origin", max(n, 1) * bs)
            fill(dev, n * bs)
            pool.commit()
            pools[key] = (path, pool)
        settle()
        times = {k: [] for k in sizes}
        commit_times = {k: [] for k in sizes}
        blocks = {k: [] for k in sizes}
        for r in range(self.runs):
            for key, (path, pool) in pools.items():
                w0, _ = pool._counters()
                t = time.perf_counter()
                pool.snapshot("origin", f"s{r}")
                times[key].append(time.perf_counter() - t)
                blocks[key].append(pool._counters()[0] - w0)
                t = time.perf_counter()
                pool.set_labels(f"s{r}", {"round": str(r)})  # a commit of one changed detail
                commit_times[key].append(time.perf_counter() - t)
        ratio = median(times["1e6"]) / median(times["empty"])
        self.report("snapshot time at 1e6 mapped / empty", ratio, "x", "<= 2", ratio <= 2,
                    snapshot_ms={k: round(median(v) * 1e3, 3) for k, v in times.items()},
                    commit_only_ms={k: round(median(v) * 1e3, 3) for k, v in commit_times.items()},
                    commit_share=round(median(commit_times["1e6"]) / median(times["1e6"]), 2))
        counts = {k: median(v) for k, v in blocks.items()}
        # The superblock, the device-tree path, and the metadata space map pages
        # holding the counts touched (at most three, plus their index pages):
        # bounded by 8 whatever the number of mapped blocks.
        b3, b6 = counts["1e3"], counts["1e6"]
        self.report("metadata blocks written per snapshot at 1e6 mapped (vs 1e3)", b6, "blocks",
                    "a small constant, not growing with mapped blocks",
                    max(counts.values()) <= 8 and b6 - b3 <= 1,
                    blocks_written={k: int(v) for k, v in counts.items()})
        for _, pool in pools.values():
            pool.close()
        opens = {"1e4": [], "1e6": []}
        for _ in range(self.runs):
            for key in opens:
                t = time.perf_counter()
                Pool.open(pools[key][0], commit_interval=0).close()
                opens[key].append(time.perf_counter() - t)
        o4, o6 = median(opens["1e4"]), median(opens["1e6"])
        self.report("open time at 1e6 mapped / 1e4", o6 / o4, "x", "<= 1.3 and < 100 ms",
                    o6 / o4 <= 1.3 and o6 < 0.1, open_ms_1e4=round(o4 * 1e3, 2),
                    open_ms_1e6=round(o6 * 1e3, 2))
        for path, _ in pools.values():
            shutil.rmtree(path, ignore_errors=True)

    # ---- reads at snapshot depth 128 and 1000 vs 0 ----
    def depth(self):
        """A chain of snapshots, each of which rewrote one 4 KiB piece of
        the device (so the top's 1 MiB reads come in pieces from all over
        the data file), read 1 MiB sequentially, warm, against the base;
        at least 10 interleaved rounds, ratio of medians."""
        bs, size = 65536, int(256 * MiB * self.scale) // MiB * MiB
        rounds = max(self.runs, 10)
        for depth in (128, 1000):
            room = (size // 8 + 2 * depth * bs) // bs * bs     # above min_free_space when done
            pool = Pool.create(self.path(f"depth{depth}"), size + room, bs,
                               commit_interval=0)
            fill(pool.create_thin("l0", size), size)
            rng = random.Random(1)
            for i in range(1, depth + 1):
                dev = pool.snapshot(f"l{i - 1}", f"l{i}")
                dev.pwrite(b"x" * 4096, rng.randrange(size // 4096) * 4096)
            buf = bytearray(MiB)

            def read_all(dev):
                t = time.perf_counter()
                for off in range(0, size, MiB):
                    dev.readinto(buf, off)
                return size / (time.perf_counter() - t) / 1e6

            top, bottom = pool.device(f"l{depth}"), pool.device("l0")
            read_all(top), read_all(bottom)
            mb = {"0": [], str(depth): []}
            for _ in range(rounds):
                mb["0"].append(read_all(bottom))
                mb[str(depth)].append(read_all(top))
            r = median(mb[str(depth)]) / median(mb["0"])
            self.report(f"1 MiB sequential read MB/s at depth {depth} (diverged) / depth 0", r,
                        "x", ">= 0.95", r >= 0.95, rounds=rounds,
                        mb_s={k: round(median(v)) for k, v in mb.items()})
            pool.close()
            shutil.rmtree(self.path(f"depth{depth}"), ignore_errors=True)

    # ---- bulk copies against numpy and the page cache ----
    def bandwidth(self):
        bs, size = 65536, int(256 * MiB * self.scale) // MiB * MiB
        pool = Pool.create(self.path("bw"), size * 2, bs, commit_interval=1.0)
        dev = pool.create_thin("a", size)
        fill(dev, size)
        pool.commit()
        raw_fd = raw_file(os.path.join(self.root, "bw", "raw"), size)
        buf = bytearray(MiB)
        src, dst = np.ones(size, np.uint8), np.empty(size, np.uint8)
        np.copyto(dst, src)

        def ours_read():
            t = time.perf_counter()
            for off in range(0, size, MiB):
                dev.readinto(buf, off)
            return size / (time.perf_counter() - t) / 1e6

        def numpy_copy():
            t = time.perf_counter()
            np.copyto(dst, src)
            return size / (time.perf_counter() - t) / 1e6

        data = os.urandom(MiB)

        def ours_write():
            t = time.perf_counter()
            for off in range(0, size, MiB):
                dev.pwrite(data, off)
            return size / (time.perf_counter() - t) / 1e6

        def raw_write():
            t = time.perf_counter()
            for off in range(0, size, MiB):
                os.pwrite(raw_fd, data, off)
            return size / (time.perf_counter() - t) / 1e6

        n = int(200_000 * min(self.scale, 1) + 10_000)
        rng = random.Random(2)
        offsets = [rng.randrange(size // 4096) * 4096 for _ in range(n)]
        small = bytearray(4096)

        def ours_4k():
            t = time.perf_counter()
            for o in offsets:
                dev.readinto(small, o)
            return n / (time.perf_counter() - t)

        def raw_4k():
            t = time.perf_counter()
            bufs = [small]
            for o in offsets:
                os.preadv(raw_fd, bufs, o)
            return n / (time.perf_counter() - t)

        for f in (ours_read, numpy_copy, ours_write, raw_write, ours_4k, raw_4k):
            f()  # warm: map pages, fault in buffers
        for title, ours, peer, target in [
                ("1 MiB readinto MB/s / numpy copy MB/s", ours_read, numpy_copy, 0.7),
                ("1 MiB pwrite overwrite MB/s / os.pwrite (page cache)", ours_write, raw_write, 0.8),
                ("4 KiB random readinto IOPS / os.preadv IOPS", ours_4k, raw_4k, 0.8)]:
            a, b = [], []
            for _ in range(self.runs):
                a.append(ours())
                b.append(peer())
            r = median([x / y for x, y in zip(a, b)])
            self.report(title, r, "x", f">= {target}", r >= target,
                        ours=round(median(a)), peer=round(median(b)))
        os.close(raw_fd)
        pool.close()
        del src, dst

    # ---- first writes into a fresh snapshot: CoW of 64 KiB blocks ----
    def cow(self):
        bs, size = 65536, int(256 * MiB * self.scale) // MiB * MiB
        nblocks = size // bs
        root = self.path("cow")
        os.makedirs(root)
        raw = os.path.join(root, "base.raw")
        os.close(raw_file(raw, size))
        pool = Pool.create(os.path.join(root, "pool"), size * 4, bs, commit_interval=0)
        fill(pool.create_thin("base", size), size)
        pool.commit()
        qemu = shutil.which("qemu-img")
        if qemu:
            subprocess.run([qemu, "convert", "-f", "raw", "-O", "qcow2", raw,
                            os.path.join(root, "base.qcow2")], check=True)
        order = list(range(nblocks))
        random.Random(3).shuffle(order)
        four_k = os.urandom(4096)
        stride = bs * next(k for k in range(nblocks + 1, 3 * nblocks) if k % 2 == 1 and k % nblocks)

        def ours(r):
            dev = pool.snapshot("base", f"c{r}")
            settle()
            t = time.perf_counter()
            for b in order:
                dev.pwrite(four_k, b * bs)
            return nblocks / (time.perf_counter() - t)

        def qemu_bench(r, extl2):
            ovl = os.path.join(root, f"o{r}{'x' if extl2 else ''}.qcow2")
            opts = ["-o", "extended_l2=on"] if extl2 else []
            subprocess.run([qemu, "create", "-q", "-f", "qcow2", *opts, "-b",
                            os.path.join(root, "base.qcow2"), "-F", "qcow2", ovl], check=True)
            settle()
            out = subprocess.run([qemu, "bench", "-w", "-f", "qcow2", "-t", "writeback", "-i",
                                  "threads", "-d", "16", "-c", str(nblocks), "-s", "4k", "-S",
                                  str(stride), ovl], check=True, capture_output=True, text=True)
            secs = float(out.stdout.split("Run completed in")[1].split()[0])
            os.unlink(ovl)
            return nblocks / secs

        src_fd = os.open(raw, os.O_RDONLY)
        src = mmap.mmap(src_fd, size, prot=mmap.PROT_READ)

        def by_hand(r):
            path = os.path.join(root, f"hand{r}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fd, size)
            mv = memoryview(src)
            settle()
            t = time.perf_counter()
            for i, b in enumerate(order):
                os.pwrite(fd, mv[b * bs:(b + 1) * bs], i * bs)
            rate = nblocks / (time.perf_counter() - t)
            os.close(fd)
            os.unlink(path)
            return rate

        res = {"ours": [], "hand": [], "qemu": [], "qemu_extl2": []}
        for r in range(self.runs):
            res["ours"].append(ours(r))
            res["hand"].append(by_hand(r))
            if qemu:
                res["qemu"].append(qemu_bench(r, False))
                res["qemu_extl2"].append(qemu_bench(r, True))
            pool.delete(f"c{r}")
        figures = {k: round(median(v)) for k, v in res.items() if v}
        if qemu:
            r = median([a / b for a, b in zip(res["ours"], res["qemu"])])
            self.report("4 KiB first writes into a fresh snapshot, IOPS / qemu-img bench -w "
                        "(qcow2 overlay, 64 KiB clusters)", r, "x", ">= 1.5", r >= 1.5, iops=figures)
        else:
            self.report("4 KiB first writes vs qemu-img", 0, "x", ">= 1.5", None,
                        skipped="qemu-img is not installed (apt-get install qemu-utils)")
        r = median([a / b for a, b in zip(res["ours"], res["hand"])])
        self.report("4 KiB first writes (64 KiB CoW each) / copying 64 KiB into fresh blocks by "
                    "hand", r, "x", ">= 0.5", r >= 0.5, iops=figures)
        src.close()
        os.close(src_fd)
        pool.close()
        shutil.rmtree(root, ignore_errors=True)

    # ---- metadata bytes per mapped block ----
    def metadata_size(self):
        bs, n = 4096, int(200_000 * self.scale)
        path = self.path("meta")
        pool = Pool.create(path, n * bs * 2, bs, metadata_size=max(64 * MiB, n * 64),
                           commit_interval=1.0)
        dev = pool.create_thin("a", n * bs)
        order = list(range(n))
        random.Random(4).shuffle(order)
        page = os.urandom(4096)
        for b in order:
            dev.pwrite(page, b * bs)
        pool.commit()
        meta = os.path.join(path, "metadata")

        def allocated():
            return os.stat(meta).st_blocks * 512

        per_block = allocated() / n
        before = allocated()
        pool.snapshot("a", "snap")
        for b in order[: n // 100]:
            dev.pwrite(page, b * bs)
        pool.commit()
        growth = allocated() - before
        self.report("metadata bytes per mapped block after random-order 4 KiB writes", per_block,
                    "B", "<= 24", per_block <= 24, mapped=n,
                    growth_per_snapshot_plus_1pct_rewrite_bytes=growth,
                    growth_per_mapped_block=round(growth / n, 1))
        pool.close()
        shutil.rmtree(path, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="data set size factor (1.0: 10^6 mapped blocks, 256 MiB devices)")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a new one in /var/tmp)")
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--only", nargs="*", default=None,
                    choices=["snapshots", "depth", "bandwidth", "cow", "metadata"])
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="cowblock-bench-", dir="/var/tmp")
    os.makedirs(root, exist_ok=True)
    b = Bench(root, args.runs, args.scale)
    steps = {"snapshots": b.snapshots_and_open, "depth": b.depth, "bandwidth": b.bandwidth,
             "cow": b.cow, "metadata": b.metadata_size}
    print(f"cowblock engine benchmarks: {args.runs} interleaved rounds, scale {args.scale}, in {root}")
    try:
        for name, step in steps.items():
            if args.only is None or name in args.only:
                step()
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                                   "cpus": os.cpu_count()},
                       "runs": args.runs, "scale": args.scale, "results": b.results}, f, indent=2)


if __name__ == "__main__":
    main()
