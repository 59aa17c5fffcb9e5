"""Opening a pool on RADOS and reading it for the first time: how long the
open takes and how fast the first reads of its data run, for one or more
cowblock builds against the same pool, side by side, interleaved.

A pool holding --gib GiB of written data (one device, written in 4 MiB
pieces) is made once; then every round opens it in a fresh process per
build, from an empty cache directory, and times:

  open_s        Pool.open (lock, fetch, engine open)
  seq_1m_MBps   the first read of the whole device, 1 MiB at a time (QD1)
  seq_16m_MBps  the same with 16 MiB reads (one read's objects in flight at once)
  rand_4k_iops  first 4 KiB reads at random offsets, QD1 (before the sequential ones)
  cache_bytes   the cache's disk use after the open

  CEPH_CONF=... python benchmarks/rados_open.py [--gib 1] [--runs 2]
      [--build NAME=PYTHON ...] [--json F]

--build names another interpreter with another cowblock installed (say a
venv of an older commit): `--build before=/tmp/venv-before/bin/python`.
The script's own interpreter is always measured, as "this".
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid

MiB = 1 << 20

PROBE = r"""
import json, os, random, sys, time
from cowblock import Pool
loc, size, path = sys.argv[1], int(sys.argv[2]), os.environ["COWBLOCK_RADOS_CACHE"]
t = time.monotonic()
p = Pool.open(loc, commit_interval=0)
out = {"open_s": time.monotonic() - t}
du = 0
for root, _, files in os.walk(path):
    du += sum(os.stat(os.path.join(root, f)).st_blocks * 512 for f in files)
out["cache_bytes"] = du
d = p.device("d")
rng = random.Random(7)
t = time.monotonic()
n = 500
for _ in range(n):
    d.pread(4096, rng.randrange(size // 4096) * 4096)
out["rand_4k_iops"] = n / (time.monotonic() - t)
half = size // 2
for key, chunk, start in (("seq_1m_MBps", 1 << 20, 0), ("seq_16m_MBps", 16 << 20, half)):
    t = time.monotonic()
    for off in range(start, start + half, chunk):
        d.pread(chunk, off)
    out[key] = half / (time.monotonic() - t) / 1e6
p.close()
print(json.dumps(out))
"""


def probe(python, loc, size, tmp):
    cache = tempfile.mkdtemp(prefix="cache-", dir=tmp)
    out = subprocess.run([python, "-c", PROBE, loc, str(size)], capture_output=True, text=True,
                         timeout=600, cwd=tmp, env=dict(os.environ, COWBLOCK_RADOS_CACHE=cache))
    if out.returncode:
        sys.exit(f"{python}: {out.stderr.strip()[-2000:]}")
    subprocess.run(["rm", "-rf", cache])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--ceph-pool", default="cowblock")
    ap.add_argument("--build", action="append", default=[], metavar="NAME=PYTHON")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not os.environ.get("CEPH_CONF"):
        sys.exit("set CEPH_CONF to the cluster's ceph.conf (tools/ceph-cluster.sh start DIR)")
    builds = [tuple(b.split("=", 1)) for b in args.build] + [("this", sys.executable)]
    from cowblock import Pool, rados
    size = int(args.gib * 1024) * MiB
    tmp = tempfile.mkdtemp(prefix="cb-rados-open-")
    os.environ["COWBLOCK_RADOS_CACHE"] = os.path.join(tmp, "writer")
    loc = f"rados:{args.ceph_pool}/open-{uuid.uuid4().hex[:6]}"
    rounds = {name: [] for name, _ in builds}
    try:
        with Pool.create(loc, size + 256 * MiB, 65536, commit_interval=0) as p:
            d = p.create_thin("d", size)
            piece = os.urandom(4 * MiB)
            for off in range(0, size, len(piece)):
                d.pwrite(piece, off)
        for _ in range(args.runs):
            for name, python in builds:
                rounds[name].append(probe(python, loc, size, tmp))
    finally:
        try:
            rados.destroy(loc)
        except Exception as e:   # a benchmark's leftovers: say so, go on
            print(f"could not remove {loc}: {e}", file=sys.stderr)
        subprocess.run(["rm", "-rf", tmp])
    keys = ("open_s", "rand_4k_iops", "seq_1m_MBps", "seq_16m_MBps", "cache_bytes")
    result = {name: {k: statistics.median(r[k] for r in runs) for k in keys}
              for name, runs in rounds.items()}
    print(f"pool of {args.gib:g} GiB written, 64 KiB blocks; medians of {args.runs} runs")
    print(f"{'':8}" + "".join(f"{k:>15}" for k in keys))
    for name, row in result.items():
        print(f"{name:8}" + "".join(f"{row[k]:>15.3f}" if k == "open_s" else f"{row[k]:>15.0f}"
                                    for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gib": args.gib, "runs": args.runs, "block_size": 65536,
                       "results": result, "all": rounds}, f, indent=1)


if __name__ == "__main__":
    main()
