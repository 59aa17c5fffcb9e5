"""cowblock as containerd's snapshotter, side by side with containerd's own
overlayfs and native snapshotters, on one private containerd.

    python benchmarks/containerd.py [--only basic|fleet] [--runs 5] [--big 256M]
        [--containers 50] [--base /var/tmp/images-work/minbase.tar]
        [--dir /var/tmp] [--json out.json]

basic: the image is the end-to-end test's (busybox-static and a few files)
plus a layer holding one file of --big random bytes.  For each snapshotter,
in turn within each round (interleaved, so the machine's noise hits all
alike):
  import     `ctr image import` of the archive (then `image rm --sync`)
  run        `ctr run --rm IMAGE /bin/true`
  first_write  the time of a 4 KiB write (open, pwrite, close) into the big
             file of a running container's rootfs, made through the rootfs
             mount that containerd set up for it: overlayfs copies the whole
             file up first, a block device copies one block
Figures are medians over --runs rounds (import: over min(runs, 3)).

fleet: a base image whose one layer is --base (a rootfs tar such as
`mmdebstrap --variant=minbase bookworm minbase.tar` makes; without one, the
test's image), and a second image of the same layers plus one small layer.
For each snapshotter in turn, from the same state (neither image present):
  import_base    `ctr image import` of the base image
  import_second  `ctr image import` of the second one: only its small layer
                 is new; its space is what the snapshotter's storage grew by
  create         `ctr run -d` of --containers containers (/bin/sleep) from
                 the base image, one after the other; its space is the
                 storage's growth with all of them running
  remove         `ctr task rm -f` and `ctr container rm` of them all, until
                 containerd's snapshot list is back to what it was; its space
                 is what is left of the growth once the storage is settled
The storage is the pool's data in use for cowblock (`cowblock pool info
--json`), the bytes allocated under the snapshotter's directory for
overlayfs and native (`du`).  Both images are removed (`image rm --sync`)
before the next snapshotter.

--json merges the parts measured into the file (the others stay).
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

from containerd_lib import IMAGE, Containerd, make_image, sh, wait_for  # noqa: E402

from cowblock.sizes import format_size, parse_size  # noqa: E402

SNAPSHOTTERS = ("cowblock", "overlayfs", "native")
BASE_IMAGE = "cowblock.bench/base:v1"
SECOND_IMAGE = "cowblock.bench/second:v1"
MINBASE = "/var/tmp/images-work/minbase.tar"


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


def basic(c, archive, runs):
    """import, run and first_write medians per snapshotter."""
    figures = {s: {"import": [], "run": [], "first_write": []} for s in SNAPSHOTTERS}
    for r in range(runs):
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
        print(f"round {r + 1}/{runs} done", file=sys.stderr)
    c.ctr("image", "rm", "--sync", IMAGE, check=False)    # gone already if runs < 3
    return {s: {k: statistics.median(v) for k, v in f.items()} for s, f in figures.items()}


def make_pair(d, base_tar):
    """Two docker-archives: BASE_IMAGE, whose one layer is base_tar (or, with
    none, the test's image), and SECOND_IMAGE, the same layers plus a small
    one.  Returns (base archive, second archive, the small layer's size)."""
    if base_tar:
        oci = f"{d}/pair:base"
        sh("umoci", "init", "--layout", f"{d}/pair")
        sh("umoci", "new", "--image", oci)
        sh("umoci", "raw", "add-layer", "--image", oci, base_tar, timeout=600)
        sh("umoci", "config", "--image", oci, "--config.cmd", "/bin/sh")
    else:
        os.makedirs(f"{d}/test-image")
        make_image(f"{d}/test-image")
        oci = f"{d}/test-image/oci:v1"
    layer = f"{d}/small.tar"
    os.makedirs(f"{d}/small/opt/app")
    with open(f"{d}/small/opt/app/data", "wb") as f:
        f.write(os.urandom(256 << 10))
    with open(f"{d}/small/opt/app/run.sh", "w") as f:
        f.write("#!/bin/sh\necho second image\n")
    sh("tar", "-C", f"{d}/small", "-cf", layer, "opt")
    layout = oci.rsplit(":", 1)[0]
    sh("umoci", "raw", "add-layer", "--image", oci, "--tag", "second", layer)
    archives = (f"{d}/base.tar", f"{d}/second.tar")
    for ref, name, out in ((oci, BASE_IMAGE, archives[0]),
                           (f"{layout}:second", SECOND_IMAGE, archives[1])):
        sh("skopeo", "copy", "-q", f"oci:{ref}", f"docker-archive:{out}:{name}", timeout=600)
    return archives[0], archives[1], os.path.getsize(layer)


def storage(c, snap, pool):
    """Bytes the snapshotter's storage takes: the pool's data in use for
    cowblock, the bytes allocated under the snapshotter's directory for the
    others."""
    if snap == "cowblock":
        info = json.loads(sh("cowblock", "--pool", pool, "pool", "info", "--json").stdout)
        return info["data_used"]
    out = sh("du", "-s", "--block-size=1", f"{c.d}/root/io.containerd.snapshotter.v1.{snap}",
             timeout=600).stdout
    return int(out.split()[0])


def settled(c, snap, pool, seconds=60):
    """storage() once it has stopped changing (cowblock reclaims removed
    devices' blocks in the background)."""
    last, end = storage(c, snap, pool), time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(1)
        now = storage(c, snap, pool)
        if now == last:
            break
        last = now
    return last


def snapshot_count(c, snap):
    return len(c.ctr("snapshots", "--snapshotter", snap, "ls").stdout.splitlines())


def fleet(c, pool, base, second, containers):
    """import_base, import_second, create and remove of --containers, per
    snapshotter: seconds and bytes of storage growth."""
    result = {}
    for snap in SNAPSHOTTERS:
        f = result[snap] = {}
        f["import_base_s"] = timed(lambda: c.ctr("image", "import", "--snapshotter", snap, base,
                                                 timeout=600))
        before = settled(c, snap, pool)
        f["import_second_s"] = timed(lambda: c.ctr("image", "import", "--snapshotter", snap,
                                                   second, timeout=600))
        f["import_second_bytes"] = settled(c, snap, pool) - before
        before, count = settled(c, snap, pool), snapshot_count(c, snap)
        names = [f"fleet-{snap}-{i}" for i in range(containers)]
        f["create_s"] = timed(lambda: [c.ctr("run", "-d", "--snapshotter", snap, BASE_IMAGE, n,
                                             "/bin/sleep", "600") for n in names])
        # what the containers' filesystems hold in the page cache counts too
        sh("sync", "-f", *(f"{c.d}/state/io.containerd.runtime.v2.task/default/{n}/rootfs"
                           for n in names))
        f["create_bytes"] = storage(c, snap, pool) - before

        def remove():
            for n in names:
                c.ctr("task", "rm", "-f", n)
                c.ctr("container", "rm", n)
            wait_for(lambda: snapshot_count(c, snap) == count, seconds=120,
                     what=f"{snap}'s snapshots to go")
        f["remove_s"] = timed(remove)
        f["remove_left_bytes"] = settled(c, snap, pool) - before
        c.ctr("image", "rm", "--sync", BASE_IMAGE, SECOND_IMAGE)
        print(f"fleet: {snap} done", file=sys.stderr)
    return result


def print_basic(m, big, runs):
    print(f"image with a {format_size(big)} file; medians of {runs} rounds (import: "
          f"{min(runs, 3)})")
    print(f"{'':12}{'import s':>10}{'run s':>10}{'first 4K write ms':>20}")
    for s in SNAPSHOTTERS:
        print(f"{s:12}{m[s]['import']:10.3f}{m[s]['run']:10.3f}{m[s]['first_write'] * 1e3:20.3f}")
    ov = m["overlayfs"]
    print(f"cowblock / overlayfs: import {m['cowblock']['import'] / ov['import']:.2f}x, run "
          f"{m['cowblock']['run'] / ov['run']:.2f}x; first write {ov['first_write'] / m['cowblock']['first_write']:.0f}x faster")


def print_fleet(r):
    print(f"base image: {r['base']}; second image: one more {format_size(r['small_layer'])} "
          f"layer; {r['containers']} containers")
    print(f"{'':12}{'import base s':>14}{'second s':>10}{'second +':>10}{'create s':>10}"
          f"{'create +':>10}{'remove s':>10}{'left':>10}")
    for s in SNAPSHOTTERS:
        f = r[s]
        print(f"{s:12}{f['import_base_s']:14.2f}{f['import_second_s']:10.2f}"
              f"{format_size(max(0, f['import_second_bytes'])):>10}{f['create_s']:10.2f}"
              f"{format_size(max(0, f['create_bytes'])):>10}{f['remove_s']:10.2f}"
              f"{format_size(max(0, f['remove_left_bytes'])):>10}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("basic", "fleet"), help="measure one part (default both)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--big", default="256M", help="size of the image's big file")
    ap.add_argument("--containers", type=int, default=50)
    ap.add_argument("--base", default=MINBASE if os.path.exists(MINBASE) else None,
                    help="a rootfs tar: the base image's layer (default: %(default)s)")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--json")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="cowblock-ctrd-bench-", dir=args.dir)
    big = parse_size(args.big)
    parts = [args.only] if args.only else ["basic", "fleet"]
    if "basic" in parts:
        archive, _ = make_image(d, big=big)
    if "fleet" in parts:
        base, second, small = make_pair(d, args.base)
    pool, sock = f"{d}/pool", f"{d}/snap.sock"
    sh("cowblock", "--pool", pool, "pool", "create", "--size", str(4 * big + (4 << 30)))
    sh("cowblock", "--pool", pool, "snapshotter", "--socket", sock,
       "--default-size", str(max(1 << 30, 2 * big)))
    c = Containerd(d, sock)
    c.start()
    result = {}
    try:
        if "basic" in parts:
            result.update(big_file=big, runs=args.runs, median_seconds=basic(c, archive, args.runs))
        if "fleet" in parts:
            result["fleet"] = dict(base=os.path.basename(args.base) if args.base else "test image",
                                   base_bytes=os.path.getsize(args.base) if args.base else None,
                                   small_layer=small, containers=args.containers,
                                   **fleet(c, pool, base, second, args.containers))
    finally:
        c.stop()
        c.reap_shims()
        sh("cowblock", "--pool", pool, "daemon", "stop", "--force", check=False)
    if "basic" in parts:
        print_basic(result["median_seconds"], big, args.runs)
    if "fleet" in parts:
        print_fleet(result["fleet"])
    if args.json:
        old = {}
        if os.path.exists(args.json):
            with open(args.json) as f:
                old = json.load(f)
        with open(args.json, "w") as f:
            json.dump({**old, **result}, f, indent=1)
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
