#!/usr/bin/env python3
"""`cowblock image load` of a real 3-layer image against untarring its
layers into overlayfs lower directories.

The image is Debian minbase as three OCI layers made by umoci from Debian's
own packages (cowblock.bench.realimage: the `mmdebstrap --variant=minbase
bookworm` rootfs; ca-certificates, procps and less installed; docs, manual
pages and translations deleted), built once and cached under /var/tmp; a
second image shares its two lower layers and adds one small layer.  Needs
the Debian archive apt uses the first time (else it says why and stops);
--small uses a generated image of the same shape instead (a dry run).
Each round, the sides interleaved (their order rotating):

  cowblock   a fresh pool and its daemon, whose 8 GiB empty filesystem is
             made first by loading a one-file image (once per pool, not
             timed); then `cowblock image load LAYOUT:v1` as a user runs it
             (the command, through the daemon: layers applied, synced,
             committed), then of v2
  overlayfs  `tar -x` of each layer blob into its own lower directory and
             its whiteouts made overlayfs' (`.wh.X` a 0/0 character device,
             `.wh..wh..opq` the trusted.overlay.opaque xattr), on a fresh
             ext4 of its own (a loop device with direct I/O, made before
             the clock starts), then syncfs; after the clock, the overlay is
             mounted and checked (a deleted file is gone, an installed one there)
  umoci      with --umoci: `umoci unpack` of v1 onto such an ext4, then syncfs

Medians of --runs, and the CPU seconds of each side (cowblock's daemon
and the commands it ran; tar, gzip and the whiteout pass), on a loaded
machine the fairer measure of the work each does; run as root.

    python benchmarks/image_load.py --runs 5 [--cli] [--umoci] [--small] [--json OUT]
"""
import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oci_apply import warm  # noqa: E402

from cowblock import Pool  # noqa: E402
from cowblock.bench import realimage  # noqa: E402
from cowblock.control import client  # noqa: E402
from cowblock.layers import syncfs  # noqa: E402
from cowblock.runtime import RuntimeDir  # noqa: E402

COWBLOCK = [sys.executable, "-m", "cowblock"]


def process_cpu(pid):
    """CPU seconds of process PID and its waited-for children (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    """CPU seconds of this process and the children it waited for (the
    finished ones not waited for yet, a pool daemon of an earlier round, are
    waited for first: before the count starts)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, **kw)


def cowblock_load(work, image, cli):
    """Load v1 then v2 into a fresh pool through its daemon: with the
    command (CLI), or with the daemon's call the command makes."""
    pool = os.path.join(work, "pool")
    Pool.create(pool, 32 << 30, 65536).close()
    proxy, _ = client.daemon(pool)
    try:
        proxy.image_load(image.ref("prime"), ref="prime", timeout=600)
        pid = RuntimeDir(pool).pid()
        times = []
        for which, ref in (("first", "minbase"), ("second", "minbase-app")):
            cpu = process_cpu(pid)
            start = time.perf_counter()
            if cli:
                run(*COWBLOCK, "--pool", pool, "image", "load", image.ref(which), "--name", ref)
            else:
                proxy.image_load(image.ref(which), ref=ref, timeout=600)
            times.append(time.perf_counter() - start)
            if which == "first":
                first_cpu = process_cpu(pid) - cpu
        second = proxy.oci_image_info("minbase-app")
        first = proxy.oci_image_info("minbase")
        shared = [la["device"] for la in first["layers"]][:2]
        assert [la["device"] for la in second["layers"]][:2] == shared, (first, second)
        return times[0], times[1], first["bytes"], first_cpu
    finally:
        daemon = RuntimeDir(pool).pid()
        proxy.stop(force=True)
        proxy.close()
        with contextlib.suppress(ChildProcessError):  # our child: gone, and its CPU counted
            os.waitpid(daemon, 0)
        while RuntimeDir(pool).pid():
            time.sleep(0.05)
        shutil.rmtree(pool)


@contextlib.contextmanager
def fresh_ext4(work, name):
    """A new 2 GiB ext4 of its own, on a loop device with direct I/O: its
    syncfs writes its data to the disk, and nothing else's (a syncfs of the
    shared host filesystem would write back whatever others left dirty)."""
    image, mnt = os.path.join(work, name + ".img"), os.path.join(work, name)
    with open(image, "wb") as f:
        f.truncate(2 << 30)
    loop = run("losetup", "--find", "--show", "--direct-io=on", image, text=True).stdout.strip()
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


def check_overlay(target, dirs, probes):
    """Mount the lower directories as one read-only overlay and check that
    PROBES hold ({path: should it exist}): proof that they make the rootfs."""
    mnt = os.path.join(target, "merged")
    os.makedirs(mnt, exist_ok=True)
    run("mount", "-t", "overlay", "overlay", "-o",
        f"ro,lowerdir={realimage.lowerdir_option(dirs)}", mnt)
    try:
        for rel, present in probes.items():
            there = os.path.lexists(os.path.join(mnt, rel))
            assert there == present, f"{rel}: {'missing' if present else 'not deleted'} " \
                                     "in the overlay"
    finally:
        run("umount", mnt)


def overlay_unpack(work, image, probes):
    with fresh_ext4(work, "overlay") as target:
        cpu = children_cpu()
        start = time.perf_counter()
        dirs = realimage.unpack_for_overlay(image, "first", target)
        syncfs(target)
        t1 = time.perf_counter() - start
        cpu = children_cpu() - cpu
        start = time.perf_counter()   # the second image: only its own top layer is new
        blob, media_type = image.layers("second")[-1]
        realimage.untar_layer(blob, media_type, os.path.join(target, "second"))
        syncfs(target)
        t2 = time.perf_counter() - start
        check_overlay(target, dirs, probes)
        check_overlay(target, dirs[:2] + [os.path.join(target, "second")], {"etc/app.conf": True})
        return t1, t2, cpu


def umoci_unpack(work, image):
    with fresh_ext4(work, "umoci") as target:
        bundle = os.path.join(target, "bundle")
        start = time.perf_counter()
        run("umoci", "unpack", "--image", image.ref("first"), bundle)
        syncfs(bundle)
        return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--small", action="store_true",
                   help="a small generated image of the same shape (a dry run of the script)")
    p.add_argument("--dir", default="/var/tmp", help="where the work files go (/var/tmp)")
    p.add_argument("--cli", action="store_true", help="also time the `cowblock image load` "
                   "command (a pool of its own)")
    p.add_argument("--umoci", action="store_true", help="also time `umoci unpack` (slow)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="cowblock-image-bench-", dir=args.dir)
    try:
        try:
            image = realimage.small_image(work) if args.small else \
                realimage.minbase_image(progress=print)
        except realimage.Unavailable as e:
            print(f"skipped: {e}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"skipped": str(e)}, f, indent=2)
            return
        blobs = [b for b, _ in image.layers("first")] + [image.layers("second")[-1][0]]
        sides = ["cowblock", "overlayfs"] + (["cowblock_cli"] if args.cli else []) \
            + (["umoci"] if args.umoci else [])
        times = {"cowblock": [], "cowblock_second": [], "overlayfs": [], "overlayfs_second": []}
        if args.cli:
            times.update(cowblock_cli=[], cowblock_cli_second=[])
        if args.umoci:
            times["umoci"] = []
        cpu = {"cowblock": [], "overlayfs": []}   # CPU seconds of the first image's load
        pool_bytes = None
        for i in range(args.runs):
            for side in sides[i % len(sides):] + sides[:i % len(sides)]:
                for blob in blobs:
                    warm(blob)
                if side.startswith("cowblock"):
                    t1, t2, pool_bytes, c = cowblock_load(work, image, cli=side == "cowblock_cli")
                    times[side].append(t1)
                    times[side + "_second"].append(t2)
                    cpu.setdefault(side, []).append(c)
                elif side == "overlayfs":
                    t1, t2, c = overlay_unpack(work, image, image.probes)
                    times["overlayfs"].append(t1)
                    times["overlayfs_second"].append(t2)
                    cpu["overlayfs"].append(c)
                else:
                    times["umoci"].append(umoci_unpack(work, image))
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()))
        med = {k: round(statistics.median(v), 3) for k, v in times.items()}
        second_target = max(0.05 * med["cowblock"], 0.3)
        results = {"image": {k: v for k, v in image.info.items()}, "runs": args.runs,
                   "command": "python benchmarks/image_load.py " + " ".join(sys.argv[1:]),
                   "seconds": med, "all_seconds": times, "pool_bytes": pool_bytes,
                   "cpu_seconds": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
                   "all_cpu_seconds": cpu,
                   "cowblock_over_overlayfs": round(med["cowblock"] / med["overlayfs"], 2),
                   "round_ratios": [round(c / o, 2) for c, o in zip(times["cowblock"],
                                                                    times["overlayfs"])],
                   "second_over_first": round(med["cowblock_second"] / med["cowblock"], 3),
                   "targets": {"cowblock_over_overlayfs_at_most": 1.5,
                               "second_seconds_under": round(second_target, 3)}}
        if args.cli:
            results["cowblock_cli_over_overlayfs"] = round(med["cowblock_cli"] / med["overlayfs"],
                                                           2)
        if args.umoci:
            results["cowblock_over_umoci"] = round(med["cowblock"] / med["umoci"], 2)
        layer_mb = " + ".join(f"{la['blob_bytes'] / 1e6:.1f}" for la in image.info["layers"])
        print(f"image: {image.info.get('source', 'generated')}, layers {layer_mb} MB "
              f"(gzip); medians of {args.runs}")
        print(f"  cowblock image load (daemon call)   {med['cowblock']:7.3f} s")
        if args.cli:
            print(f"  cowblock image load (the command)   {med['cowblock_cli']:7.3f} s, "
                  f"second image {med['cowblock_cli_second']:.3f} s")
        print(f"  tar -x into lower dirs + syncfs     {med['overlayfs']:7.3f} s")
        if args.umoci:
            print(f"  umoci unpack + syncfs               {med['umoci']:7.3f} s")
        print(f"  CPU seconds of the first load: cowblock's daemon and its children "
              f"{results['cpu_seconds']['cowblock']:.2f}, tar, gzip and the whiteouts "
              f"{results['cpu_seconds']['overlayfs']:.2f}")
        print(f"  second image: cowblock {med['cowblock_second']:.3f} s "
              f"(target < {second_target:.3f} s), overlayfs {med['overlayfs_second']:.3f} s")
        print(f"  cowblock / overlayfs: {results['cowblock_over_overlayfs']} (target <= 1.5; "
              f"by round {results['round_ratios']})"
              + (f", cowblock / umoci: {results['cowblock_over_umoci']}" if args.umoci else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
