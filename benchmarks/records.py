"""What the records store costs: a put and a get, a listing, and a commit or
an open of a pool that holds 10,000 records against one that holds none.

    python benchmarks/records.py [--runs 5] [--records 10000] [--dir /var/tmp] [--json out.json]

Every figure is the median of --runs rounds; the two sides of a ratio run
back to back in each round (interleaved), both pools in the same state but
for the records, so that a shared machine's noise hits both alike.  SQLite
(WAL, synchronous=FULL, one row per commit; the Python standard library's)
runs beside the durable put and the get as a well-known reference for a
small durable key-value write on the same disk.  Nothing here asserts a
timing.  get_cold is the first read of each record after a commit (its
blocks verified, their pages mapped); get reads them again.
"""
import argparse
import json
import os
import shutil
import sqlite3
import statistics
import tempfile
import time

from cowblock import Pool
from cowblock._native import ffi, lib

BS = 4096
KEY = "default/{i}/snapshot {i}"


def median(xs):
    return statistics.median(xs)


def per_op_us(fn, n):
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t) / n * 1e6


def make_pool(path, records, value_size):
    pool = Pool.create(path, 4096 * BS, BS, metadata_size=1 << 30, commit_interval=0)
    pool.create_thin("dev", 1024 * BS)
    value = os.urandom(value_size)
    with pool.atomic():
        for i in range(records):
            pool.put_record(KEY.format(i=i), value)
    return pool


def sqlite_db(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB)")
    return db


def round_of(root, r, n, records):
    out = {}
    for size in (100, 10_000):
        value = os.urandom(size)
        pool = make_pool(os.path.join(root, f"p{r}-{size}"), records, size)
        db = sqlite_db(os.path.join(root, f"s{r}-{size}.db"))
        with db:
            db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)",
                           [(KEY.format(i=i).encode(), value) for i in range(records)])
        out[f"put_durable_{size}B_us"] = per_op_us(
            lambda i: pool.put_record(f"new/{i}", value), n)
        out[f"sqlite_put_durable_{size}B_us"] = per_op_us(
            lambda i: db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)",
                                 (f"new/{i}".encode(), value)), n)
        with pool.atomic(commit=False):
            out[f"put_in_section_{size}B_us"] = per_op_us(
                lambda i: pool.put_record(f"sec/{i}", value), 10 * n)
        t = time.perf_counter()
        pool.commit()
        out[f"commit_of_{10 * n}_puts_ms"] = (time.perf_counter() - t) * 1e3
        keys = [KEY.format(i=(i * 7919) % records) for i in range(10 * n)]
        out[f"get_cold_{size}B_us"] = per_op_us(lambda i: pool.get_record(keys[i]), 10 * n)
        out[f"get_{size}B_us"] = per_op_us(lambda i: pool.get_record(keys[i]), 10 * n)
        out[f"sqlite_get_{size}B_us"] = per_op_us(
            lambda i: db.execute("SELECT v FROM kv WHERE k = ?",
                                 (keys[i].encode(),)).fetchone(), 10 * n)
        # The C calls alone (what a caller in C pays, without Python's wrapper).
        h, ckeys = pool._h, [k.encode() for k in keys]
        out_value, out_len = ffi.new("uint8_t **"), ffi.new("uint32_t *")

        def c_get(i):
            lib.cb_rec_get(h, ckeys[i], len(ckeys[i]), out_value, out_len)
            lib.cb_free(out_value[0])
        out[f"c_get_{size}B_us"] = per_op_us(c_get, 10 * n)
        lib.cb_pool_txn_begin(h)
        cnew = [f"c/{i}".encode() for i in range(10 * n)]
        out[f"c_put_in_section_{size}B_us"] = per_op_us(
            lambda i: lib.cb_rec_put(h, cnew[i], len(cnew[i]), value, len(value)), 10 * n)
        lib.cb_pool_txn_end(h, lib.CB_TXN_COMMIT)
        t = time.perf_counter()
        listed = sum(1 for _ in pool.records())
        out[f"list_{size}B_us_per_record"] = (time.perf_counter() - t) / listed * 1e6
        pool.close()
        db.close()
    # A commit of one data write, and an open, with 10,000 records or none:
    # the two pools side by side, one commit (one open) of each in turn.
    pools = {"with": make_pool(os.path.join(root, f"c{r}-with"), records, 100),
             "without": make_pool(os.path.join(root, f"c{r}-without"), 0, 100)}
    times = {side: [] for side in pools}
    blocks = {side: [] for side in pools}
    for i in range(n):
        for side, pool in pools.items():
            pool.device("dev").pwrite(b"x" * BS, (i % 1024) * BS)
            written = pool._counters()[0]
            t = time.perf_counter()
            pool.commit()
            times[side].append(time.perf_counter() - t)
            blocks[side].append(pool._counters()[0] - written)
    opens = {side: [] for side in pools}
    paths = {side: pool.path for side, pool in pools.items()}
    for pool in pools.values():
        pool.close()
    for _ in range(10):
        for side, path in paths.items():
            t = time.perf_counter()
            Pool.open(path, commit_interval=0).close()
            opens[side].append(time.perf_counter() - t)
    out["commit_with_records_ms"] = median(times["with"]) * 1e3
    out["commit_without_records_ms"] = median(times["without"]) * 1e3
    out["commit_ratio"] = median([a / b for a, b in zip(times["with"], times["without"])])
    out["commit_blocks_with_records"] = median(blocks["with"])
    out["commit_blocks_without_records"] = median(blocks["without"])
    out["open_with_records_ms"] = median(opens["with"]) * 1e3
    out["open_without_records_ms"] = median(opens["without"]) * 1e3
    out["open_ratio"] = median([a / b for a, b in zip(opens["with"], opens["without"])])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--ops", type=int, default=200, help="durable puts and commits per round")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a new one in /var/tmp)")
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="cowblock-records-bench-", dir="/var/tmp")
    try:
        rounds = []
        for r in range(args.runs):
            rounds.append(round_of(root, r, args.ops, args.records))
            for name in os.listdir(root):
                path = os.path.join(root, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        figures = {k: median([x[k] for x in rounds]) for k in rounds[0]}
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    for k, v in figures.items():
        print(f"{k:40s} {v:12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"records": args.records, "runs": args.runs, "figures": figures}, f, indent=1)


if __name__ == "__main__":
    main()
