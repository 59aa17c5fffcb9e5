"""cowblock on RADOS through its NBD server against RBD, same cluster, side
by side (fio; memstore OSD of tools/ceph-cluster.sh unless CEPH_CONF names
another cluster):

  cowblock-rados   `cowblock --pool rados:POOL/NAME serve`, fio's nbd engine
  rbd-qemu-nbd     `qemu-nbd` on an rbd: image, fio's nbd engine (same transport)
  rbd-fio          fio's rbd engine (librbd in fio's process)
  cowblock-local   a local pool in --dir, fio's nbd engine (for scale)

On each image: 4 KiB random writes into a fresh image (first writes: a CoW
allocation for cowblock, an object creation for RBD), a 1 MiB sequential
fill, then 4 KiB random overwrites and reads at QD16 and 1 MiB sequential
writes.  Rounds interleave the targets.

  CEPH_CONF=... python benchmarks/rados_nbd.py [--runs 1] [--seconds 4] [--json F]
      [--targets cowblock-rados,rbd-qemu-nbd] [--jobs fill_1m,seqwrite_1m]
      [--other /path/to/older/venv/bin/cowblock]
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from nbd_compare import wait_for

MiB = 1 << 20
IMAGE = 256 * MiB
JOBS = [("first_write_4k", "randwrite", "4k", True), ("fill_1m", "write", "1M", False),
        ("overwrite_4k", "randwrite", "4k", True), ("randread_4k", "randread", "4k", True),
        ("seqwrite_1m", "write", "1M", True)]


def fio(target_args, rw, bs, seconds, timed, size=IMAGE):
    cmd = ["fio", "--name=b", "--output-format=json", f"--rw={rw}", f"--bs={bs}",
           f"--size={size}", "--iodepth=16", "--randrepeat=0", *target_args]
    if timed:
        cmd += ["--time_based", f"--runtime={seconds}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return side["iops"] if bs == "4k" else side["bw_bytes"] / 1e6


def nbd_args(sock, export=""):
    return ["--ioengine=nbd", f"--uri=nbd+unix:///{export}?socket={sock}"]


def rbd_fio_args(ceph_pool, image):
    """fio's rbd engine: librbd in fio's process, with librbd's own defaults."""
    return ["--ioengine=rbd", f"--pool={ceph_pool}", f"--rbdname={image}", "--clientname=admin"]


def serve(pool, devices, sock, command="cowblock", env=None):
    """`cowblock serve` of devices on sock (the pool's daemon started for it)."""
    proc = subprocess.Popen([command, "--pool", pool, "serve", "--socket", sock, *devices],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wait_for(sock, proc, "cowblock serve")
    return proc


def qemu_nbd(ceph_pool, image, sock):
    """qemu-nbd on the rbd: image, --cache none: no librbd cache (qemu sets
    rbd_cache=false for --cache none; the spec says it outright)."""
    spec = f"rbd:{ceph_pool}/{image}:conf={os.environ['CEPH_CONF']}:rbd_cache=false"
    proc = subprocess.Popen(["qemu-nbd", "--socket", sock, "--format", "raw", "--cache", "none",
                             "--aio", "threads", "--shared", "4", "--persistent", spec],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(sock, proc, "qemu-nbd")
    return proc


def stop(proc):
    proc.terminate()
    proc.wait(timeout=60)


def osd_objectstore():
    """The OSD type of the cluster $CEPH_CONF names (None if it does not say)."""
    with open(os.environ["CEPH_CONF"]) as f:
        m = re.search(r"osd_objectstore\s*=\s*(\w+)", f.read())
    return m.group(1) if m else None


class CowblockTarget:
    def __init__(self, name, pool, tmp, command="cowblock"):
        self.name, self.pool, self.tmp, self.command = name, pool, tmp, command

    def start(self):
        image = f"v{uuid.uuid4().hex[:6]}"
        subprocess.run([self.command, "--pool", self.pool, "create", image, "--size", str(IMAGE)],
                       check=True, capture_output=True)
        self.sock = os.path.join(self.tmp, f"{image}.sock")
        self.proc = serve(self.pool, [image], self.sock, self.command)
        return nbd_args(self.sock, image)

    def stop(self):
        stop(self.proc)


class RbdTarget:
    def __init__(self, name, ceph_pool, tmp, via_nbd):
        self.name, self.ceph_pool, self.tmp, self.via_nbd = name, ceph_pool, tmp, via_nbd

    def start(self):
        self.image = f"bench-{uuid.uuid4().hex[:6]}"
        subprocess.run(["timeout", "60", "rbd", "create", f"{self.ceph_pool}/{self.image}",
                        "--size", f"{IMAGE // MiB}M"], check=True, capture_output=True)
        if not self.via_nbd:
            return rbd_fio_args(self.ceph_pool, self.image)
        self.sock = os.path.join(self.tmp, f"{self.image}.sock")
        self.proc = qemu_nbd(self.ceph_pool, self.image, self.sock)
        return nbd_args(self.sock)

    def stop(self):
        if self.via_nbd:
            stop(self.proc)
        subprocess.run(["timeout", "120", "rbd", "rm", f"{self.ceph_pool}/{self.image}"],
                       capture_output=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--ceph-pool", default="cowblock")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="for the local pool")
    ap.add_argument("--targets", help="comma-separated names to run (default: all)")
    ap.add_argument("--jobs", help="comma-separated job names to run (default: all)")
    ap.add_argument("--other", metavar="COWBLOCK",
                    help="another build's cowblock command, run as target cowblock-rados-other "
                         "on the same RADOS pool (a before/after comparison)")
    ap.add_argument("--json")
    args = ap.parse_args()
    jobs = [j for j in JOBS if not args.jobs or j[0] in args.jobs.split(",")]
    if not os.environ.get("CEPH_CONF"):
        sys.exit("set CEPH_CONF to the cluster's ceph.conf (tools/ceph-cluster.sh start DIR)")
    tmp = tempfile.mkdtemp(prefix="cb-rados-bench-", dir=args.dir)
    rados_pool = f"rados:{args.ceph_pool}/bench-{uuid.uuid4().hex[:6]}"
    local_pool = os.path.join(tmp, "local-pool")
    for pool in (rados_pool, local_pool):
        subprocess.run(["cowblock", "--pool", pool, "pool", "create", "--size", "4G",
                        "--block-size", "64K"], check=True, capture_output=True)
    targets = [CowblockTarget("cowblock-rados", rados_pool, tmp),
               RbdTarget("rbd-qemu-nbd", args.ceph_pool, tmp, via_nbd=True),
               RbdTarget("rbd-fio", args.ceph_pool, tmp, via_nbd=False),
               CowblockTarget("cowblock-local", local_pool, tmp)]
    if args.other:
        targets.insert(1, CowblockTarget("cowblock-rados-other", rados_pool, tmp, args.other))
    if shutil.which("qemu-nbd") is None:
        targets = [t for t in targets if t.name != "rbd-qemu-nbd"]
    if args.targets:
        targets = [t for t in targets if t.name in args.targets.split(",")]
    rounds = {t.name: {job[0]: [] for job in jobs} for t in targets}
    try:
        for _ in range(args.runs):
            for t in targets:
                fio_args = t.start()
                try:
                    for name, rw, bs, timed in jobs:
                        rounds[t.name][name].append(fio(fio_args, rw, bs, args.seconds, timed))
                finally:
                    t.stop()
    finally:
        from cowblock import rados
        try:
            rados.destroy(rados_pool)
        except Exception as e:   # a benchmark's leftovers: say so, go on
            print(f"could not remove {rados_pool}: {e}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    result = {t: {j: round(statistics.median(v)) for j, v in jobs.items()}
              for t, jobs in rounds.items()}
    units = "4k: IOPS, 1m: MB/s, QD16"
    print(units)
    print(f"{'':16}" + "".join(f"{j:>16}" for j, *_ in jobs))
    for t, row in result.items():
        print(f"{t:16}" + "".join(f"{row[j]:>16}" for j, *_ in jobs))
    if "rbd-qemu-nbd" in result and "cowblock-rados" in result:
        for j in ("overwrite_4k", "randread_4k", "seqwrite_1m"):
            if j not in result["cowblock-rados"]:
                continue
            print(f"{j}: cowblock-rados / rbd-qemu-nbd = "
                  f"{result['cowblock-rados'][j] / result['rbd-qemu-nbd'][j]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"units": units, "runs": args.runs, "seconds": args.seconds,
                       "image_bytes": IMAGE, "osd_objectstore": osd_objectstore(),
                       "results": result}, f, indent=1)


if __name__ == "__main__":
    main()
