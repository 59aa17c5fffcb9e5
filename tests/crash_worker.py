"""Runs the crash workload on a pool until killed (see crashlib.py).

    python crash_worker.py POOL SEED N_OPS LOG
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cowblock import Pool  # noqa: E402
from crashlib import generate, run_op  # noqa: E402


def main():
    pool_dir, seed, n_ops, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pool = Pool.open(pool_dir, commit_interval=0)
    for i, op in enumerate(generate(seed, n_ops)):
        os.write(fd, f"S {i}\n".encode())
        if run_op(pool, op):
            os.write(fd, f"C {i} {pool.stats().transaction_id}\n".encode())
    pool.commit()
    os.write(fd, f"C {n_ops - 1} {pool.stats().transaction_id}\n".encode())
    pool.close()


if __name__ == "__main__":
    main()
