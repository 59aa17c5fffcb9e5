"""The records calls through the pool daemon's control socket: the same API
and the same errors as on the Pool, values as bytes, while NBD clients and
other commands share the daemon."""
import os
import signal

import pytest

from cowblock import InvalidArgumentError, Pool, ReadOnlyError
from cowblock.control import client
from cowblock.runtime import RuntimeDir

BS = 4096


@pytest.fixture
def proxy(tmp_path):
    path = tmp_path / "pool"
    with Pool.create(path, 512 * BS, BS) as p:
        p.create_thin("base", 16 * BS)
    px, started = client.daemon(path, grace=30)
    assert started
    yield px
    px.close()
    pid = RuntimeDir(path).pid()
    if pid:
        os.kill(pid, signal.SIGKILL)


def test_records_through_the_daemon(proxy):
    big = os.urandom(200_000)
    proxy.put_record("default/1/my snap", b"small")
    proxy.put_record(b"\x00\xffbinary", big)
    proxy.put_record("default/2/other", b"")
    assert proxy.get_record("default/1/my snap") == b"small"
    assert proxy.get_record(b"\x00\xffbinary") == big
    assert proxy.get_record("absent") is None
    assert proxy.record_count() == 3 and proxy.record_count("default/") == 2
    assert [tuple(r) for r in proxy.records("default/")] == [
        (b"default/1/my snap", b"small"), (b"default/2/other", b"")]
    assert [r[0] for r in proxy.records(values=False)] == [
        b"\x00\xffbinary", b"default/1/my snap", b"default/2/other"]
    assert [r[0] for r in proxy.records(start_after=b"\x00\xffbinary", limit=1)] == [
        b"default/1/my snap"]
    assert proxy.delete_record("default/2/other") is True
    assert proxy.delete_record("default/2/other") is False
    assert "base" in proxy       # devices go on beside the records
    assert proxy.check().ok


def test_errors_through_the_daemon_are_the_pools(proxy):
    with pytest.raises(InvalidArgumentError, match="empty"):
        proxy.put_record("", b"v")
    with pytest.raises(InvalidArgumentError, match="encode text"):
        proxy.put_record("k", "text")
    with pytest.raises(InvalidArgumentError, match="more than 1024"):
        proxy.get_record(b"k" * 1025)
    with pytest.raises(InvalidArgumentError, match="limit"):
        proxy.records(limit=-1)


def test_a_listing_too_big_for_one_reply_says_how_to_page(proxy):
    from cowblock.control.protocol import MAX_READ
    value = bytes(4 << 20)
    for i in range(MAX_READ // len(value) + 1):
        proxy.put_record(f"big/{i}", value)
    with pytest.raises(InvalidArgumentError, match="page them with limit= and start_after="):
        proxy.records("big/")
    assert len(proxy.records("big/", limit=2)) == 2
    assert len(proxy.records("big/", values=False)) == MAX_READ // len(value) + 1


def test_a_read_only_pool_refuses_record_changes(tmp_path):
    path = tmp_path / "pool"
    Pool.create(path, 64 * BS, BS).close()
    with Pool.open(path, read_only=True) as ro:
        with pytest.raises(ReadOnlyError, match="read-only"):
            ro.put_record("k", b"v")
