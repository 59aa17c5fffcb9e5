"""The records crash tests have teeth: with atomic sections that no longer
hold commits off (txn_turn lets every commit run at once), a power cut
between a device's commit and its record's leaves the two disagreeing, and
tests/test_records_crash.py says so.

The mutant is the C core rebuilt from a copy of csrc/, loaded in a
subprocess in place of the real extension (as tests/test_fsync_mutation.py
does for the commit's fsyncs).
"""
import os
import subprocess
import sys

from corebuild import TESTS, build_core_copy, loaded_core

TURN = "enum txn_turn txn_turn(cb_pool *p)\n{\n"


def sections_that_hold_nothing(src):
    path = os.path.join(src, "txn.c")
    text = open(path).read()
    assert TURN in text
    open(path, "w").write(text.replace(TURN, TURN + "    if (p) return TXN_NOW; /* mutant */\n"))


def test_power_cut_test_fails_when_sections_do_not_hold_commits(tmp_path):
    build_core_copy(str(tmp_path), sections_that_hold_nothing)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          f"--basetemp={tmp_path / 'mutant-run'}",
                          os.path.join(TESTS, "test_records_crash.py"), "-k",
                          "power_cut_at_every_io_keeps and drop-all"],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    core = loaded_core(str(tmp_path), env)
    assert core.startswith(str(tmp_path)), f"the mutant was not loaded: {core}"
    assert run.returncode == 1 and "without their record" in run.stdout, \
        f"the power-cut test passed with sections that hold nothing:\n{run.stdout[-2000:]}"
