"""The power-cut test has teeth: with any one fsync of the commit path
removed, it fails.

Each mutant is the C core rebuilt from a copy of csrc/ in which one io_fsync
call of meta_commit() is replaced by "no error", loaded in a subprocess in
place of the real extension, and run against tests/test_crash.py's
power-cut test.
"""
import os
import re
import subprocess
import sys

import pytest

from corebuild import ROOT, TESTS, build_core_copy, loaded_core


def commit_fsyncs(source):
    start = source.index("int meta_commit(")
    end = source.index("\n}\n", start)
    return [m.start() for m in re.finditer(r"io_fsync\(", source[start:end])], start


def build_mutant(tmp, which):
    def drop_fsync(src):
        path = os.path.join(src, "meta.c")
        text = open(path).read()
        offsets, base = commit_fsyncs(text)
        at = base + offsets[which]
        end = text.index(")", at) + 1
        open(path, "w").write(text[:at] + "0" + text[end:])  # "r = io_fsync(f)" becomes "r = 0"

    build_core_copy(tmp, drop_fsync)


def test_commit_path_has_three_fsyncs():
    text = open(os.path.join(ROOT, "csrc", "meta.c")).read()
    assert len(commit_fsyncs(text)[0]) == 3


@pytest.mark.parametrize("which", [0, 1, 2], ids=["data", "metadata-blocks", "superblock"])
def test_power_cut_test_fails_without_fsync(tmp_path, which):
    build_mutant(str(tmp_path), which)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    # The mutant's run fails on purpose, so pytest keeps its temporaries: keep
    # them in this test's own directory, which goes when this test passes.
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          f"--basetemp={tmp_path / 'mutant-run'}",
                          os.path.join(TESTS, "test_crash.py"), "-k", "power_cut"],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    core = loaded_core(str(tmp_path), env)
    assert core.startswith(str(tmp_path)), f"the mutant was not loaded: {core}"
    assert run.returncode == 1 and "failed" in run.stdout, \
        f"the power-cut test passed without fsync #{which}:\n{run.stdout[-2000:]}"
