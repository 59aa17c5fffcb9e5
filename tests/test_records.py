"""The records store through the API: every call and its errors, many keys,
large values, prefix listing with cursors, keys with spaces and any bytes,
persistence, metadata space, and pools of older builds."""
import os
import random

import pytest

from cowblock import (InvalidArgumentError, MetadataSpaceError, Pool, PoolClosedError,
                      ReadOnlyError, format)
from cowblock.records import KEY_MAX, VALUE_MAX, Record

BS = 4096


@pytest.fixture(params=[0, 3], ids=["full-nodes", "capacity-3"])
def pool(tmp_path, request):
    """A pool; with capacity 3, every records node holds at most 3 entries,
    so that splits and deep trees happen with few records."""
    p = Pool.create(tmp_path / "p", 512 * BS, BS, metadata_size=64 << 20, commit_interval=0,
                    _node_capacity=request.param)
    yield p
    if p._h is not None:
        if not p.stats().read_only:
            report = p.check()
            assert report.ok, str(report)
        p.close()


def reopen(pool, **kw):
    path = pool.path
    pool.close()
    return Pool.open(path, commit_interval=0, **kw)


def test_put_get_replace_delete(pool):
    assert pool.get_record("a") is None and pool.record_count() == 0
    txn = pool.stats().transaction_id
    pool.put_record("a", b"1")
    assert pool.stats().transaction_id == txn + 1          # committed before it returned
    assert pool.get_record("a") == b"1" and pool.get_record(b"a") == b"1"
    pool.put_record("a", b"22")                             # replace
    assert pool.get_record("a") == b"22" and pool.record_count() == 1
    pool.put_record("empty", b"")
    assert pool.get_record("empty") == b""
    assert pool.delete_record("a") is True
    assert pool.delete_record("a") is False
    assert pool.get_record("a") is None
    assert [r.key for r in pool.records()] == [b"empty"]


def test_keys_with_spaces_binary_bytes_and_text(pool):
    keys = [b"default/1/my snapshot", b"\x00", b"\x00\x00", b"\xff" * 7, "caf\u00e9 ns/\u00fc",
            b"a\nb\tc\r", bytes(range(256)), b" ", b"x" * KEY_MAX]
    for i, k in enumerate(keys):
        pool.put_record(k, b"v%d" % i)
    as_bytes = [k.encode() if isinstance(k, str) else k for k in keys]
    for i, k in enumerate(as_bytes):
        assert pool.get_record(k) == b"v%d" % i
    assert [r.key for r in pool.records()] == sorted(as_bytes)
    assert pool.get_record(bytearray(b"\x00")) == b"v1"
    assert pool.get_record(memoryview(b" ")) == b"v7"


@pytest.mark.parametrize("size", [0, 1, 300, 1300, 1400, 4064, 4065, 50_000, 4 << 20, VALUE_MAX])
def test_values_of_every_size_round_trip(pool, size):
    value = os.urandom(size)
    pool.put_record("k", value)
    assert pool.get_record("k") == value
    pool.put_record("k", value[: size // 2])             # a shorter one replaces it
    assert pool.get_record("k") == value[: size // 2]
    pool = reopen(pool)
    assert pool.get_record("k") == value[: size // 2]
    assert pool.check().ok
    pool.delete_record("k")
    pool.close()


def test_small_values_cost_no_block_of_their_own(pool):
    before = pool.stats().metadata_used_bytes
    with pool.atomic():
        for i in range(200):
            pool.put_record(f"k{i:03d}", b"v" * 40)
        pool.put_record("big", b"v" * 5000)
    with open(os.path.join(pool.path, "metadata"), "rb") as f:
        commit = format.Commit(f.read())
    assert len(commit.of_type(format.T_REC_VALUE)) == 2       # only the 5000 bytes
    if not pool.stats().node_capacity:   # 201 entries of ~52 bytes: three leaves and a root
        assert pool.stats().metadata_used_bytes - before <= 8 * BS


def test_bad_keys_and_values_are_refused(pool):
    for key, words in [("", "empty"), (b"", "empty"), (b"x" * (KEY_MAX + 1), "more than"),
                       (5, "not a str or bytes"), (None, "not a str or bytes"),
                       ("\ud800", "not valid text")]:
        for call in (lambda: pool.put_record(key, b"v"), lambda: pool.get_record(key),
                     lambda: pool.delete_record(key)):
            with pytest.raises(InvalidArgumentError) as e:
                call()
            assert words in str(e.value)
    with pytest.raises(InvalidArgumentError, match="encode text"):
        pool.put_record("k", "text")
    with pytest.raises(InvalidArgumentError, match="not bytes"):
        pool.put_record("k", 12)
    with pytest.raises(InvalidArgumentError, match="larger than"):
        pool.put_record("k", bytes(VALUE_MAX + 1))
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        pool.put_record("k", memoryview(b"abcdef")[::2])
    for bad in ({"limit": -1}, {"limit": 1.5}, {"limit": True}, {"prefix": 3},
                {"start_after": b"x" * (KEY_MAX + 1)}):
        with pytest.raises(InvalidArgumentError):
            pool.records(**bad)
    with pytest.raises(InvalidArgumentError):
        pool.record_count(prefix=b"x" * (KEY_MAX + 1))
    assert pool.record_count() == 0            # nothing got in


def test_many_keys_list_in_order_with_prefixes_and_cursors(pool):
    rng = random.Random(5)
    model = {}
    with pool.atomic():
        for i in range(3000):
            ns = rng.choice(["default", "k8s.io", "moby"])
            key = f"{ns}/{rng.randrange(10**6)}/snap {i}".encode()
            model[key] = os.urandom(rng.choice([0, 10, 200, 2000, 6000]))
            pool.put_record(key, model[key])
    assert pool.record_count() == len(model)
    everything = sorted(model.items())
    assert [tuple(r) for r in pool.records()] == everything
    for prefix in [b"", b"default/", b"k8s.io/1", b"moby/99", b"zzz", b"default/0"]:
        want = [kv for kv in everything if kv[0].startswith(prefix)]
        assert [tuple(r) for r in pool.records(prefix)] == want, prefix
        assert pool.record_count(prefix) == len(want)
        assert [r.key for r in pool.records(prefix, values=False)] == [k for k, _ in want]
        assert all(r.value is None for r in pool.records(prefix, values=False))
    # pages of 7 with the last key as the cursor give everything once, in order
    pages, after = [], None
    while True:
        page = list(pool.records(b"default/", start_after=after, limit=7))
        if not page:
            break
        pages += page
        after = page[-1].key
    assert [tuple(r) for r in pages] == [kv for kv in everything if kv[0].startswith(b"default/")]
    # a cursor from a key that is not there, and from before the prefix
    key = everything[100][0]
    assert [r.key for r in pool.records(start_after=key + b"\x00", limit=3)] == \
        [k for k, _ in everything[101:104]]
    assert [r.key for r in pool.records(b"moby/", start_after=b"a", limit=2)] == \
        [k for k, _ in everything if k.startswith(b"moby/")][:2]
    assert list(pool.records(limit=0)) == []
    # the listing goes on while the store changes under it: a page at a time
    # (PAGE_ENTRIES), each from the last key of the one before
    it = pool.records()
    assert next(it).key == everything[0][0]
    late = everything[2500][0]
    pool.delete_record(late)
    pool.put_record(late + b" new", b"n")
    rest = [r.key for r in it]
    assert late not in rest and late + b" new" in rest
    assert rest == sorted(set(model) - {everything[0][0], late} | {late + b" new"})


def test_records_persist_and_python_reads_what_c_wrote(pool):
    with pool.atomic():
        for i in range(100):
            pool.put_record(f"k {i}", bytes([i]) * (i * 97))
    pool = reopen(pool)
    with open(os.path.join(pool.path, "metadata"), "rb") as f:
        commit = format.Commit(f.read())
    assert list(commit.records()) == [tuple(r) for r in pool.records()]
    assert commit.sb.records_count == 100
    pool.close()


def space_map_pages(pool):
    with open(os.path.join(pool.path, "metadata"), "rb") as f:
        commit = format.Commit(f.read())
    return len(commit.of_type(format.T_SM_REFS) + commit.of_type(format.T_SM_INDEX))


def test_deleting_everything_frees_every_block(pool):
    empty, pages = pool.stats().metadata_used_bytes, space_map_pages(pool)
    with pool.atomic():
        for i in range(500):
            pool.put_record(b"%05d" % i, os.urandom(i * 20))
    assert pool.stats().metadata_used_bytes > empty
    order = list(range(500))
    random.Random(2).shuffle(order)
    with pool.atomic():
        for i in order:
            assert pool.delete_record(b"%05d" % i)
    pool.commit()
    assert pool.record_count() == 0 and list(pool.records()) == []
    # every block is back, but space map pages made meanwhile, which stay (FORMAT.md §6)
    assert pool.stats().metadata_used_bytes == empty + (space_map_pages(pool) - pages) * BS
    with open(os.path.join(pool.path, "metadata"), "rb") as f:
        sb = format.Commit(f.read()).sb
    assert sb.records_root == 0 and not sb.ro_compat & format.RO_COMPAT_RECORDS


def test_feature_flag_follows_the_store(pool):
    def flags():
        with open(os.path.join(pool.path, "metadata"), "rb") as f:
            return format.Commit(f.read()).sb.ro_compat
    assert flags() == 0
    pool.put_record("k", b"v")
    assert flags() == format.RO_COMPAT_RECORDS
    pool.delete_record("k")
    assert flags() == 0


def test_read_only_pool_reads_records_and_refuses_changes(pool):
    pool.put_record("k", b"v")
    pool = reopen(pool, read_only=True)
    assert pool.get_record("k") == b"v" and pool.record_count() == 1
    assert list(pool.records()) == [Record(b"k", b"v")]
    for call in (lambda: pool.put_record("k", b"w"), lambda: pool.delete_record("k")):
        with pytest.raises(ReadOnlyError):
            call()
    with pytest.raises(ReadOnlyError):
        pool.atomic().__enter__()
    assert pool.get_record("k") == b"v"
    pool.close()


def test_closed_pool(pool):
    pool.close()
    for call in (lambda: pool.put_record("k", b"v"), lambda: pool.get_record("k"),
                 lambda: pool.delete_record("k"), lambda: list(pool.records()),
                 lambda: pool.record_count(), lambda: pool.atomic().__enter__()):
        with pytest.raises(PoolClosedError):
            call()


def test_metadata_space_is_counted_and_kept_in_reserve(tmp_path):
    pool = Pool.create(tmp_path / "p", 64 * BS, BS, metadata_size=1 << 20, commit_interval=0)
    value = bytes(40 * BS)                  # 41 blocks a record
    stored = 0
    with pytest.raises(MetadataSpaceError) as e:
        for i in range(100):
            pool.put_record(f"k{i}", value)
            stored += 1
    assert "resize_metadata" in str(e.value) and 0 < stored < 10
    assert pool.record_count() == stored and pool.get_record(f"k{stored}") is None
    assert not pool.stats().read_only       # refused before anything changed
    assert pool.check().ok
    pool.create_thin("dev", 16 * BS)        # the reserve still lets the pool work
    pool.resize_metadata(4 << 20)
    pool.put_record(f"k{stored}", value)    # and after growing it, the put goes through
    assert pool.get_record(f"k{stored}") == value
    pool.delete_record("k0")
    assert pool.check().ok
    pool.close()


def test_records_and_devices_share_one_transaction_id(pool):
    pool.create_thin("a", 16 * BS)
    txn = pool.stats().transaction_id
    with pool.atomic():
        pool.create_thin("b", 16 * BS)
        pool.put_record("dev/b", b"b")
        pool.set_labels("a", {"x": "y"})
        pool.put_record("dev/a", b"a")
    assert pool.stats().transaction_id == txn + 1
    pool = reopen(pool)
    assert pool.get_record("dev/b") == b"b" and pool.info("a").labels == {"x": "y"}
    pool.close()
