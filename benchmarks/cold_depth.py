#!/usr/bin/env python3
"""`cowblock bench`'s cold reads at layer depth 1, cowblock against overlayfs
in interleaved rounds, and timed in parts: a cold stat of the 200 files of
etc/, then a cold read of the 8 MiB db.bin split into its open, its first
MiB and the rest.  Cold as the bench makes it (cowblock.bench.coldcache: the
pool daemon's mappings paged out, then drop_caches) before each part.

The image is the bench's tree (cowblock.bench.workloads.make_tree) with a
64 MiB big file instead of 1 GiB, so a run takes a minute.  To compare two
builds, run this script with each build's python, one after the other: each
run carries its own overlayfs figures, the control for the hour.

    python benchmarks/cold_depth.py [--rounds 11] [--dir DIR] [--json OUT]

Needs root, /dev/fuse and loop devices (what `cowblock mount` needs).
"""
import argparse
import json
import os
import shutil
import statistics
import time

from cowblock.bench import systems, workloads
from cowblock.bench.coldcache import drop_caches

MiB = 1 << 20
BIG = 64 * MiB
PARTS = ("stat_200_files", "read_8mib", "open", "first_mib")


def cold_parts(system, mnt):
    """Milliseconds of each part, each after cold caches."""
    out = {}
    drop_caches(system)
    t = time.perf_counter()
    etc = os.path.join(mnt, "etc")
    for name in os.listdir(etc):
        os.stat(os.path.join(etc, name))
    out["stat_200_files"] = (time.perf_counter() - t) * 1e3
    drop_caches(system)
    t = time.perf_counter()
    with open(os.path.join(mnt, "db.bin"), "rb") as f:
        out["open"] = (time.perf_counter() - t) * 1e3
        f.read(MiB)
        out["first_mib"] = (time.perf_counter() - t) * 1e3
        while f.read(MiB):
            pass
    out["read_8mib"] = (time.perf_counter() - t) * 1e3
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--dir", default="/var/tmp/cowblock-cold-depth")
    ap.add_argument("--json")
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    tree = os.path.join(args.dir, "tree")
    workloads.make_tree(tree, BIG, source_limit=2 * MiB)
    image = os.path.join(args.dir, "image.raw")
    fs_size = 2 * BIG + 192 * MiB
    systems.make_ext4_image(tree, image, fs_size)
    os.truncate(image, fs_size + 16 * 4096 + 4 * MiB)   # room for the layer's own block
    peers = [systems.Cowblock(os.path.join(args.dir, "cowblock")),
             systems.Overlay(os.path.join(args.dir, "overlayfs"))]
    results = {s.name: {part: [] for part in PARTS} for s in peers}
    try:
        for s in peers:
            why = s.available()
            if why:
                raise SystemExit(f"{s.name} cannot run here: {why}")
            s.build_image(tree, image, os.path.getsize(image))
            s.add_layer("L0", fs_size)           # depth 1, as the bench's first depth
            s.new_container("depth1")
            s.mount("depth1", os.path.join(args.dir, f"mnt-{s.name}"))
        for rnd in range(args.rounds):
            for s in peers if rnd % 2 == 0 else peers[::-1]:
                for part, ms in cold_parts(s, os.path.join(args.dir, f"mnt-{s.name}")).items():
                    results[s.name][part].append(ms)
    finally:
        for s in peers:
            s.close()
        shutil.rmtree(args.dir, ignore_errors=True)
    med = {n: {part: statistics.median(xs) for part, xs in r.items()} for n, r in results.items()}
    print("| system | " + " | ".join(PARTS) + " |")
    print("|---" * (len(PARTS) + 1) + "|")
    for name, m in med.items():
        print(f"| {name} | " + " | ".join(f"{m[part]:.2f} ms" for part in PARTS) + " |")
    print("cowblock / overlayfs, ratio of medians: " +
          ", ".join(f"{part} {med['cowblock'][part] / med['overlayfs'][part]:.2f}x" for part in PARTS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "results": results, "medians": med}, f, indent=2)


if __name__ == "__main__":
    main()
