"""Runs the records workload (records_crashlib.py) on a pool until killed, with
a busy periodic committer and background reclaims, as a daemon would (its
explicit reclaims become commits: the background reclaimer does them).

    python records_crash_worker.py POOL SEED N_OPS LOG
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cowblock import Pool  # noqa: E402
from records_crashlib import generate, run_op  # noqa: E402


def main():
    pool_dir, seed, n_ops, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pool = Pool.open(pool_dir, commit_interval=0.005)
    for i, op in enumerate(generate(seed, n_ops)):
        op = ("commit",) if op == ("reclaim",) else op
        os.write(fd, f"S {i}\n".encode())
        if run_op(pool, op):
            os.write(fd, f"C {i}\n".encode())
    pool.close()


if __name__ == "__main__":
    main()
