"""cowblock mount/umount through the pool daemon: device file, loop device
and a real ext4 filesystem; the mount rules; what failed mounts and a
killed daemon leave behind (nothing)."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from cowblock import Pool
from cowblock.attach import blockdev, nbdfuse
from cowblock.runtime import RuntimeDir, process_alive

COWBLOCK = shutil.which("cowblock")
MISSING = blockdev.missing_capabilities() + nbdfuse.missing() + \
    ([] if COWBLOCK else ["the cowblock command is not installed"])
pytestmark = pytest.mark.skipif(bool(MISSING), reason="; ".join(MISSING))
MiB = 1 << 20
FAST_EXIT = {"COWBLOCK_DAEMON_GRACE": "0.3"}


def run(pool, *args, check=True, env=None):
    r = subprocess.run([COWBLOCK, "--pool", str(pool), *args], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, **(env or {})))
    if check and r.returncode:
        raise AssertionError(f"{args}: {r.returncode} {r.stderr}")
    return r


def wait_for(cond, seconds=30, what="a condition"):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def leftovers(pool):
    """What of the pool's daemon is still on the host: its process, FUSE
    mounts, loop devices, nbdfuse processes, sockets."""
    rt = RuntimeDir(pool)
    out = []
    if rt.pid():
        out.append(f"daemon {rt.pid()}")
    with open("/proc/mounts") as f:
        out += [line.split()[1] for line in f if rt.path in line]
    r = subprocess.run(["losetup", "-a"], capture_output=True, text=True)
    out += [line for line in r.stdout.splitlines() if rt.path in line]
    r = subprocess.run(["pgrep", "-af", "nbdfuse"], capture_output=True, text=True)
    out += [line for line in r.stdout.splitlines() if rt.path in line]
    if os.path.exists(rt.control):
        out.append(rt.control)
    return out


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool"
    with Pool.create(path, 1 << 30, 65536) as p:
        p.create_thin("base", 256 * MiB)
    yield path
    for line in open("/proc/mounts"):
        mnt = line.split()[1]
        if mnt.startswith(str(tmp_path)) and "/mnt" in mnt:
            subprocess.run([COWBLOCK, "umount", "--force", mnt], capture_output=True)
    pid = RuntimeDir(path).pid()
    if pid:
        subprocess.run([COWBLOCK, "--pool", str(path), "daemon", "stop", "--force"],
                       capture_output=True)


@pytest.fixture(params=["fuse", "nbdfuse"])
def attach_path(request, monkeypatch):
    """Both attach paths: the daemon's in-process FUSE server, and the
    nbdfuse fallback (COWBLOCK_ATTACH=nbdfuse, inherited by the daemon)."""
    if request.param == "nbdfuse":
        monkeypatch.setenv("COWBLOCK_ATTACH", "nbdfuse")
    else:
        from cowblock.attach import fuse
        ok, why = fuse.available()
        if not ok:
            pytest.skip(why)
    return request.param


def test_mount_mkfs_write_commit_and_remount(pool, tmp_path, attach_path):
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
    with Pool.open(pool) as p:   # an image (cowblock.* labels are not the CLI's to set)
        p.set_read_only("base", True)
        p.set_labels("base", {"cowblock.kind": "image"}, _internal=True)
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


def test_readme_flow_serve_then_mount(pool, tmp_path):
    """`cowblock serve &` then `cowblock mount` of a device with a filesystem."""
    mnt = tmp_path / "mnt"
    run(pool, "mount", "base", str(mnt), "--mkfs", "ext4")
    (mnt / "f").write_text("kept\n")
    run(pool, "umount", str(mnt))
    sock = tmp_path / "cb.sock"
    serve = subprocess.Popen([COWBLOCK, "--pool", str(pool), "serve", "--socket", str(sock)],
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(sock.exists, what="the listener")
        run(pool, "mount", "base", str(mnt))           # no --mkfs: it has a filesystem
        assert (mnt / "f").read_text() == "kept\n"
        # mounted read-write: an NBD client may not write it too
        r = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///base?socket={sock}"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "policy" in r.stderr
        run(pool, "umount", str(mnt))
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    wait_for(lambda: not leftovers(pool), what=f"no leftovers: {leftovers(pool)}")


def test_a_writable_device_has_one_mount_a_read_only_one_many(pool, tmp_path):
    a, b = tmp_path / "mnt-a", tmp_path / "mnt-b"
    run(pool, "mount", "base", str(a), "--mkfs", "ext4")
    (a / "one").write_text("1\n")
    r = run(pool, "mount", "base", str(b), check=False)
    assert r.returncode == 12 and f"mounted on {a}" in r.stderr, r.stderr
    r = run(pool, "mount", "base", str(b), "--read-only", check=False)
    assert r.returncode == 12
    assert not b.exists()                            # a failed mount undoes its mkdir
    run(pool, "snapshot", "base", "layer", "--read-only")   # frozen while mounted
    ra, rb = tmp_path / "mnt-la", tmp_path / "mnt-lb"
    run(pool, "mount", "layer", str(ra))
    run(pool, "mount", "layer", str(rb))
    assert (ra / "one").read_text() == (rb / "one").read_text() == "1\n"
    status = json.loads(run(pool, "--json", "daemon", "status").stdout)
    assert sorted(x["dir"] for x in status["attachments"]) == sorted(map(str, (a, ra, rb)))
    r = run(pool, "daemon", "stop", check=False)     # mounts: refused without --force
    assert r.returncode == 12 and str(a) in r.stderr
    r = run(pool, "--json", "daemon", "stop", "--force")
    assert len(json.loads(r.stdout)["detached"]) == 3
    wait_for(lambda: not leftovers(pool), what="no leftovers")
    for d in (a, ra, rb):
        assert blockdev.mounted_at(str(d)) is None


@pytest.mark.parametrize("case", ["no filesystem", "read-only without one", "missing mkfs",
                                  "unknown device", "not a directory"])
def test_a_failed_mount_leaves_nothing(pool, tmp_path, case):
    run(pool, "create", "empty", "--size", "64M")
    run(pool, "snapshot", "empty", "empty-ro", "--read-only")
    mnt = tmp_path / "mnt-x"
    args, code, text = {
        "no filesystem": (["empty", str(mnt)], 13, "has no filesystem; pass --mkfs ext4"),
        "read-only without one": (["empty-ro", str(mnt), "--mkfs", "ext4"], 13,
                                  "read-only and has no filesystem"),
        "missing mkfs": (["empty", str(mnt), "--mkfs", "nosuchfs"], 13,
                         "mkfs.nosuchfs is not installed"),
        "unknown device": (["nope", str(mnt)], 3, "no device named 'nope'"),
        "not a directory": (["empty", str(tmp_path / "file" / "sub")], 11, "cannot make"),
    }[case]
    (tmp_path / "file").write_text("x")
    r = run(pool, "mount", *args, check=False, env=FAST_EXIT)
    assert r.returncode == code and text in r.stderr, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert not mnt.exists()
    wait_for(lambda: not leftovers(pool), 15, f"no leftovers: {leftovers(pool)}")
    r = run(pool, "pool", "check", "--repair")       # nothing holds the pool any more
    assert "clean" in r.stdout


def test_sigkill_of_the_daemon_with_a_mount_then_recovery(pool, tmp_path, attach_path):
    """A daemon killed under a writer: the writer gets EIO in bounded time (no
    hang); the next command cleans up what it left and says so; the pool
    reopens at its last commit; what was fsynced is intact after journal
    replay, and e2fsck finds the filesystem clean."""
    mnt = tmp_path / "mnt"
    run(pool, "mount", "base", str(mnt), "--mkfs", "ext4")
    (mnt / "safe").write_bytes(os.urandom(MiB))
    safe = (mnt / "safe").read_bytes()
    fd = os.open(mnt / "safe", os.O_RDONLY)
    os.fsync(fd)                                      # down to the engine...
    os.close(fd)
    time.sleep(1.5)                                   # ... and committed (once a second)
    writer = subprocess.Popen(["dd", "if=/dev/zero", f"of={mnt}/busy", "bs=1M", "count=100000",
                               "oflag=direct"], stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    rt = RuntimeDir(pool)
    os.kill(rt.pid(), signal.SIGKILL)
    assert writer.wait(timeout=60) != 0               # EIO, not a hang
    r = run(pool, "ls")                               # the next command cleans up
    assert "was mounted on" in r.stderr and "died" in r.stderr, r.stderr
    assert blockdev.mounted_at(str(mnt)) is None
    wait_for(lambda: not leftovers(pool), 15, f"no leftovers: {leftovers(pool)}")
    run(pool, "mount", "base", str(mnt))              # journal replay
    assert (mnt / "safe").read_bytes() == safe
    run(pool, "umount", str(mnt))
    with Pool.open(pool, timeout=30) as p:
        assert p.check().ok
    export = tmp_path / "fs.raw"
    run(pool, "export", "base", str(export))
    r = subprocess.run(["e2fsck", "-fn", str(export)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_umount_of_a_busy_mount_is_refused_then_forced(pool, tmp_path):
    mnt = tmp_path / "mnt"
    run(pool, "mount", "base", str(mnt), "--mkfs", "ext4")
    holder = subprocess.Popen(["sleep", "60"], cwd=mnt)
    try:
        r = run(pool, "umount", str(mnt), check=False)
        assert r.returncode == 12 and "busy" in r.stderr
        run(pool, "umount", "--force", str(mnt))
    finally:
        holder.kill()
        holder.wait()
    wait_for(lambda: not leftovers(pool), 30, f"no leftovers: {leftovers(pool)}")


def test_growing_a_mounted_device_grows_its_file(pool, tmp_path):
    from cowblock.attach import fuse
    ok, why = fuse.available()
    if not ok:
        pytest.skip(why)
    mnt = tmp_path / "mnt"
    rec = json.loads(run(pool, "--json", "mount", "base", str(mnt), "--mkfs", "ext4").stdout)
    run(pool, "resize", "base", "512M")               # growing is allowed while mounted
    assert os.path.getsize(rec["file"]) == 512 * MiB
    subprocess.run(["losetup", "-c", rec["loop"]], check=True)   # the loop device follows
    size = subprocess.run(["blockdev", "--getsize64", rec["loop"]], capture_output=True,
                          text=True, check=True).stdout
    assert int(size) == 512 * MiB
    (mnt / "still").write_text("there\n")                # (online resize2fs needs
    os.sync()                                            #  CAP_SYS_RESOURCE, not here)
    run(pool, "umount", str(mnt))
