"""Crash safety through the NBD server: SIGKILL `cowblock serve` under a
client and check that every write covered by a completed FLUSH or FUA (or a
snapshot, delete, create or commit that returned) survived, and nothing
else appeared (see crash_nbd_lib.py for the model).

COWBLOCK_NBD_CRASH_ITERATIONS sets how many kills (CI a few dozen seconds'
worth; `make torture` thousands); COWBLOCK_NBD_CRASH_SEED replays a run.
"""
import collections
import os
import random
import shutil
import time

from crash_nbd_lib import run_iteration

KILLS = int(os.environ.get("COWBLOCK_NBD_CRASH_ITERATIONS", "14"))
SEED = int(os.environ.get("COWBLOCK_NBD_CRASH_SEED", "4321"))
REPLAY = os.environ.get("COWBLOCK_NBD_CRASH_REPLAY")  # one iteration's seed, run KILLS times


def test_sigkill_nbd_server_at_random_moments(tmp_path):
    rng = random.Random(SEED)
    stats = collections.Counter()
    start = time.monotonic()
    for it in range(KILLS):
        seed = int(REPLAY) if REPLAY else rng.randrange(1 << 30)
        try:
            line = run_iteration(tmp_path, it, seed, stats)
        except AssertionError as e:
            raise AssertionError(
                f"iteration {it}, seed {seed} (replay its workload with COWBLOCK_NBD_CRASH_REPLAY="
                f"{seed}, the run with COWBLOCK_NBD_CRASH_SEED={SEED}; the kill moment is "
                f"seeded but timing is not): {e}") from None
        if REPLAY:
            print(f"iteration {it}: {line}")
        if it % 100 == 99 or KILLS > 100 and it == KILLS - 1:
            print(f"{it + 1} kills, {time.monotonic() - start:.0f} s", flush=True)
        shutil.rmtree(tmp_path / f"p{it}")  # keep the disk use flat on long runs
        os.unlink(tmp_path / f"serve{it}.log")
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(stats.items()))
    print(f"\nNBD crash torture: {KILLS} kills in {time.monotonic() - start:.1f} s; {summary}")
    assert stats["got going"] >= KILLS * 3 // 4, f"the workload rarely got going: {summary}"
