"""cowblock as containerd's snapshotter, side by side with containerd's own
overlayfs and native snapshotters, on one private containerd.

    python benchmarks/containerd.py [--runs 5] [--big 256M] [--dir /var/tmp] [--json out.json]

The image is the end-to-end test's (busybox-static and a few files) plus a
layer holding one file of --big random bytes.  For each snapshotter, in
turn within each round (interleaved, so the machine's noise hits all
alike):
  import     `ctr image import` of the archive (then `image rm --sync`)
  run        `ctr run --rm IMAGE /bin/true`
  first_write  the time of a 4 KiB write (open, pwrite, close) into the big
             file of a running container's rootfs, made through the rootfs
             mount that containerd set up for it: overlayfs copies the whole
             file up first, a block device copies one block
Figures are medians over --runs rounds (import: over min(runs, 3)).
Nothing here asserts a timing.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from containerd_lib import IMAGE, Containerd, make_image, sh  # noqa: E402

from cowblock.sizes import format_size, parse_size  # noqa: E402

SNAPSHOTTERS = ("cowblock", "overlayfs", "native")
def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def first_write(c, snap, name):
    c.ctr("run", "-d", "--snapshotter", snap, IMAGE, name, "/bin/sleep", "600")
    try:
        path = f"{c.d}/state/io.containerd.runtime.v2.task/default/{name}/rootfs/big"
        t = time.perf_counter()
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, b"w" * 4096, 4096 * 1000)
        os.close(fd)
        return time.perf_counter() - t
    finally:
        c.ctr("task", "kill", "-s", "SIGKILL", name)
        for _ in range(100):
            if c.ctr("task", "rm", name, check=False).returncode == 0:
                break
            time.sleep(0.05)
        c.ctr("container", "rm", name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--big", default="256M", help="size of the image's big file")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--json")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="cowblock-ctrd-bench-", dir=args.dir)
    big = parse_size(args.big)
    archive, _ = make_image(d, big=big)
    pool, sock = f"{d}/pool", f"{d}/snap.sock"
    sh("cowblock", "--pool", pool, "pool", "create", "--size", str(4 * big + (4 << 30)))
    sh("cowblock", "--pool", pool, "snapshotter", "--socket", sock,
       "--default-size", str(max(1 << 30, 2 * big)))
    c = Containerd(d, sock)
    c.start()
    figures = {s: {"import": [], "run": [], "first_write": []} for s in SNAPSHOTTERS}
    try:
        for r in range(args.runs):
            for snap in SNAPSHOTTERS:
                f = figures[snap]
                t = timed(lambda: c.ctr("image", "import", "--snapshotter", snap, archive))
                if r < 3:
                    f["import"].append(t)
                f["run"].append(timed(lambda: c.ctr("run", "--rm", "--snapshotter", snap, IMAGE,
                                                    f"b-{snap}-{r}", "/bin/true")))
                f["first_write"].append(first_write(c, snap, f"w-{snap}-{r}"))
                if r < 2:
                    c.ctr("image", "rm", "--sync", IMAGE)
            print(f"round {r + 1}/{args.runs} done", file=sys.stderr)
    finally:
        c.stop()
        sh("cowblock", "--pool", pool, "daemon", "stop", "--force", check=False)
    result = {"big_file": big, "runs": args.runs,
              "median_seconds": {s: {k: statistics.median(v) for k, v in f.items()}
                                 for s, f in figures.items()}}
    m = result["median_seconds"]
    print(f"image with a {format_size(big)} file; medians of {args.runs} rounds (import: "
          f"{min(args.runs, 3)})")
    print(f"{'':12}{'import s':>10}{'run s':>10}{'first 4K write ms':>20}")
    for s in SNAPSHOTTERS:
        print(f"{s:12}{m[s]['import']:10.3f}{m[s]['run']:10.3f}{m[s]['first_write'] * 1e3:20.3f}")
    ov = m["overlayfs"]
    print(f"cowblock / overlayfs: import {m['cowblock']['import'] / ov['import']:.2f}x, run "
          f"{m['cowblock']['run'] / ov['run']:.2f}x; first write {ov['first_write'] / m['cowblock']['first_write']:.0f}x faster")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
