#!/usr/bin/env python3
"""`cowblock image load` of a real image against unpacking it into a directory.

The image is a Debian minbase rootfs (`mmdebstrap --variant=minbase
bookworm`, needs the Debian archive apt uses; or --rootfs TAR; or, when
both fail, a generated tree of its shape) made into an OCI image by umoci
(`umoci raw add-layer`: one gzip layer), and a second image of that layer
and one small one.  Each round, interleaved:

  cowblock  a fresh pool and daemon, its 8 GiB ext4 template made first by
            loading a one-file image (made once per pool and filesystem size,
            not timed), then `image load` of the image (through the daemon's
            API: the command line adds its start-up), then of the second image
  tar       `tar -xz` of the layer blob into a fresh ext4 of its own (on a
            loop device with direct I/O, made before the clock starts), then
            syncfs (`sync -f`): as overlayfs' lower directories are filled
  umoci     with --umoci: `umoci unpack` of the image (a reference
            unpacker) onto such an ext4, then syncfs

All work files are under --dir (the pool's and the ext4 images alike).  Medians of
--runs; run as root.

    python benchmarks/image_load.py --runs 3 [--rootfs TAR] [--umoci] [--json OUT]
"""
import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oci_apply import TAR_OPTIONS, generated, minbase, warm  # noqa: E402

from cowblock import Pool  # noqa: E402
from cowblock.control import client  # noqa: E402
from cowblock.runtime import RuntimeDir  # noqa: E402


def run(*argv):
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def make_images(work, rootfs):
    """An OCI layout with tags prime (one tiny layer), v1 (ROOTFS) and v2
    (v1 and one small layer); returns (layout, the v1 layer blob)."""
    layout = os.path.join(work, "layout")
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:empty")
    small = os.path.join(work, "small")
    os.makedirs(os.path.join(small, "etc"))
    with open(os.path.join(small, "etc", "app.conf"), "w") as f:
        f.write("second image\n")
    small_tar = os.path.join(work, "small.tar")
    run("tar", "--numeric-owner", "-C", small, "-cf", small_tar, ".")
    run("umoci", "raw", "add-layer", "--image", f"{layout}:empty", "--tag", "prime", small_tar)
    run("umoci", "raw", "add-layer", "--image", f"{layout}:empty", "--tag", "v1", rootfs)
    run("umoci", "raw", "add-layer", "--image", f"{layout}:v1", "--tag", "v2", small_tar)
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    desc = next(d for d in index["manifests"]
                if d["annotations"]["org.opencontainers.image.ref.name"] == "v1")
    with open(os.path.join(layout, "blobs", "sha256", desc["digest"][7:])) as f:
        manifest = json.load(f)
    return layout, os.path.join(layout, "blobs", "sha256", manifest["layers"][0]["digest"][7:])


def cowblock_load(work, layout):
    pool = os.path.join(work, "pool")
    Pool.create(pool, 32 << 30, 65536).close()
    proxy, _ = client.daemon(pool)
    try:
        proxy.image_load(f"{layout}:prime", ref="prime", timeout=600)
        start = time.perf_counter()
        first = proxy.image_load(f"{layout}:v1", ref="minbase", timeout=600)
        t1 = time.perf_counter() - start
        start = time.perf_counter()
        second = proxy.image_load(f"{layout}:v2", ref="minbase-app", timeout=600)
        t2 = time.perf_counter() - start
        assert [la["reused"] for la in second["layers"]] == [True, False], second
        return t1, t2, first["bytes"]
    finally:
        proxy.stop(force=True)
        proxy.close()
        while RuntimeDir(pool).pid():
            time.sleep(0.05)
        shutil.rmtree(pool)


@contextlib.contextmanager
def fresh_ext4(work, name):
    """A new 1 GiB ext4 of its own, on a loop device with direct I/O: its
    syncfs writes its data to the disk, and nothing else's (a syncfs of the
    shared host filesystem would write back whatever others left dirty)."""
    image, mnt = os.path.join(work, name + ".img"), os.path.join(work, name)
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", image], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            loop)
        os.mkdir(mnt)
        run("mount", loop, mnt)
        try:
            yield mnt
        finally:
            run("umount", mnt)
            os.rmdir(mnt)
    finally:
        run("losetup", "-d", loop)
        os.unlink(image)


def tar_unpack(work, blob):
    with fresh_ext4(work, "tar") as target:
        start = time.perf_counter()
        run("tar", "-xz", *TAR_OPTIONS, "-f", blob, "-C", target)
        run("sync", "-f", target)
        return time.perf_counter() - start


def umoci_unpack(work, layout):
    with fresh_ext4(work, "umoci") as target:
        bundle = os.path.join(target, "bundle")
        start = time.perf_counter()
        run("umoci", "unpack", "--image", f"{layout}:v1", bundle)
        run("sync", "-f", bundle)
        return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rootfs", help="a rootfs tar to make the image of (default: mmdebstrap)")
    p.add_argument("--dir", default="/var/tmp", help="where the work files go (/var/tmp)")
    p.add_argument("--umoci", action="store_true", help="also time `umoci unpack` (slow)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="cowblock-image-bench-", dir=args.dir)
    try:
        rootfs = args.rootfs
        source = f"given ({os.path.basename(rootfs)})" if rootfs else None
        if not rootfs:
            rootfs = os.path.join(work, "rootfs.tar")
            try:
                minbase(rootfs)
                source = "mmdebstrap --variant=minbase bookworm"
            except (OSError, subprocess.CalledProcessError) as e:
                print(f"mmdebstrap failed ({e}); using a generated tree")
                generated(rootfs)
                source = "generated"
        layout, blob = make_images(work, rootfs)
        sides = ["cowblock", "tar"] + (["umoci"] if args.umoci else [])
        times = {"cowblock_second": [], **{side: [] for side in sides}}
        pool_bytes = None
        for i in range(args.runs):
            for side in sides[i % len(sides):] + sides[:i % len(sides)]:
                warm(blob)
                if side == "cowblock":
                    t1, t2, pool_bytes = cowblock_load(work, layout)
                    times["cowblock"].append(t1)
                    times["cowblock_second"].append(t2)
                elif side == "tar":
                    times["tar"].append(tar_unpack(work, blob))
                else:
                    times["umoci"].append(umoci_unpack(work, layout))
        med = {k: round(statistics.median(v), 3) for k, v in times.items()}
        results = {"rootfs": source, "rootfs_bytes": os.path.getsize(rootfs),
                   "layer_blob_bytes": os.path.getsize(blob), "layer_pool_bytes": pool_bytes,
                   "runs": args.runs, "seconds": med, "all_seconds": times,
                   "cowblock_over_tar": round(med["cowblock"] / med["tar"], 2),
                   "second_over_first": round(med["cowblock_second"] / med["cowblock"], 3)}
        if args.umoci:
            results["cowblock_over_umoci"] = round(med["cowblock"] / med["umoci"], 2)
        print(f"image: {source}, {results['rootfs_bytes'] / 1e6:.0f} MB as a "
              f"{results['layer_blob_bytes'] / 1e6:.0f} MB gzip layer; medians of {args.runs}")
        print(f"  cowblock image load      {med['cowblock']:7.3f} s")
        print(f"  tar -xz + syncfs         {med['tar']:7.3f} s")
        if args.umoci:
            print(f"  umoci unpack + syncfs    {med['umoci']:7.3f} s")
        print(f"  second image (shares the layer, adds one): {med['cowblock_second']:.3f} s")
        print(f"  cowblock / tar: {results['cowblock_over_tar']}"
              + (f", cowblock / umoci: {results['cowblock_over_umoci']}" if args.umoci else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
