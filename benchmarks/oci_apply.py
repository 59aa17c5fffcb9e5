#!/usr/bin/env python3
"""Applying a layer with cowblock.oci against plain `tar -x` of the same tar.

The layer is a Debian minbase rootfs (`mmdebstrap --variant=minbase
bookworm`, needs the Debian archive apt uses) or, with --generated or when
mmdebstrap fails, a generated tree of the same shape.  Both sides extract
the same uncompressed tar, held in the page cache, into a fresh target of
the same kind, in interleaved rounds: --target ext4 (default; a new
loop-mounted ext4 of 1 GiB each time, as a layer device's filesystem),
tmpfs (no disk: the CPU cost alone) or dir (a directory under --dir).
GNU tar runs with the options
that keep what a layer carries (-p --numeric-owner --xattrs
--xattrs-include='*' --sparse).  With --gzip both read a gzip blob: ours
through blobs.LayerReader (decompressing and checking both digests),
tar through `tar -xz`.  Figures are medians of --runs; run as root.

    python benchmarks/oci_apply.py --runs 5 [--gzip] [--layer TAR] [--json OUT]
"""
import argparse
import gzip
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time

from cowblock.oci import apply_layer, blobs

TAR_OPTIONS = ["-p", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sparse"]


def minbase(path):
    subprocess.run(["mmdebstrap", "--variant=minbase", "--quiet", "bookworm", path],
                   check=True, capture_output=True)


def generated(path, files=9000, dirs=900, seed=1):
    """About minbase's shape: 9,000 files in 900 directories, mostly small."""
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as src:
        names = [os.path.join(src, *[f"d{rnd.randrange(30)}" for _ in range(rnd.randrange(1, 4))])
                 for _ in range(dirs)]
        for d in names:
            os.makedirs(d, exist_ok=True)
        for i in range(files):
            size = int(rnd.paretovariate(1.2) * 2000) if i % 50 else rnd.randrange(1 << 20, 4 << 20)
            with open(os.path.join(rnd.choice(names), f"f{i}"), "wb") as f:
                f.write(rnd.randbytes(min(size, 8 << 20)))
        subprocess.run(["tar", "--numeric-owner", "-C", src, "-cf", path, "."], check=True)


def entries(path):
    with tarfile.open(path) as t:
        return sum(1 for _ in t)


class Target:
    """A fresh, empty place to extract into, of the kind asked for."""

    def __init__(self, kind, work, name):
        self.kind, self.path = kind, os.path.join(work, name)
        self.image = self.path + ".img"
        os.mkdir(self.path)
        if kind == "ext4":
            with open(self.image, "wb") as f:
                f.truncate(1 << 30)
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,"
                            "lazy_journal_init=0", self.image], check=True)
            subprocess.run(["mount", "-o", "loop", self.image, self.path], check=True)
        elif kind == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", self.path],
                           check=True)

    def remove(self):
        if self.kind in ("ext4", "tmpfs"):
            subprocess.run(["umount", self.path], check=True)
            if os.path.exists(self.image):
                os.unlink(self.image)
        subprocess.run(["rm", "-rf", self.path], check=True)


def warm(path):
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def file_digest(path):
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def ours(path, target, digests):
    """apply_layer of PATH: a plain tar, or (DIGESTS given) a gzip blob
    read as an archive's layer is, both digests checked."""
    start = time.perf_counter()
    if digests:
        region = blobs.DirStore(os.path.dirname(path)).open(os.path.basename(path))
        blob_digest, diff_id = digests
        with blobs.LayerReader(region, compression="gzip", digest=blob_digest,
                               size=region.size, diff_id=diff_id, label="bench") as stream:
            apply_layer(stream, target)
    else:
        with open(path, "rb") as f:
            apply_layer(f, target)
    return time.perf_counter() - start


def gnu_tar(path, target, digests):
    start = time.perf_counter()
    subprocess.run(["tar", "-x", *(["-z"] if digests else []), *TAR_OPTIONS, "-f", path,
                    "-C", target], check=True)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--layer", help="an uncompressed layer tar to use (default: make one)")
    p.add_argument("--generated", action="store_true", help="a generated tree, not minbase")
    p.add_argument("--gzip", action="store_true", help="also compare from a gzip blob")
    p.add_argument("--target", choices=("ext4", "tmpfs", "dir"), default="ext4")
    p.add_argument("--dir", default="/var/tmp", help="where the work files go (/var/tmp)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="cowblock-oci-bench-", dir=args.dir)
    try:
        layer, source = args.layer, "given"
        if not layer:
            layer = os.path.join(work, "layer.tar")
            source = "generated"
            if not args.generated:
                try:
                    minbase(layer)
                    source = "mmdebstrap --variant=minbase bookworm"
                except (OSError, subprocess.CalledProcessError) as e:
                    print(f"mmdebstrap failed ({e}); using a generated tree")
            if source == "generated":
                generated(layer)
        size, count = os.path.getsize(layer), entries(layer)
        diff_id = file_digest(layer)
        modes = [("tar", None)]
        if args.gzip:
            gz = os.path.join(work, "layer.tar.gz")
            with open(layer, "rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            modes.append(("tar.gz", (gz, (file_digest(gz), diff_id))))
        results = {"layer": source, "bytes": size, "entries": count, "runs": args.runs,
                   "target": args.target}
        for mode, blob in modes:
            path, digests = blob or (layer, None)
            times = {"cowblock": [], "tar": []}
            for i in range(args.runs):
                for side, fn in (("cowblock", ours), ("tar", gnu_tar))[::1 if i % 2 else -1]:
                    target = Target(args.target, work, f"x-{side}")
                    try:
                        warm(path)
                        times[side].append(fn(path, target.path, digests))
                    finally:
                        target.remove()
            row = {}
            for side, ts in times.items():
                t = statistics.median(ts)
                row[side] = {"seconds": round(t, 3), "MB_per_s": round(size / t / 1e6, 1),
                             "entries_per_s": round(count / t)}
            row["ratio"] = round(row["tar"]["seconds"] / row["cowblock"]["seconds"], 2)
            results[mode] = row
            print(f"{mode}: {count} entries, {size / 1e6:.1f} MB uncompressed ({source}), "
                  f"onto {args.target}")
            for side in ("cowblock", "tar"):
                r = row[side]
                print(f"  {side:9s} {r['seconds']:7.3f} s  {r['MB_per_s']:7.1f} MB/s  "
                      f"{r['entries_per_s']:7d} entries/s")
            print(f"  cowblock speed / tar speed: {row['ratio']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
