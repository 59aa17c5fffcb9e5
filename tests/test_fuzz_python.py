"""A short run of each atheris harness in fuzz/atheris/ (the NBD handshake,
the daemon's control socket): a bounded number of executions from the
committed seed corpus; it must end cleanly, with no crash file.  The long
runs are in fuzz/atheris/README.md."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESSES = {"handshake": 20000, "control": 10000}   # executions: ~7-14 s each here


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_fuzz_harness_short_run(tmp_path, name):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    cmd = [sys.executable, os.path.join(ROOT, "fuzz", "atheris", f"fuzz_{name}.py"),
           f"-runs={HARNESSES[name]}", "-max_total_time=25", "-timeout=60",
           f"-artifact_prefix={tmp_path}/", str(corpus)]
    env = dict(os.environ, COWBLOCK_FUZZ_TMPDIR=str(tmp_path))   # its pool goes there too
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    tail = "\n".join(r.stderr.splitlines()[-60:])
    crashes = [p.name for p in tmp_path.iterdir()
               if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))]
    assert r.returncode == 0 and not crashes, f"exit {r.returncode}, {crashes}:\n{tail}"
    assert "Done" in r.stderr, tail
