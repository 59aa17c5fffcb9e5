"""Pools and builds across the records store's format change (FORMAT.md §12):
the build from before it (built here from git) opens a pool whose store
holds records read-only only, and writes one whose store is empty; this
build opens a pool of the old one with an empty store."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from cowblock import Pool, format
from corebuild import ROOT

BS = 4096
pytestmark = pytest.mark.skipif(not shutil.which("gcc") or not shutil.which("git"),
                                reason="needs gcc and git")

OLD_BUILD = """
import json, sys
from cowblock import Pool, ReadOnlyError
path, action = sys.argv[1], sys.argv[2]
out = {}
if action == "write":
    try:
        with Pool.open(path, commit_interval=0) as pool:
            pool.create_thin("old-dev", 16 * 4096).pwrite(b"old", 0)
            out["wrote"] = True
            out["check_ok"] = pool.check().ok
    except ReadOnlyError as e:
        out["refused"] = str(e)
elif action == "read":
    with Pool.open(path, read_only=True) as pool:
        out["devices"] = sorted(d.name for d in pool.list())
        out["data"] = pool.device("a").pread(5, 0).decode()
        report = pool.check()
        out["leaks"] = report.leak_count
        out["errors"] = report.error_count
elif action == "create":
    with Pool.create(path, 256 * 4096, 4096, commit_interval=0) as pool:
        pool.create_thin("a", 16 * 4096).pwrite(b"from old", 0)
print(json.dumps(out))
"""


def revision_before_records():
    added = subprocess.run(["git", "-C", ROOT, "log", "--diff-filter=A", "--format=%H", "--",
                            "csrc/records.c"], capture_output=True, text=True)
    revs = added.stdout.split()
    if added.returncode or not revs:
        pytest.skip("no git history of csrc/records.c here")
    return revs[-1] + "^"


@pytest.fixture(scope="module")
def old_build(tmp_path_factory):
    """The package and C core as they were before the records store."""
    tmp = str(tmp_path_factory.mktemp("old-build"))
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision_before_records(), "csrc",
                              "cowblock"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
    src = os.path.join(tmp, "csrc")
    build = (f"import sys; sys.path.insert(0, {src!r}); import build_ffi; "
             f"build_ffi.ffibuilder.compile(tmpdir={tmp!r})")
    subprocess.run([sys.executable, "-c", build], cwd=tmp, check=True, capture_output=True)
    return tmp


def run_old(old_build, path, action):
    env = dict(os.environ, PYTHONPATH=old_build)
    run = subprocess.run([sys.executable, "-c", OLD_BUILD, str(path), action], cwd=old_build,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def ro_compat(path):
    with open(os.path.join(path, "metadata"), "rb") as f:
        return format.Commit(f.read()).sb.ro_compat


def test_an_old_build_reads_but_never_writes_a_pool_with_records(old_build, tmp_path):
    path = tmp_path / "p"
    with Pool.create(path, 256 * BS, BS, commit_interval=0) as pool:
        pool.create_thin("a", 16 * BS).pwrite(b"hello", 0)
        pool.put_record("image/web", b"x" * 10000)     # in value blocks
    assert ro_compat(path) == format.RO_COMPAT_RECORDS
    refused = run_old(old_build, path, "write")
    assert "can only read" in refused["refused"]
    seen = run_old(old_build, path, "read")
    assert seen["devices"] == ["a"] and seen["data"] == "hello"
    # Why the flag is needed: to the old build, the store's blocks are leaks
    # (its repair would free them under the store).
    assert seen["leaks"] > 0 and seen["errors"] == 0
    with Pool.open(path, commit_interval=0) as pool:    # untouched
        assert pool.get_record("image/web") == b"x" * 10000 and pool.check().ok


def test_an_old_build_writes_a_pool_whose_store_is_empty(old_build, tmp_path):
    path = tmp_path / "p"
    with Pool.create(path, 256 * BS, BS, commit_interval=0) as pool:
        pool.create_thin("a", 16 * BS).pwrite(b"hello", 0)
        pool.put_record("k", b"v")
        pool.delete_record("k")
    assert ro_compat(path) == 0
    wrote = run_old(old_build, path, "write")
    assert wrote == {"wrote": True, "check_ok": True}
    with Pool.open(path, commit_interval=0) as pool:
        assert sorted(d.name for d in pool.list()) == ["a", "old-dev"]
        assert pool.record_count() == 0 and pool.check().ok


def test_a_pool_of_an_old_build_gains_an_empty_store(old_build, tmp_path):
    path = tmp_path / "p"
    run_old(old_build, path, "create")
    with Pool.open(path, commit_interval=0) as pool:
        assert pool.record_count() == 0 and list(pool.records()) == []
        assert pool.device("a").pread(8, 0) == b"from old"
        pool.put_record("first", b"record")
        assert pool.check().ok
    assert ro_compat(path) == format.RO_COMPAT_RECORDS
    with Pool.open(path, read_only=True) as pool:
        assert pool.get_record("first") == b"record"
