"""What `cowblock pool copy` costs against copying the pool's files with
`cp --sparse=always` (the floor for a local copy: no metadata walk, no
per-device work), both made durable (cp's copies fsynced with `sync FILE`,
as the copy's commit fsyncs its pool), and against cp without the fsync.

    python benchmarks/poolcopy.py [--gib 1] [--runs 3] [--dir /var/tmp] [--rados rados:P/N]
                                  [--json out.json]

The pool holds --gib GiB of random data written in 1 MiB pieces to one
device, and a snapshot of it whose every 16th block was rewritten (the
copy keeps the sharing: it stores the data once, as the source does).
Every figure is the median of --runs rounds; the sides run back to back in
each round (interleaved, each first in one round), from a warm page cache
with nothing dirty (`sync -f` before each), the same source files for all.
With --rados (a rados: location, $CEPH_CONF set) local -> RADOS is timed
too, in the same rounds, beside `rbd import` of the raw base device alone
(its MB/s are of its own bytes).  Nothing here asserts a timing.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from cowblock import Pool, rados, transfer

MiB = 1 << 20
BS = 65536


def make_source(path, gib):
    size = gib << 30
    with Pool.create(path, size + (size >> 2), BS, commit_interval=None) as p:
        dev = p.create_thin("base", size)
        for off in range(0, size, MiB):
            dev.pwrite(os.urandom(MiB), off)
        p.snapshot("base", "snap")
        for off in range(0, size, 16 * BS):
            dev.pwrite(os.urandom(BS), off)
        s = p.stats()
        return s.data_used * s.block_size


def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def cp_pool(src, dst, durable):
    t = time.perf_counter()
    os.mkdir(dst)
    for name in ("data", "metadata"):
        subprocess.run(["cp", "--sparse=always", os.path.join(src, name), dst], check=True)
    if durable:
        subprocess.run(["sync", os.path.join(dst, "data"), os.path.join(dst, "metadata")],
                       check=True)
    return time.perf_counter() - t


def settle(root):
    """Write back what the last side left dirty (cp without its fsync), so
    that the next side does not pay for it."""
    subprocess.run(["sync", "-f", root], check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--rados", help="also time local -> RADOS to this rados: location")
    ap.add_argument("--json")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="cowblock-poolcopy-", dir=args.dir)
    cowblock = shutil.which("cowblock")
    try:
        src = os.path.join(root, "src")
        used = make_source(src, args.gib)
        sides = {
            "pool_copy_s": lambda dst: timed([cowblock, "pool", "copy", src, dst]),
            "cp_sparse_sync_s": lambda dst: cp_pool(src, dst, True),
            "cp_sparse_s": lambda dst: cp_pool(src, dst, False),
        }
        if args.rados:
            sides["pool_copy_to_rados_s"] = lambda dst: timed(
                [cowblock, "pool", "copy", src, args.rados])
            # the well-known way into Ceph for one disk image: its base device alone
            raw = os.path.join(root, "base.raw")
            with Pool.open(src, read_only=True) as p:
                transfer.export_file(p, "base", raw)
            ceph_pool = rados.parse(args.rados).ceph_pool
            sides["rbd_import_base_s"] = lambda dst: timed(
                ["rbd", "-p", ceph_pool, "import", raw, "cowblock-bench"])
        rounds = []
        for r in range(args.runs):
            out = {}
            names = list(sides)
            for name in names[r % len(names):] + names[:r % len(names)]:   # each goes first once
                settle(root)
                dst = os.path.join(root, f"copy{r}")
                out[name] = sides[name](dst)
                if name == "pool_copy_to_rados_s":
                    rados.destroy(args.rados)
                elif name == "rbd_import_base_s":
                    subprocess.run(["rbd", "-p", ceph_pool, "rm", "cowblock-bench"], check=True,
                                   capture_output=True)
                else:
                    shutil.rmtree(dst)
            rounds.append(out)
        result = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        result["data_bytes"] = used
        for k in list(result):
            if k.endswith("_s"):
                moved = (args.gib << 30) if k == "rbd_import_base_s" else used
                result[k[:-2] + "_MBps"] = moved / result[k] / 1e6
        result["ratio_vs_cp_sparse_sync"] = result["cp_sparse_sync_s"] / result["pool_copy_s"]
        result["ratio_vs_cp_sparse"] = result["cp_sparse_s"] / result["pool_copy_s"]
        result["rounds"] = rounds
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
