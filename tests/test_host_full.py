"""The host filesystem running out of space: an error, never SIGBUS, and
nothing acknowledged and committed is lost."""
import errno
import os
import subprocess

import pytest

from cowblock import NoSpaceError, Pool

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_host_filesystem_full(small_fs):
    # A 64 MiB pool (sparse) on a 6 MiB filesystem: the host fills first.
    pool = Pool.create(small_fs / "pool", 64 * MiB, 65536, metadata_size=1 * MiB,
                       commit_interval=0)
    dev = pool.create_thin("a", 32 * MiB)
    written = []
    with pytest.raises(NoSpaceError) as exc:
        for i in range(32):
            chunk = bytes([i + 1]) * MiB
            dev.pwrite(chunk, i * MiB)
            written.append(chunk)
            if i % 2:
                pool.commit()
    assert exc.value.errno == errno.ENOSPC
    assert "full" in str(exc.value)
    assert written, "the filesystem filled before any write"
    for i, chunk in enumerate(written):  # every acknowledged write reads back
        assert dev.pread(MiB, i * MiB) == chunk
    try:
        pool.close()
    except OSError:
        pass  # the final commit may not fit either: the pool keeps its last commit
    with Pool.open(small_fs / "pool", read_only=True) as ro:
        report = ro.check()
        assert report.ok, str(report)
        ro_dev = ro.device("a")
        mapped = ro_dev.block_status()
        for ext in mapped:  # whatever was committed reads as written
            if ext.mapped:
                for off in range(ext.offset, ext.offset + ext.length, MiB):
                    i = off // MiB
                    if i < len(written):
                        assert ro_dev.pread(MiB, i * MiB) == written[i]
