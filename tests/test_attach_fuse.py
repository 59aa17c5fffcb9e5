"""Device files on the in-process FUSE server (cowblock.attach).

Through the file with plain system calls, compared byte for byte with the
engine's API (unaligned offsets and lengths); the open rule; a full pool;
then a real ext4 on a loop device over the file: remounted byte-exact and
e2fsck-clean, a SIGKILL of the process hosting the server while a writer
writes in the mount (EIO, no hang, recovery), and writing under a cgroup
memory limit without deadlock.
"""
import ctypes
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cowblock import BusyError, Pool
from cowblock.attach import (AttachError, FuseAttach, FuseOptions, abort_connection, available,
                             clean_stale)

ok, why = available()
pytestmark = [pytest.mark.skipif(not ok, reason=why),
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting FUSE here needs root")]

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 16
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd, mode, off, length):
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@pytest.fixture(params=[4096, 65536], ids=["4K", "64K"])
def attached(tmp_path, request):
    pool = Pool.create(tmp_path / "pool", 512 * request.param, request.param, commit_interval=0)
    attach = FuseAttach(pool, tmp_path / "dev").start()
    yield pool, attach
    attach.stop(force=True)
    pool.close()


def open_file(path, flags=os.O_RDWR):
    return os.open(path, flags)


# ---- the file against the engine ----

def test_unaligned_io_matches_the_engine(attached):
    pool, attach = attached
    size = 3 * pool.block_size + 12288
    dev = pool.create_thin("d", size)
    model = bytearray(size)
    fd = open_file(attach.add("d"))
    try:
        assert os.fstat(fd).st_size == size
        rng = random.Random(7)
        for _ in range(200):
            off = rng.randrange(size)
            n = rng.randrange(1, min(size - off, 3 * pool.block_size) + 1)
            data = rng.randbytes(n)
            if rng.random() < 0.5:
                assert os.pwrite(fd, data, off) == n
            else:
                dev.pwrite(data, off)  # the engine behind the file's back: no page cache
            model[off:off + n] = data
            roff = rng.randrange(size)
            rn = rng.randrange(0, size - roff + 1)
            assert os.pread(fd, rn, roff) == bytes(model[roff:roff + rn])
        assert dev.pread(size, 0) == bytes(model)
        assert os.pread(fd, 100, size - 10) == bytes(model[-10:])  # short at the end
        assert os.pread(fd, 100, size) == b""
    finally:
        os.close(fd)


def test_fsync_commits(attached):
    pool, attach = attached
    pool.create_thin("d", 1 << 20)
    fd = open_file(attach.add("d"))
    try:
        before = pool.stats().transaction_id
        os.pwrite(fd, b"x" * 5000, 4097)  # maps new blocks: a commit to make
        assert pool.stats().transaction_id == before
        os.fsync(fd)
        assert pool.stats().transaction_id > before
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                  FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE],
                         ids=["punch_hole", "zero_range", "zero_range_keep_size"])
def test_fallocate_zeroes_unaligned_ranges(attached, mode):
    pool, attach = attached
    bs = pool.block_size
    size = 6 * bs
    dev = pool.create_thin("d", size)
    data = random.Random(3).randbytes(size)
    dev.pwrite(data, 0)
    model = bytearray(data)
    fd = open_file(attach.add("d"))
    try:
        for off, n in [(1000, 3 * bs + 77), (5 * bs - 1, 1), (2 * bs, bs), (4 * bs + 5, 2 * bs - 5)]:
            fallocate(fd, mode, off, n)
            model[off:off + n] = bytes(n)
            assert dev.pread(size, 0) == bytes(model)
            assert os.pread(fd, size, 0) == bytes(model)
        assert dev.info().mapped_blocks < 6  # whole blocks inside were unmapped
        with pytest.raises(OSError) as e:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, bs)  # without KEEP_SIZE
        assert e.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as e:
            fallocate(fd, FALLOC_FL_ZERO_RANGE, size - 10, 20)  # would grow the file
        assert e.value.errno == errno.EFBIG
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, size - 10, 20)
        model[-10:] = bytes(10)
        assert dev.pread(size, 0) == bytes(model)
    finally:
        os.close(fd)


def test_posix_fallocate_keeps_the_data(attached):
    """Plain allocation is EOPNOTSUPP, as from a block device; glibc then
    writes a zero byte into each hole block itself: nothing changes."""
    pool, attach = attached
    dev = pool.create_thin("d", 8 * pool.block_size)
    dev.pwrite(b"keep me", 3 * pool.block_size + 11)
    before = dev.pread(dev.size, 0)
    fd = open_file(attach.add("d"))
    try:
        os.posix_fallocate(fd, 100, 5 * pool.block_size)
    finally:
        os.close(fd)
    assert dev.pread(dev.size, 0) == before


def test_writes_past_the_end_get_enospc(attached):
    pool, attach = attached
    pool.create_thin("d", 8192)
    fd = open_file(attach.add("d"))
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 10, 8190)
        assert e.value.errno in (errno.ENOSPC, errno.EFBIG)
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 4096)
        assert e.value.errno == errno.EPERM
        assert os.fstat(fd).st_size == 8192
    finally:
        os.close(fd)


def test_changed_takes_the_new_size_and_data(attached):
    pool, attach = attached
    dev = pool.create_thin("d", 1 << 20)
    path = attach.add("d")
    assert os.stat(path).st_size == 1 << 20
    dev.resize(2 << 20)
    dev.pwrite(b"grown", (2 << 20) - 5)
    attach.changed("d")
    assert os.stat(path).st_size == 2 << 20
    fd = open_file(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 5, (2 << 20) - 5) == b"grown"
    finally:
        os.close(fd)


def test_directory_lists_the_files_and_refuses_new_ones(attached):
    pool, attach = attached
    pool.create_thin("a", 1 << 20)
    pool.create_thin("b", 1 << 20)
    attach.add("a")
    attach.add("b")
    assert sorted(os.listdir(attach.mountpoint)) == ["a", "b"]
    st = os.stat(attach.path("a"))
    assert (st.st_uid, st.st_mode & 0o777) == (os.stat(pool.path).st_uid, 0o600)
    with pytest.raises(OSError):
        open(os.path.join(attach.mountpoint, "new"), "w")
    with pytest.raises(OSError):
        os.unlink(attach.path("a"))
    attach.remove("b")
    assert os.listdir(attach.mountpoint) == ["a"]
    with pytest.raises(FileNotFoundError):
        os.stat(attach.path("b"))


# ---- the open rule ----

def test_one_read_write_open_unlimited_read_only(attached):
    pool, attach = attached
    pool.create_thin("d", 1 << 20)
    path = attach.add("d")
    rw = open_file(path)
    ros = [open_file(path, os.O_RDONLY) for _ in range(5)]
    try:
        with pytest.raises(OSError) as e:
            open_file(path, os.O_WRONLY)
        assert e.value.errno == errno.EBUSY
        assert attach.opens("d") == (1, 5)
        with pytest.raises(BusyError):
            attach.remove("d")
        with pytest.raises(BusyError):
            attach.stop()
        with pytest.raises(BusyError):
            attach.deny_read_write("d")
    finally:
        for fd in [rw, *ros]:
            os.close(fd)
    wait_closed(attach, "d")
    attach.deny_read_write("d")
    with pytest.raises(OSError) as e:
        open_file(path)
    assert e.value.errno == errno.EBUSY
    os.close(open_file(path, os.O_RDONLY))  # reading is still fine
    attach.deny_read_write("d", False)
    os.close(open_file(path))


def wait_closed(attach, name):
    """release reaches the server just after close returns."""
    end = time.monotonic() + 10
    while attach.opens(name) != (0, 0):
        assert time.monotonic() < end, attach.opens(name)
        time.sleep(0.01)


def test_shared_file_takes_many_writers(attached):
    pool, attach = attached
    pool.create_thin("d", 1 << 20)
    path = attach.add("d", shared=True)
    fds = [open_file(path) for _ in range(3)]
    try:
        assert attach.opens("d") == (3, 0)
    finally:
        for fd in fds:
            os.close(fd)


def test_read_only_devices_refuse_writes(attached):
    pool, attach = attached
    dev = pool.create_thin("base", 1 << 20)
    dev.pwrite(b"layer", 0)
    pool.snapshot("base", "layer", read_only=True)
    path = attach.add("layer")
    assert os.stat(path).st_mode & 0o777 == 0o400
    for flags in (os.O_WRONLY, os.O_RDWR):
        with pytest.raises(OSError) as e:
            open_file(path, flags)
        assert e.value.errno == errno.EROFS
    fd = open_file(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 5, 0) == b"layer"
    finally:
        os.close(fd)
    # A writable device attached read-only is read-only too.
    path = attach.add("base", read_only=True)
    with pytest.raises(OSError) as e:
        open_file(path)
    assert e.value.errno == errno.EROFS


def test_bad_calls_say_what_is_wrong(attached):
    pool, attach = attached
    pool.create_thin("d", 1 << 20)
    attach.add("d")
    with pytest.raises(Exception, match="already attached"):
        attach.add("d")
    with pytest.raises(LookupError):
        attach.add("nonesuch")
    with pytest.raises(LookupError):
        attach.opens("nonesuch")
    with pytest.raises(AttachError, match="running already"):
        attach.start()


# ---- a full pool ----

def test_full_pool_gives_enospc_to_the_writer(tmp_path):
    pool = Pool.create(tmp_path / "pool", 16 * 65536, 65536, commit_interval=0)
    pool.create_thin("d", 64 * 65536)
    with FuseAttach(pool, tmp_path / "dev") as attach:
        fd = open_file(attach.add("d"))
        try:
            with pytest.raises(OSError) as e:
                for i in range(64):
                    os.pwrite(fd, b"y" * 65536, i * 65536)
            assert e.value.errno == errno.ENOSPC
            assert attach.stats().errors >= 1
        finally:
            os.close(fd)
    pool.close()


def test_on_full_wait_holds_the_write_until_the_pool_grows(tmp_path):
    pool = Pool.create(tmp_path / "pool", 4 * 65536, 65536, commit_interval=0)
    pool.create_thin("d", 16 * 65536)
    with FuseAttach(pool, tmp_path / "dev", FuseOptions(on_full_wait=20)) as attach:
        fd = open_file(attach.add("d"))
        try:
            for i in range(4):
                os.pwrite(fd, b"z" * 65536, i * 65536)
            grow = threading.Timer(0.5, pool.resize, args=(16 * 65536,))
            grow.start()
            t = time.monotonic()
            os.pwrite(fd, b"w" * 65536, 4 * 65536)  # waits for the resize, then lands
            assert time.monotonic() - t >= 0.3
            grow.join()
            assert pool.device("d").pread(65536, 4 * 65536) == b"w" * 65536
        finally:
            os.close(fd)
    pool.close()


def test_stop_unmounts_and_start_cleans_a_stale_mount(tmp_path):
    pool = Pool.create(tmp_path / "pool", 64 * 65536, 65536, commit_interval=0)
    pool.create_thin("d", 1 << 20)
    attach = FuseAttach(pool, tmp_path / "dev").start()
    attach.add("d")
    attach.stop()
    assert not os.path.ismount(tmp_path / "dev")
    assert not clean_stale(tmp_path / "dev")
    pool.close()


# ---- a real filesystem on a loop device over the file ----

def need_loop():
    for tool in ("losetup", "mkfs.ext4", "e2fsck", "mount", "umount"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices (/dev/loop-control is missing)")


def sh(*argv, timeout=120):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, argv))}: {r.stderr}"
    return r.stdout.strip()


class LoopMount:
    """losetup --direct-io=on over a device file, ext4 on it, mounted."""

    def __init__(self, path, directory, mkfs=True):
        self.dir = str(directory)
        self.loop = sh("losetup", "-f", "--show", "--direct-io=on", str(path))
        if mkfs:
            sh("mkfs.ext4", "-q", "-F", self.loop)
        os.makedirs(self.dir, exist_ok=True)
        sh("mount", self.loop, self.dir)

    def close(self, lazy=False):
        subprocess.run(["umount", *(["-l"] if lazy else []), self.dir], capture_output=True,
                       timeout=60)
        subprocess.run(["losetup", "-d", self.loop], capture_output=True, timeout=60)


def test_ext4_over_loop_remounts_byte_exact_and_checks_clean(tmp_path):
    need_loop()
    pool = Pool.create(tmp_path / "pool", 4096 * 65536, 65536)
    pool.create_thin("d", 128 << 20)
    files = {f"f{i}": random.Random(i).randbytes(random.Random(i).randrange(1, 3 << 20))
             for i in range(12)}
    with FuseAttach(pool, tmp_path / "dev") as attach:
        path = attach.add("d")
        m = LoopMount(path, tmp_path / "mnt")
        try:
            for name, data in files.items():
                with open(os.path.join(m.dir, name), "wb") as f:
                    f.write(data)
                    os.fsync(f.fileno())
        finally:
            m.close()
        wait_closed(attach, "d")
        sh("e2fsck", "-fn", path)
        m = LoopMount(path, tmp_path / "mnt", mkfs=False)
        try:
            for name, data in files.items():
                with open(os.path.join(m.dir, name), "rb") as f:
                    assert f.read() == data, name
        finally:
            m.close()
        assert attach.stats().bytes_written > sum(map(len, files.values()))
    pool.close()


HOST = textwrap.dedent("""
    import os, sys, time
    from cowblock import Pool
    from cowblock.attach import FuseAttach
    pool = Pool.open(sys.argv[1])
    attach = FuseAttach(pool, sys.argv[2]).start()
    attach.add("d")
    print(os.getpid(), flush=True)
    while True:
        time.sleep(60)
""")


def host_server(pool_dir, dev_dir):
    """A child process serving device d of the pool; returns once it serves."""
    proc = subprocess.Popen([sys.executable, "-c", HOST, str(pool_dir), str(dev_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip(), proc.stderr.read()
    return proc


def test_sigkill_of_the_server_gives_eio_not_a_hang(tmp_path):
    need_loop()
    pool_dir, dev_dir = tmp_path / "pool", tmp_path / "dev"
    with Pool.create(pool_dir, 4096 * 65536, 65536) as pool:
        pool.create_thin("d", 128 << 20)
    proc = host_server(pool_dir, dev_dir)
    synced = random.Random(1).randbytes(1 << 20)
    m = None
    try:
        m = LoopMount(dev_dir / "d", tmp_path / "mnt")
        with open(os.path.join(m.dir, "synced"), "wb") as f:
            f.write(synced)
            os.fsync(f.fileno())
        # Rewrites 16 MiB with direct I/O until a write fails.
        writer = subprocess.Popen(
            ["sh", "-c", f"while dd if=/dev/urandom of={m.dir}/busy bs=64k count=256 "
                         "oflag=direct conv=notrunc status=none; do :; done; exit 1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        assert writer.poll() is None, writer.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        try:
            writer.wait(timeout=60)  # the bound: EIO comes, the writer is not stuck
        except subprocess.TimeoutExpired:
            writer.kill()
            pytest.fail("the writer hung after the FUSE server was killed")
        assert writer.returncode != 0
        assert "Input/output error" in writer.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        if m:
            m.close(lazy=True)
    assert clean_stale(dev_dir)
    # The pool reopens at its last commit; the fsynced file is intact after
    # the journal replays, and the filesystem checks clean.
    with Pool.open(pool_dir) as pool, FuseAttach(pool, dev_dir) as attach:
        path = attach.add("d")
        m = LoopMount(path, tmp_path / "mnt", mkfs=False)  # replays the journal
        try:
            with open(os.path.join(m.dir, "synced"), "rb") as f:
                assert f.read() == synced
        finally:
            m.close()
        wait_closed(attach, "d")
        sh("e2fsck", "-fn", path)


class MemoryCgroup:
    """A cgroup v1 memory group with a limit, removed at the end."""

    def __init__(self, name, limit):
        base = "/sys/fs/cgroup/memory"
        if not os.path.isdir(base) or not os.access(base, os.W_OK):
            pytest.skip("no writable cgroup v1 memory controller")
        self.base, self.path = base, os.path.join(base, name)
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))

    def shell(self, command):
        """sh -c command inside the group."""
        return f"echo $$ > {self.path}/cgroup.procs && {command}"

    def add(self, pid):
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def remove(self):
        for pid in open(os.path.join(self.path, "cgroup.procs")).read().split():
            with open(os.path.join(self.base, "cgroup.procs"), "w") as f:
                f.write(pid)
        os.rmdir(self.path)


def write_big_file_or_abort(m, cg, dev_dir, mib=384, seconds=180):
    """dd mib MiB through the mount inside the cgroup; on a hang, abort the
    FUSE connection (so nothing stays stuck) and fail."""
    w = subprocess.Popen(["sh", "-c", cg.shell(f"dd if=/dev/zero of={m.dir}/big bs=1M "
                                               f"count={mib} conv=fsync status=none")],
                         stderr=subprocess.PIPE, text=True)
    try:
        w.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        abort_connection(dev_dir)
        w.wait(timeout=60)
        pytest.fail(f"writing {mib} MiB under a memory limit hung for {seconds} s (deadlock)")
    assert w.returncode == 0, w.stderr.read()
    assert os.path.getsize(os.path.join(m.dir, "big")) == mib << 20


def test_ext4_writer_under_a_memory_limit_does_not_deadlock(tmp_path):
    """A writer in a memory cgroup of 64 MiB (a container) writes 384 MiB
    through ext4 -> loop -> FUSE -> the pool: its reclaim waits on writeback
    that this process serves."""
    need_loop()
    pool = Pool.create(tmp_path / "pool", 16384 * 65536, 65536)
    pool.create_thin("d", 512 << 20)
    cg = MemoryCgroup(f"cowblock-test-{os.getpid()}", 64 << 20)
    try:
        with FuseAttach(pool, tmp_path / "dev") as attach:
            m = LoopMount(attach.add("d"), tmp_path / "mnt")
            try:
                write_big_file_or_abort(m, cg, tmp_path / "dev")
            finally:
                m.close()
            wait_closed(attach, "d")
    finally:
        cg.remove()
        pool.close()


def has_cap_sys_resource():
    with open("/proc/self/status") as f:
        caps = int(f.read().split("CapEff:")[1].split()[0], 16)
    return bool(caps >> 24 & 1)


@pytest.mark.skipif(not has_cap_sys_resource(),
                    reason="PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE, which this process lacks; "
                           "without it a server sharing the writer's memory limit deadlocks "
                           "(its threads wait in reclaim on writeback only they can do)")
def test_ext4_server_sharing_the_memory_limit_does_not_deadlock(tmp_path):
    """The server and the writer in one memory cgroup of 96 MiB: reclaim has
    to write back through the server while the server itself is short of
    memory.  PR_SET_IO_FLUSHER on the server's threads is what lets it on."""
    need_loop()
    pool_dir, dev_dir = tmp_path / "pool", tmp_path / "dev"
    with Pool.create(pool_dir, 16384 * 65536, 65536) as pool:
        pool.create_thin("d", 512 << 20)
    cg = MemoryCgroup(f"cowblock-test-{os.getpid()}", 96 << 20)
    proc = m = None
    try:
        proc = host_server(pool_dir, dev_dir)
        cg.add(proc.pid)
        m = LoopMount(dev_dir / "d", tmp_path / "mnt")
        write_big_file_or_abort(m, cg, dev_dir)
    finally:
        if m:
            m.close()
        if proc:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        clean_stale(dev_dir)
        cg.remove()


def test_build_without_libfuse3_says_why(tmp_path):
    """COWBLOCK_FUSE=0 (as when pkg-config finds no fuse3): the core still
    builds, and the attach layer says FUSE attach is unavailable and why."""
    from corebuild import build_core_copy
    build_core_copy(str(tmp_path), env={"COWBLOCK_FUSE": "0"})
    probe = textwrap.dedent(f"""
        from cowblock import Pool
        from cowblock.attach import AttachError, FuseAttach, available
        print(available())
        pool = Pool.create({str(tmp_path / "pool")!r}, 64 * 65536, 65536)
        try:
            FuseAttach(pool, {str(tmp_path / "dev")!r}).start()
        except AttachError as e:
            print("refused:", e)
        pool.close()
    """)
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "(False, 'cowblock was built without libfuse3" in r.stdout
    assert "refused: FUSE attach is unavailable" in r.stdout
