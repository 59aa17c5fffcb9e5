"""cowblock mount/umount: nbdfuse + loop + a real ext4 filesystem."""
import json
import os
import shutil
import subprocess

import pytest

from cowblock import Pool
from cowblock.mount import missing_capabilities

COWBLOCK = shutil.which("cowblock")
MISSING = missing_capabilities() + ([] if COWBLOCK else ["the cowblock command is not installed"])
pytestmark = pytest.mark.skipif(bool(MISSING), reason="; ".join(MISSING))
MiB = 1 << 20


def run(pool, *args, check=True):
    r = subprocess.run([COWBLOCK, "--pool", str(pool), *args], capture_output=True, text=True,
                       timeout=120)
    if check and r.returncode:
        raise AssertionError(f"{args}: {r.returncode} {r.stderr}")
    return r


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool"
    with Pool.create(path, 1 << 30, 65536) as p:
        p.create_thin("base", 256 * MiB)
    yield path
    for line in open("/proc/mounts"):
        mnt = line.split()[1]
        if mnt.startswith(str(tmp_path)) and "/mnt" in mnt:
            subprocess.run([COWBLOCK, "umount", mnt], capture_output=True)


def test_mount_mkfs_write_commit_and_remount(pool, tmp_path):
    mnt = tmp_path / "mnt"
    run(pool, "mount", "base", str(mnt), "--mkfs", "ext4")
    (mnt / "hello.txt").write_text("hello from ext4\n")
    os.makedirs(mnt / "dir")
    (mnt / "dir" / "big").write_bytes(os.urandom(5 * MiB))
    os.sync()
    r = run(pool, "rm", "base", check=False)            # mounted: busy
    assert r.returncode == 12
    run(pool, "snapshot", "base", "layer", "--read-only")  # through the daemon, while mounted
    run(pool, "umount", str(mnt))
    # the read-only layer mounts read-only and holds the files
    lmnt = tmp_path / "mnt-layer"
    out = json.loads(run(pool, "--json", "mount", "layer", str(lmnt)).stdout)
    assert out["read_only"]
    assert (lmnt / "hello.txt").read_text() == "hello from ext4\n"
    with pytest.raises(OSError):
        (lmnt / "new").write_text("x")
    run(pool, "umount", str(lmnt))
    # remount the base: the files survived
    run(pool, "mount", "base", str(mnt))
    assert (mnt / "dir" / "big").stat().st_size == 5 * MiB
    run(pool, "umount", str(mnt))
    assert json.loads(run(pool, "--json", "pool", "check").stdout)["ok"]


def test_container_commit_freezes_a_mounted_container(pool, tmp_path):
    run(pool, "set", "base", "--label", "cowblock.kind=image")
    run(pool, "set", "base", "--read-only")
    run(pool, "container", "create", "base", "c1")
    mnt = tmp_path / "mnt-c1"
    run(pool, "mount", "c1", str(mnt), "--mkfs", "ext4")
    (mnt / "state").write_text("committed while mounted\n")
    run(pool, "container", "commit", "c1", "img2")
    (mnt / "after").write_text("not in the layer\n")
    run(pool, "umount", str(mnt))
    lmnt = tmp_path / "mnt-img2"
    run(pool, "mount", "img2", str(lmnt))
    assert (lmnt / "state").read_text() == "committed while mounted\n"
    assert not (lmnt / "after").exists()
    run(pool, "umount", str(lmnt))
