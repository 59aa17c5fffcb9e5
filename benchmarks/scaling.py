"""How throughput scales from one device to two: the same load on one thin
device, then split over two, through the Python API (threads) and through
the NBD server (fio's nbd engine, one job per device, QD16), interleaved,
median of N rounds.

    python benchmarks/scaling.py [--runs 3] [--seconds 5] [--size-mib 256] [--json out.json]

Workloads: 4 KiB random reads and overwrites of fully written devices, and
4 KiB first writes into fresh snapshots (each a copy-on-write allocation).
"Two devices" runs one worker per device; "one device, two workers" is the
control that tells contention on a device from contention in the pool.
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
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd_compare import Server  # noqa: E402

import cowblock  # noqa: E402
from cowblock import Pool  # noqa: E402

MiB = 1 << 20
BS = 4096


def fill(pool, name, size):
    dev = pool.create_thin(name, size)
    chunk = os.urandom(MiB)
    for off in range(0, size, MiB):
        dev.pwrite(chunk, off)


def fresh_snapshots(pool, names):
    for n in names:
        if f"{n}-snap" in pool:
            pool.delete(f"{n}-snap")
        pool.snapshot(n, f"{n}-snap")
    pool.commit()
    return [f"{n}-snap" for n in names]


def api_run(pool, targets, kind, seconds, size):
    """One thread per target device name; returns total IOPS."""
    counts = [0] * len(targets)
    stop = time.perf_counter() + seconds

    def worker(i, name):
        dev, rng = pool.device(name), random.Random(i)
        buf, data, n = bytearray(BS), os.urandom(BS), 0
        blocks = size // BS
        while True:
            for _ in range(256):
                off = rng.randrange(blocks) * BS
                if kind == "read":
                    dev.readinto(buf, off)
                else:
                    dev.pwrite(data, off)
            n += 256
            if time.perf_counter() >= stop:
                break
        counts[i] = n

    threads = [threading.Thread(target=worker, args=(i, t)) for i, t in enumerate(targets)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def fio_run(sock, targets, rw, seconds, size):
    argv = ["fio", "--ioengine=nbd", f"--rw={rw}", "--bs=4k", "--iodepth=16", f"--size={size}",
            f"--runtime={seconds}", "--time_based", "--group_reporting", "--output-format=json"]
    for name in targets:
        argv += [f"--name={name}", f"--uri=nbd+unix:///{name}?socket={sock}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"fio failed: {out.stderr.strip()}")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return side["iops"]


LAYOUTS = {"1 device": ["a"], "2 devices": ["a", "b"], "1 device, 2 workers": ["a", "a"]}
# Each round: the three layouts interleaved per workload; first writes last,
# since they replace snapshots (deleting the old ones costs metadata work).
PLAN = [(kind, layout) for kind in ("read", "overwrite", "first write") for layout in LAYOUTS]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args()
    size = args.size_mib * MiB
    root = tempfile.mkdtemp(prefix="cowblock-scaling-", dir="/var/tmp")
    pool_dir = os.path.join(root, "pool")
    sock = os.path.join(root, "s.sock")
    results = {}   # (mode, workload, layout) -> [iops]
    try:
        with Pool.create(pool_dir, 8 * size + 64 * MiB * args.runs * 6, 65536,
                         commit_interval=1.0) as pool:
            fill(pool, "a", size)
            fill(pool, "b", size)
            pool.commit()
            for _ in range(args.runs):
                for kind, layout in PLAN:
                    targets = LAYOUTS[layout]
                    names = targets
                    if kind == "first write":
                        fresh_snapshots(pool, sorted(set(targets)))
                        names = [f"{t}-snap" for t in targets]
                    iops = api_run(pool, names, "read" if kind == "read" else "write",
                                   args.seconds, size)
                    results.setdefault(("api", kind, layout), []).append(iops)
        if shutil.which("fio"):
            server = Server(["cowblock", "--pool", pool_dir, "serve", "--socket", sock],
                            sock, "cowblock serve")
            try:
                for _ in range(args.runs):
                    for kind, layout in PLAN:
                        targets, rw = LAYOUTS[layout], "randread" if kind == "read" else "randwrite"
                        names = targets
                        if kind == "first write":
                            with cowblock.connect(pool_dir) as pool:
                                fresh_snapshots(pool, sorted(set(targets)))
                            names = [f"{t}-snap" for t in targets]
                        iops = fio_run(sock, names, rw, args.seconds, size)
                        results.setdefault(("nbd", kind, layout), []).append(iops)
            finally:
                server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    table = {}
    for (mode, kind, layout), v in results.items():
        table.setdefault((mode, kind), {})[layout] = statistics.median(v)
    print(f"| mode | workload | {' | '.join(LAYOUTS)} | 2 devices / 1 |")
    print("|---|---|" + "---|" * (len(LAYOUTS) + 1))
    for (mode, kind), row in table.items():
        cells = " | ".join(f"{row[layout]:,.0f}" for layout in LAYOUTS)
        print(f"| {mode} | 4 KiB {kind} IOPS | {cells} | "
              f"{row['2 devices'] / row['1 device']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": args.runs, "seconds": args.seconds, "size_mib": args.size_mib,
                       "cpus": os.cpu_count(),
                       "results": [{"mode": m, "workload": k, "layout": layout, "iops": v}
                                   for (m, k, layout), v in results.items()]}, f, indent=1)


if __name__ == "__main__":
    main()
