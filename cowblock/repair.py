"""What `pool check --repair` would do, found by doing it on a scratch copy.

A repair sets every reference count from the trees and drops the devices
whose mapping trees are damaged: their data is lost.  preview() runs the
repair on a copy of the pool's metadata, beside a sparse stand-in of the
same size for its data file (a repair reads and writes metadata only), so
what it reports is exactly what the real repair would do, and the pool
itself is not touched.
"""
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from . import errors

@dataclass(frozen=True)
class RepairPreview:
    report: object                  # the CheckReport of the repair of the copy
    dropped: list = field(default_factory=list)   # names of the devices it would drop
    done: list = field(default_factory=list)      # what it would do, devices named


def preview(pool):
    """What pool.check(repair=True) would do to `pool` (a Pool opened for
    writing, idle: no daemon, no other user), without doing it."""
    from .pool import Pool
    pool.wait_reclaimed()   # no deferred removal changes the metadata while it is copied
    pool.commit()
    before = {i.id: i.name for i in pool.list()}
    if pool._remote is not None:   # a pool on RADOS: its cache holds what was read so far
        pool._remote.cache_metadata()
    scratch = tempfile.mkdtemp(prefix=".cowblock-repair-", dir=_scratch_parent(pool.path))
    try:
        _copy_sparse(os.path.join(pool.path, "metadata"), os.path.join(scratch, "metadata"))
        fd = os.open(os.path.join(scratch, "data"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, os.stat(os.path.join(pool.path, "data")).st_size)
        finally:
            os.close(fd)
        with Pool.open(scratch, commit_interval=0, background_reclaim=False) as copy:
            report = copy.check(repair=True)
            after = {i.id for i in copy.list()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    dropped = [name for did, name in before.items() if did not in after]
    done = [pool._name_ids(r.message, before) for r in report.repair_records
            if r.kind == "repaired"]
    return RepairPreview(report, dropped, done)


def _scratch_parent(path):
    """Beside the pool (same disk, room for its metadata), else $TMPDIR."""
    near = os.path.dirname(os.path.abspath(path))
    return near if os.access(near, os.W_OK | os.X_OK) else tempfile.gettempdir()


def _copy_sparse(src, dst):
    run = subprocess.run(["cp", "--sparse=always", "--reflink=auto", "--", src, dst],
                         capture_output=True, text=True)
    if run.returncode:
        raise errors.HostFileError(f"cannot copy {src} for a dry run: {run.stderr.strip()}")
