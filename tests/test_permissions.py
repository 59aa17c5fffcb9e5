"""A pool is its owner's alone: the directory is made 0700 and the data and
metadata files 0600 whatever the umask; a pool that others can read gets a
warning from `pool info` and `pool check`, and `pool check --repair` takes
the others' permissions away."""
import json
import os
import shutil
import stat
import subprocess

import pytest

from cowblock import Pool, health

BS = 4096
COWBLOCK = shutil.which("cowblock")


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def modes(path):
    return mode(path), mode(path / "data"), mode(path / "metadata")


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o000, 0o077, 0o277])
def test_new_pools_are_owner_only_whatever_the_umask(tmp_path, umask, mask):
    umask(mask)
    path = tmp_path / "pool"
    Pool.create(path, 64 * BS, BS, commit_interval=0).close()
    assert modes(path) == (0o700, 0o600, 0o600)
    umask(0o022)
    with Pool.open(path, commit_interval=0) as pool:   # still usable by its owner
        pool.create_thin("d", BS).pwrite(b"x", 0)
        assert not health.pool_health(pool).warnings


def test_a_pool_directory_that_existed_keeps_its_mode(tmp_path, umask):
    path = tmp_path / "pool"
    path.mkdir(mode=0o755)
    Pool.create(path, 64 * BS, BS, commit_interval=0).close()
    assert modes(path) == (0o755, 0o600, 0o600)


def open_up(path):
    os.chmod(path, 0o755)
    os.chmod(path / "data", 0o644)
    os.chmod(path / "metadata", 0o640)


def test_open_pools_are_warned_about_and_repair_closes_them(tmp_path, umask):
    path = tmp_path / "pool"
    Pool.create(path, 64 * BS, BS, commit_interval=0).close()
    open_up(path)
    with Pool.open(path, commit_interval=0) as pool:
        warnings = health.pool_health(pool).warnings
        assert len(warnings) == 3 and all("other local users" in w for w in warnings)
        assert any(f"{path}/data is mode 0644" in w for w in warnings)
        report = pool.check()
        assert report.ok and report.warnings == warnings and "warning:" in str(report)
        repaired = pool.check(repair=True)
        assert repaired.ok and not repaired.warnings
        assert any("mode 0644 set to 0600" in line for line in repaired.repaired)
    assert modes(path) == (0o700, 0o600, 0o600)


@pytest.mark.skipif(COWBLOCK is None, reason="the cowblock command is not installed")
def test_cli_info_and_check_warn_and_repair_tightens(tmp_path, umask):
    path = tmp_path / "pool"
    Pool.create(path, 64 * BS, BS, commit_interval=0).close()
    open_up(path)

    def run(*args):
        return subprocess.run([COWBLOCK, "--pool", str(path), *args], capture_output=True,
                              text=True)
    info = run("pool", "info")
    assert info.returncode == 0 and f"warning: pool file {path}/data is mode 0644" in info.stdout
    assert len(json.loads(run("--json", "pool", "info").stdout)["warnings"]) == 3
    check = run("pool", "check")
    assert check.returncode == 0 and "warning: pool directory" in check.stdout
    assert len(json.loads(run("--json", "pool", "check").stdout)["warnings"]) == 3
    assert modes(path) == (0o755, 0o644, 0o640)          # only a repair changes modes
    repair = run("pool", "check", "--repair")
    assert repair.returncode == 0 and "set to 0700 (owner only)" in repair.stdout, repair.stdout
    assert modes(path) == (0o700, 0o600, 0o600)
    assert "warning" not in run("pool", "info").stdout
