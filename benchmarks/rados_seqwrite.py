"""Why 1 MiB sequential writes into a RADOS pool can run at half of RBD's:
block placement.  A device's blocks sit in the data file in the order they
were allocated, one at a time, so after random first writes or a fill by
concurrent writers a virtual MiB is 16 blocks in up to 16 RADOS objects, and a 1 MiB overwrite in place becomes 16
writes of 64 KiB (RBD: one write into one object).  This measures 1 MiB
writes (in-process) into a device: a fill (first writes) by one thread
(in-order) or by 16 (qd16-fill, random-first: after random 4 KiB first
writes), then overwrites by 16 threads, with the RADOS writes sent per MiB
(cb_remote_requests, the commit's metadata included).  Since scattered
whole-block writes are redirected to a contiguous run (csrc/dataio.c), the
last kind costs one write a MiB too.

  CEPH_CONF=... python benchmarks/rados_seqwrite.py [--mib 128] [--json F]
"""
import argparse
import json
import os
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

MiB = 1 << 20


def run(layout, size):
    from cowblock import Pool, rados
    loc = f"rados:cowblock/seqwrite-{uuid.uuid4().hex[:6]}"
    try:
        with Pool.create(loc, 4 * size, 65536, commit_interval=0) as p:
            d = p.create_thin("d", size)
            if layout == "random-first":   # as rados_nbd.py's first_write_4k job leaves it
                rng = random.Random(1)
                for _ in range(size // 65536 * 2):
                    d.pwrite(b"r" * 4096, rng.randrange(size // 4096) * 4096)
            buf = os.urandom(MiB)
            out = {}
            # first writes (of what is left), then in place
            for job, threads in (("fill", 1 if layout == "in-order" else 16), ("overwrite", 16)):
                before = p._remote.requests()["writes"]
                t = time.monotonic()
                with ThreadPoolExecutor(threads) as ex:
                    list(ex.map(lambda off: d.pwrite(buf, off), range(0, size, MiB)))
                p.commit()
                seconds = time.monotonic() - t
                writes = p._remote.requests()["writes"] - before
                out[job] = {"MBps": round(size / seconds / 1e6),
                            "rados_writes_per_MiB": round(writes / (size / MiB), 1)}
        return out
    finally:
        rados.destroy(loc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ.setdefault("COWBLOCK_RADOS_CACHE", f"/tmp/cb-seqwrite-{os.getpid()}")
    result = {layout: run(layout, args.mib * MiB)
              for layout in ("in-order", "qd16-fill", "random-first")}
    for layout, jobs in result.items():
        for job, row in jobs.items():
            print(f"{layout:14} {job:10} {row['MBps']:>6} MB/s  {row['rados_writes_per_MiB']:>5} "
                  "RADOS writes a MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mib": args.mib, "block_size": 65536, "threads": 16, "results": result}, f,
                      indent=1)


if __name__ == "__main__":
    main()
