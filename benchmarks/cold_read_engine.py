#!/usr/bin/env python3
"""Cold sequential reads in the engine, with no mount or NBD in between:
eight 1 MiB Device.pread calls, one after another (what a FUSE or NBD
request stream of one reader asks), from a 256 MiB device whose 64 KiB
blocks lie in order in the data file (written in order) and from one whose
blocks lie in random order (written in random order, as snapshots that
diverged or concurrent first writes leave them); and one 32 MiB read (as
NBD clients, export and pool copies ask) of a 1 GiB device written in order.

Each read is a new process that drops the caches first and opens the pool
read-only, and reads a region not read before (the host's own cache below
the VM keeps what was read: a region read twice is not cold).  Several
builds can be compared side by side, interleaved: --build NAME=PYTHON once
per build (the python of a venv with that build installed, as in
rados_open.py), default this interpreter.

    python benchmarks/cold_read_engine.py [--rounds 15] [--build NAME=PYTHON ...] [--dir DIR]
        [--json OUT]

Needs root (drop_caches).
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

MiB = 1 << 20
DEVICE = 256 * MiB
LAYOUTS = ("in-order", "random-order")
LARGE = "large-reads"   # 32 MiB a read
COLUMNS = ("8 MiB in 1 MiB reads, blocks in order", "the same, blocks in random order",
           "one 32 MiB read")


def setup(directory):
    from cowblock import Pool
    shutil.rmtree(directory, ignore_errors=True)
    with Pool.create(directory, 6 * DEVICE + 64 * MiB, 65536, commit_interval=0) as p:
        for name in LAYOUTS:
            dev = p.create_thin(name, DEVICE)
            blocks = list(range(DEVICE // 65536))
            if name == "random-order":
                random.Random(1).shuffle(blocks)
            for vb in blocks:
                dev.pwrite(os.urandom(65536), vb * 65536)
        dev = p.create_thin(LARGE, 4 * DEVICE)
        for off in range(0, 4 * DEVICE, 32 * MiB):
            dev.pwrite(os.urandom(32 * MiB), off)
        p.commit()
    os.sync()


def child(directory, region):
    """Milliseconds of the eight reads of region on each device, as JSON."""
    from cowblock import Pool
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    out = {}
    with Pool.open(directory, read_only=True) as p:
        for name in LAYOUTS:
            dev = p.device(name)
            t = time.perf_counter()
            for i in range(8):
                dev.pread(MiB, region * 8 * MiB + i * MiB)
            out[name] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        p.device(LARGE).pread(32 * MiB, region * 32 * MiB)
        out[LARGE] = (time.perf_counter() - t) * 1e3
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--build", action="append", default=[], metavar="NAME=PYTHON",
                    help="a build's python (repeat to compare)")
    ap.add_argument("--dir", default="/var/tmp/cowblock-cold-read-engine")
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]))
    for b in args.build:
        if "=" not in b:
            sys.exit(f"--build {b}: give NAME=PYTHON")
    labels = dict(b.split("=", 1)[::-1] for b in args.build) or {sys.executable: "this"}
    pythons = list(labels)
    if args.rounds * len(pythons) > DEVICE // (8 * MiB):
        sys.exit(f"{args.rounds} rounds of {len(pythons)} builds need more than the "
                 f"{DEVICE // (8 * MiB)} regions of a device")
    subprocess.run([pythons[0], "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r});"
                    f"import cold_read_engine as c; c.setup({args.dir!r})"], check=True, cwd="/")
    results = {py: {name: [] for name in LAYOUTS + (LARGE,)} for py in pythons}
    region = 0
    try:
        for rnd in range(args.rounds):
            order = pythons if rnd % 2 == 0 else pythons[::-1]
            for py in order:
                out = subprocess.run([py, os.path.abspath(__file__), "--child", args.dir, str(region)],
                                     capture_output=True, text=True, cwd="/", check=True)
                region += 1
                for name, ms in json.loads(out.stdout).items():
                    results[py][name].append(ms)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    first = pythons[0]
    print("| build | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for py in pythons:
        cells = []
        for name in LAYOUTS + (LARGE,):
            xs = results[py][name]
            ratio = statistics.median(a / b for a, b in zip(xs, results[first][name]))
            cells.append(f"{statistics.median(xs):.1f} ms" + ("" if py == first else f" ({ratio:.2f}x)"))
        print(f"| {labels[py]} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "results": {labels[py]: r for py, r in results.items()},
                       "note": "ms of eight cold 1 MiB reads; ratios are medians of paired rounds "
                               "against the first build"}, f, indent=2)


if __name__ == "__main__":
    main()
