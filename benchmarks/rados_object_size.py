"""Which RADOS object size for a pool's data: 4 KiB random writes and reads
at QD16 and 1 MiB sequential writes and reads, into objects of 64 KiB to
4 MiB, over the same image size (python3-rados, asynchronous, side by side).

    CEPH_CONF=... /usr/bin/python3 benchmarks/rados_object_size.py [--mib 256] [--seconds 5] [--json F]
"""
import argparse
import json
import random
import threading
import time

import rados


def run(io, names, obj, image, ops, size, seconds, qd=16):
    sem = threading.Semaphore(qd)
    done = [0]
    rng = random.Random(1)
    buf = b"\x5a" * size
    end = time.monotonic() + seconds
    pos = 0
    start = time.monotonic()

    def cb(_c, *_a):
        sem.release()
    while time.monotonic() < end:
        if ops.startswith("rand"):
            off = rng.randrange(image // size) * size
        else:
            off = pos
            pos = (pos + size) % image
        # one request per object the range touches, as the engine splits them
        for piece in range(off, off + size, min(size, obj)):
            sem.acquire()
            name, at, n = names(piece // obj), piece % obj, min(size, obj)
            if ops.endswith("write"):
                io.aio_write(name, buf[:n], at, oncomplete=cb)
            else:
                io.aio_read(name, n, at, oncomplete=cb)
        done[0] += 1
    for _ in range(qd):
        sem.acquire()
    return done[0] / (time.monotonic() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--pool", default="cowblock")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    cluster = rados.Rados(conffile="")
    cluster.connect(timeout=10)
    io = cluster.open_ioctx(args.pool)
    image = args.mib << 20
    results = {}
    for obj in (64 << 10, 256 << 10, 1 << 20, 4 << 20):
        prefix = f"objsize-bench-{obj}"
        names = lambda i, p=prefix: f"{p}.{i:016x}"  # noqa: E731
        # fill the image first, so reads read data and writes overwrite
        fill = b"\x01" * min(obj, 4 << 20)
        comps = [io.aio_write_full(names(i), fill) for i in range(image // obj)]
        for c in comps:
            c.wait_for_complete()
        row = {}
        for ops, size in (("randwrite", 4096), ("randread", 4096), ("seqwrite", 1 << 20),
                          ("seqread", 1 << 20)):
            rate = run(io, names, obj, image, ops, size, args.seconds)
            row[ops] = round(rate) if size == 4096 else round(rate * size / 1e6)
        results[obj] = row
        print(f"object {obj >> 10:5d} KiB: 4K randwrite {row['randwrite']} IOPS, randread "
              f"{row['randread']} IOPS, 1M seqwrite {row['seqwrite']} MB/s, seqread "
              f"{row['seqread']} MB/s", flush=True)
        for i in range(image // obj):
            io.remove_object(names(i))
    print(json.dumps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"image_mib": args.mib, "seconds": args.seconds, "qd": 16,
                       "units": "4K: IOPS, 1M: MB/s", "by_object_size": results}, f, indent=1)


if __name__ == "__main__":
    main()
