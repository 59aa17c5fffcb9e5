"""cowblock.transfer: import and export of whole devices, sparse both ways,
raw, qcow2 (through qemu-img), streams; at 4 KiB, 64 KiB and 1 MiB blocks."""
import io
import os
import shutil
import subprocess
import sys

import pytest

from cowblock import (DeviceExistsError, DeviceNotFoundError, InvalidArgumentError,
                      NoSpaceError, Pool, transfer)

MiB = 1 << 20
QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed "
                                                          "(Debian: apt install qemu-utils)")


@pytest.fixture(params=[4096, 65536, MiB], ids=["4K", "64K", "1M"])
def pool(tmp_path, request):
    """A 64 MiB pool, no background commits; checked clean at the end."""
    p = Pool.create(tmp_path / "pool", 64 * MiB, request.param, commit_interval=0)
    yield p
    if p._h is not None:
        report = p.check()
        assert report.ok, str(report)
        p.close()


def make_file(path, layout, seed=1):
    """Write a file from (kind, length) parts: "data" random bytes, "zero"
    written zeroes, "hole" a hole (seeked over); returns its bytes."""
    rnd = __import__("random").Random(seed)
    content = bytearray()
    with open(path, "wb") as f:
        for kind, n in layout:
            if kind == "data":
                part = rnd.randbytes(n)
                f.write(part)
            elif kind == "zero":
                part = bytes(n)
                f.write(part)
            else:
                part = bytes(n)
                f.seek(n, os.SEEK_CUR)
            content += part
        f.truncate(len(content))
    return bytes(content)


def used_blocks(content, bs):
    """Pool blocks holding any non-zero byte of content."""
    return sum(1 for off in range(0, len(content), bs) if any(content[off:off + bs]))


def nonzero_grains(content):
    return sum(1 for off in range(0, len(content), 4096) if any(content[off:off + 4096]))


LAYOUT = [("data", 300_000), ("zero", MiB), ("hole", 2 * MiB), ("data", 5000),
          ("hole", 70_000), ("data", 4096 * 3), ("zero", 8192), ("data", 777)]


def test_raw_round_trip_is_sparse_and_exact(pool, tmp_path):
    src, dst = tmp_path / "in.raw", tmp_path / "out.raw"
    content = make_file(src, LAYOUT)
    assert len(content) % 4096  # the odd length must survive
    dev = transfer.import_file(pool, "disk", src)
    assert dev.size == -(-len(content) // 4096) * 4096
    assert pool.info("disk").labels == {transfer.LENGTH_LABEL: str(len(content))}
    assert pool.stats().data_used == used_blocks(content, pool.block_size)
    assert dev.pread(len(content), 0) == content
    assert dev.pread(dev.size - len(content), len(content)) == bytes(dev.size - len(content))

    result = transfer.export_file(pool, "disk", dst)
    assert dst.read_bytes() == content
    assert result.length == len(content) and result.format == "raw"
    assert result.data_bytes <= nonzero_grains(content) * 4096
    st = os.stat(dst)
    assert st.st_size == len(content)
    # holes where the device is unmapped and where mapped data is zero
    assert st.st_blocks * 512 <= nonzero_grains(content) * 4096 + 64 * 1024


def test_aligned_file_has_no_length_label(pool, tmp_path):
    src = tmp_path / "a.raw"
    content = make_file(src, [("data", 8192), ("hole", MiB)])
    transfer.import_file(pool, "a", src)
    assert pool.info("a").labels == {}
    assert pool.info("a").size == len(content)
    out = tmp_path / "a.out"
    transfer.export_file(pool, "a", out)
    assert out.read_bytes() == content


def test_labels_are_kept_and_merged(pool, tmp_path):
    src = tmp_path / "a.raw"
    make_file(src, [("data", 5000)])
    transfer.import_file(pool, "a", src, labels={"role": "base"})
    assert pool.info("a").labels == {"role": "base", transfer.LENGTH_LABEL: "5000"}


def test_import_from_stream_grows_and_trims(pool, tmp_path):
    content = make_file(tmp_path / "s.raw", [("data", 3 * MiB + 123), ("zero", MiB),
                                             ("data", 10)], seed=7)
    seen = []
    dev = transfer.import_file(pool, "s", io.BytesIO(content),
                               progress=lambda done, total: seen.append((done, total)))
    assert dev.size == -(-len(content) // 4096) * 4096
    assert pool.info("s").labels == {transfer.LENGTH_LABEL: str(len(content))}
    assert dev.pread(len(content), 0) == content
    assert pool.stats().data_used == used_blocks(content, pool.block_size)
    assert seen[-1] == (len(content), len(content))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    out = tmp_path / "s.out"
    transfer.export_file(pool, "s", out)
    assert out.read_bytes() == content


def test_import_from_stdin_pipe(pool, tmp_path, monkeypatch):
    content = make_file(tmp_path / "p.raw", [("data", 200_000), ("zero", 300_000),
                                             ("data", 1)], seed=3)
    r, w = os.pipe()
    writer = subprocess.Popen([sys.executable, "-c",
                               "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb')"
                               ".read())", str(tmp_path / "p.raw")], stdout=w)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(pipe))
        transfer.import_file(pool, "p", "-")
    writer.wait()
    dev = pool.device("p")
    assert dev.pread(len(content), 0) == content
    assert pool.info("p").labels[transfer.LENGTH_LABEL] == str(len(content))


def test_import_from_stdin_redirected_file_is_sparse(pool, tmp_path, monkeypatch):
    content = make_file(tmp_path / "r.raw", [("hole", 4 * MiB), ("data", 4096)])
    with open(tmp_path / "r.raw", "rb") as f:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(f))
        transfer.import_file(pool, "r", "-")
    assert pool.device("r").pread(len(content), 0) == content
    assert pool.stats().data_used == 1


def test_export_to_stdout_writes_zeroes_for_holes(pool, tmp_path, monkeypatch):
    content = make_file(tmp_path / "x.raw", [("data", 10_000), ("hole", MiB), ("data", 3)])
    transfer.import_file(pool, "x", tmp_path / "x.raw")
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out))
    result = transfer.export_file(pool, "x", "-")
    assert out.getvalue() == content
    assert result.dest == "-" and result.length == len(content)


def test_progress_reaches_the_total(pool, tmp_path):
    content = make_file(tmp_path / "g.raw", [("data", 3 * MiB), ("hole", MiB)])
    calls = []
    transfer.import_file(pool, "g", tmp_path / "g.raw", progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, len(content)) and calls[-1] == (len(content), len(content))
    assert all(t == len(content) for _, t in calls)
    calls.clear()
    transfer.export_file(pool, "g", tmp_path / "g.out", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (len(content), len(content))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_export_refuses_to_overwrite(pool, tmp_path):
    make_file(tmp_path / "a.raw", [("data", 4096)])
    transfer.import_file(pool, "a", tmp_path / "a.raw")
    dst = tmp_path / "exists"
    dst.write_bytes(b"keep me")
    with pytest.raises(InvalidArgumentError, match="exists already"):
        transfer.export_file(pool, "a", dst)
    assert dst.read_bytes() == b"keep me"
    transfer.export_file(pool, "a", dst, overwrite=True)
    assert dst.read_bytes() == (tmp_path / "a.raw").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.raw", "exists", "pool"]  # no temporary left


def test_export_of_missing_device_creates_nothing(pool, tmp_path):
    with pytest.raises(DeviceNotFoundError):
        transfer.export_file(pool, "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_to_character_device(pool, tmp_path):
    make_file(tmp_path / "a.raw", [("data", 4096), ("hole", 8192)])
    transfer.import_file(pool, "a", tmp_path / "a.raw")
    with pytest.raises(InvalidArgumentError, match="exists already"):
        transfer.export_file(pool, "a", "/dev/null")
    assert transfer.export_file(pool, "a", "/dev/null", overwrite=True).length == 3 * 4096


def test_length_label_is_reserved(pool, tmp_path):
    make_file(tmp_path / "a.raw", [("data", 5000)])
    transfer.import_file(pool, "a", tmp_path / "a.raw")
    for call in (lambda: pool.set_labels("a", {transfer.LENGTH_LABEL: "99999"}),
                 lambda: pool.update("a", labels={transfer.LENGTH_LABEL: ""}),
                 lambda: pool.create_thin("b", 8192, labels={transfer.LENGTH_LABEL: "5000"}),
                 lambda: pool.snapshot("a", "b", labels={transfer.LENGTH_LABEL: "5"})):
        with pytest.raises(InvalidArgumentError, match="'cowblock.length' is a reserved label"):
            call()
    pool.set_labels("a", {"mine": "x"})   # the user's labels go; cowblock's own stay
    assert pool.info("a").labels == {"mine": "x", transfer.LENGTH_LABEL: "5000"}
    assert "b" not in pool and transfer.device_length(pool, "a") == 5000


@pytest.mark.parametrize("text", ["99999", "4096", "0", "-5", "5_000", " 5000", "x", "4095"])
def test_a_length_label_that_does_not_fit_the_size_is_not_applied(pool, tmp_path, text):
    """What a resize cut short by a crash could leave (or a label of another
    version): the whole device is exported, nothing of it is lost."""
    make_file(tmp_path / "a.raw", [("data", 8192)])
    transfer.import_file(pool, "a", tmp_path / "a.raw")
    pool.set_labels("a", {transfer.LENGTH_LABEL: text}, _internal=True)
    assert transfer.export_file(pool, "a", tmp_path / "out").length == 8192
    assert (tmp_path / "out").read_bytes() == (tmp_path / "a.raw").read_bytes()


def test_snapshots_keep_the_length_and_a_resize_drops_it(pool, tmp_path):
    content = make_file(tmp_path / "odd.raw", [("data", 10_000_003)])
    transfer.import_file(pool, "odd", tmp_path / "odd.raw")
    pool.snapshot("odd", "s1")
    pool.snapshot("s1", "s2", read_only=True, labels={"tier": "x"})
    for name in ("odd", "s1", "s2"):
        assert transfer.device_length(pool, name) == 10_000_003
        transfer.export_file(pool, name, tmp_path / f"{name}.out")
        assert (tmp_path / f"{name}.out").read_bytes() == content, name
    info = pool.resize_device("s1", by=4096)
    assert info.size == transfer.round_up(10_000_003) + 4096
    assert transfer.LENGTH_LABEL not in info.labels
    assert transfer.device_length(pool, "s1") == info.size
    info = pool.rollback("s1", "s2")   # its content again, so its length again
    assert info.size == transfer.round_up(10_000_003)
    assert transfer.device_length(pool, "s1") == 10_000_003


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_export_makes_files_as_the_umask_says(pool, tmp_path, umask):
    make_file(tmp_path / "a.raw", [("data", 5000)])
    transfer.import_file(pool, "a", tmp_path / "a.raw")
    old = os.umask(umask)
    try:
        transfer.export_file(pool, "a", tmp_path / "new")
        if QEMU_IMG:
            transfer.export_file(pool, "a", tmp_path / "new.qcow2", fmt="qcow2")
            assert os.stat(tmp_path / "new.qcow2").st_mode & 0o777 == 0o666 & ~umask
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "new").st_mode & 0o777 == 0o666 & ~umask
    os.chmod(tmp_path / "new", 0o640)   # a replaced file keeps its mode
    transfer.export_file(pool, "a", tmp_path / "new", overwrite=True)
    assert os.stat(tmp_path / "new").st_mode & 0o777 == 0o640


def test_empty_source_is_refused_and_leaves_nothing(pool, tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(InvalidArgumentError, match="empty"):
        transfer.import_file(pool, "e", tmp_path / "empty")
    with pytest.raises(InvalidArgumentError, match="empty"):
        transfer.import_file(pool, "e", io.BytesIO(b""))
    assert "e" not in pool


def test_existing_name_and_missing_file(pool, tmp_path):
    make_file(tmp_path / "a.raw", [("data", 4096)])
    transfer.import_file(pool, "a", tmp_path / "a.raw")
    with pytest.raises(DeviceExistsError):
        transfer.import_file(pool, "a", tmp_path / "a.raw")
    with pytest.raises(InvalidArgumentError, match="no file"):
        transfer.import_file(pool, "b", tmp_path / "missing")
    with pytest.raises(InvalidArgumentError, match="not valid"):
        transfer.import_file(pool, "bad name", tmp_path / "a.raw")
    assert [i.name for i in pool.list()] == ["a"]


def test_full_pool_removes_the_half_import(tmp_path):
    with Pool.create(tmp_path / "small", 16 * 65536, 65536, commit_interval=0) as pool:
        make_file(tmp_path / "big.raw", [("data", 2 * MiB)])
        with pytest.raises(NoSpaceError):
            transfer.import_file(pool, "big", tmp_path / "big.raw")
        assert "big" not in pool
        pool.commit()
        assert pool.stats().data_used == 0
        assert pool.check().ok


@needs_qemu
def test_qcow2_import_and_export(pool, tmp_path):
    raw = tmp_path / "disk.raw"
    content = make_file(raw, [("data", 100_352), ("hole", MiB), ("zero", 65536),
                              ("data", 4096 * 5 + 512)])  # a multiple of 512, as qcow2 needs
    qcow = tmp_path / "disk.qcow2"
    subprocess.run([QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)],
                   check=True)
    assert transfer.detect_format(qcow) == "qcow2"
    assert transfer.detect_format(raw) == "raw"
    transfer.import_file(pool, "q", qcow)
    assert pool.device("q").pread(len(content), 0) == content
    assert pool.info("q").labels[transfer.LENGTH_LABEL] == str(len(content))
    assert pool.stats().data_used == used_blocks(content, pool.block_size)

    out = tmp_path / "out.qcow2"
    result = transfer.export_file(pool, "q", out, fmt="qcow2")
    assert result.format == "qcow2"
    assert transfer.detect_format(out) == "qcow2"
    subprocess.run([QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", str(raw), str(out)],
                   check=True, capture_output=True)
    # no temporary raw file left beside the pool or the destination
    assert sorted(os.listdir(tmp_path)) == ["disk.qcow2", "disk.raw", "out.qcow2", "pool"]


@needs_qemu
def test_qcow2_through_streams(pool, tmp_path, monkeypatch):
    raw = tmp_path / "disk.raw"
    content = make_file(raw, [("data", 65536), ("hole", 65536)])
    qcow = tmp_path / "disk.qcow2"
    subprocess.run([QEMU_IMG, "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
    transfer.import_file(pool, "q", io.BytesIO(qcow.read_bytes()), fmt="qcow2")
    assert pool.device("q").pread(len(content), 0) == content
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out))
    transfer.export_file(pool, "q", "-", fmt="qcow2")
    (tmp_path / "back.qcow2").write_bytes(out.getvalue())
    subprocess.run([QEMU_IMG, "compare", str(raw), str(tmp_path / "back.qcow2")], check=True,
                   capture_output=True)


@needs_qemu
def test_unknown_format_is_an_invalid_argument(pool, tmp_path):
    make_file(tmp_path / "a.raw", [("data", 4096)])
    transfer.import_file(pool, "a", tmp_path / "a.raw")
    with pytest.raises(InvalidArgumentError, match="qemu-img convert failed"):
        transfer.export_file(pool, "a", tmp_path / "a.out", fmt="nosuchformat")
    assert not (tmp_path / "a.out").exists()
    with pytest.raises(InvalidArgumentError, match="not a format name"):
        transfer.export_file(pool, "a", tmp_path / "a.out", fmt="raw; rm -rf /")


def test_without_qemu_img(pool, tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "qemu_img_path", lambda: None)
    qcow_like = tmp_path / "fake.qcow2"
    qcow_like.write_bytes(b"QFI\xfb" + bytes(4092))
    with pytest.raises(InvalidArgumentError, match="qcow2 image and qemu-img is not installed"):
        transfer.import_file(pool, "q", qcow_like)
    transfer.import_file(pool, "q", qcow_like, fmt="raw")  # its bytes as they are
    assert pool.device("q").pread(4, 0) == b"QFI\xfb"
    make_file(tmp_path / "plain.raw", [("data", 4096)])
    assert transfer.detect_format(tmp_path / "plain.raw") == "raw"
    with pytest.raises(InvalidArgumentError, match="qemu-img is not installed"):
        transfer.export_file(pool, "q", tmp_path / "q.qcow2", fmt="qcow2")


def test_nonzero_runs():
    g = 4096
    buf = bytearray(10 * g + 100)
    buf[0] = 1
    buf[3 * g + 5] = 1
    buf[4 * g] = 1
    buf[10 * g + 99] = 1
    assert transfer.nonzero_runs(buf) == [(0, g), (3 * g, 5 * g), (10 * g, 10 * g + 100)]
    assert transfer.nonzero_runs(bytes(3 * g)) == []
    assert transfer.nonzero_runs(b"") == []
    assert transfer.nonzero_runs(b"\0\0x") == [(0, 3)]
