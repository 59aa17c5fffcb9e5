"""A short tour of the engine: a pool, a base image, snapshots, CoW, diff, check.

    python examples/demo.py [POOL_DIR]
"""
import os
import sys
import tempfile
import time

from cowblock import Pool

MiB = 1 << 20


def main():
    where = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "pool")
    with Pool.create(where, 1 << 30, 65536) as pool:
        print(f"pool at {where}: {pool.stats().data_blocks} blocks of 64 KiB (sparse data file)")
        base = pool.create_thin("base", 256 * MiB)
        chunk = os.urandom(MiB)
        for off in range(0, 64 * MiB, MiB):
            base.pwrite(chunk, off)
        print("wrote 64 MiB into 'base'; blocks used:", pool.stats().data_used)
        pool.commit()  # make it durable first, so the snapshot below times only itself

        t = time.perf_counter()
        pool.snapshot("base", "layer1", read_only=True)
        print(f"read-only snapshot 'layer1' in {(time.perf_counter() - t) * 1e3:.2f} ms "
              "(shares every block; no copy)")
        c1 = pool.snapshot("layer1", "container1")
        c1.pwrite(b"hello from container1", 4096 + 7)      # unaligned: one 64 KiB block copied
        c1.discard(32 * MiB, 8 * MiB)                          # unmaps 128 blocks
        print("container1 reads:", c1.pread(21, 4096 + 7), "| layer1 still reads:",
              pool.device("layer1").pread(5, 4096 + 7))
        for info in pool.list():
            u = pool.usage(info.name)
            print(f"  {info.name:11} origin={str(info.origin):7} ro={info.read_only!s:5} "
                  f"mapped={info.mapped_bytes // MiB:3} MiB exclusive={u.exclusive_bytes // 1024:5} KiB "
                  f"shared={u.shared_bytes // MiB} MiB")
        print("diff layer1 -> container1:", [(r.kind, r.begin, r.length)
                                             for r in pool.diff("layer1", "container1")])
        with c1.open() as f:  # a standard file object
            f.seek(4096 + 7)
            print("via io.RawIOBase:", f.read(5))
        print(pool.check())
        print("transaction id:", pool.commit())


if __name__ == "__main__":
    main()
