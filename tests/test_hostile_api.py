"""Hostile use of the public API: a hypothesis state machine over Pool,
Device and DeviceFile (as cowblock exports them) that interleaves valid
operations with invalid ones: negative, huge (past 2^64), unaligned and
non-integer offsets, lengths and sizes; empty, over-long, NUL, slash and
non-str names; unknown and deleted devices and stale handles; writes to
read-only devices and to a read-only pool; closed pools, devices and files.

Every invalid call must raise a cowblock error (TypeError for an object
that is not a buffer, io's errors for a file used against its mode or after
close) with a message, and change nothing: after every step every device
reads, sizes, flags and labels exactly as a plain in-memory model says, and
pool.check() is clean at the end.  COWBLOCK_EXAMPLES sets the number of
examples, as for tests/test_property.py.
"""
import errno
import io
import math
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from cowblock import (CowblockError, DeviceExistsError, DeviceFile, DeviceNotFoundError,
                      InvalidArgumentError, Pool, PoolClosedError, PoolExistsError,
                      PoolLockedError, PoolNotFoundError, ProtectedError, ReadOnlyError)
from cowblock._native import ffi, lib
from cowblock.catalog import NAME_RE
from helpers import Model, assert_matches, pattern

U64 = 1 << 64
NAMES = st.text("abcdefgh", min_size=1, max_size=3)

# Not a valid name for a new device.
BAD_NAMES = st.one_of(
    st.sampled_from(["", "a" * 129, "a\0b", "\0", "a/b", "/", "../a", ".", "..", "-a", ".a",
                     "_a", "a b", "a\n", "é", "a\x7f", "\U0001f4a5", "a,b", "a*b", "$x",
                     "a\\b", " a", "a" * 4000]),
    st.text(min_size=1, max_size=6).filter(lambda s: not NAME_RE.match(s)),
    st.text("ab", min_size=129, max_size=300),
    st.none(), st.integers(), st.floats(), st.booleans(), st.binary(max_size=4),
    st.lists(st.integers(), max_size=2), st.tuples(st.text("ab", max_size=2)),
    st.dictionaries(st.text("ab", max_size=1), st.integers(), max_size=1),
)

# Not an integer from 0 to 2^64-1.
NOT_U64 = st.one_of(
    st.integers(max_value=-1), st.integers(min_value=U64), st.sampled_from([-1, U64, 1 << 70]),
    st.floats(allow_nan=True, allow_infinity=True), st.just(4096.0),
    st.text(max_size=4), st.binary(max_size=2), st.none(), st.lists(st.integers(), max_size=1),
    st.complex_numbers(max_magnitude=10),
)
NOT_U64_OR_BOOL = st.one_of(NOT_U64, st.booleans())


class HostileModel(Model):
    """helpers.Model plus labels, origins, rename and rollback."""

    def __init__(self, block_size):
        super().__init__(block_size)
        self.labels = {}
        self.origins = {}   # name -> origin name, None once the origin is gone

    def create(self, name, size):
        super().create(name, size)
        self.labels[name] = {}
        self.origins[name] = None

    def snapshot(self, origin, name, read_only=False):
        super().snapshot(origin, name, read_only)
        self.labels[name] = {}
        self.origins[name] = origin

    def delete(self, name):
        super().delete(name)
        del self.labels[name]
        del self.origins[name]
        self.origins = {k: (None if v == name else v) for k, v in self.origins.items()}

    def rename(self, old, new):
        for table in (self.devs, self.read_only, self.labels, self.origins):
            table[new] = table.pop(old)
        self.origins = {k: (new if v == old else v) for k, v in self.origins.items()}

    def ancestors(self, name):
        out = []
        while self.origins.get(name) is not None and len(out) <= len(self.origins):
            name = self.origins[name]
            out.append(name)
        return out

    def related(self, a, b):
        """One is the other's origin, at any depth: a rollback between them is allowed."""
        return a in self.ancestors(b) or b in self.ancestors(a)

    def rollback(self, name, snap):
        self.devs[name] = bytearray(self.devs[snap])


class HostileMachine(RuleBasedStateMachine):
    block_size = 4096
    max_blocks = 24

    handles = Bundle("handles")   # Device objects, live, deleted or of a closed pool

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="cowblock-hostile-")
        self.path = os.path.join(self.dir, "pool")
        self.pool = Pool.create(self.path, 1024 * self.block_size, self.block_size,
                                commit_interval=0)
        self.model = HostileModel(self.block_size)
        self.ids = {}         # device id -> model name, None once deleted
        self.deleted = []     # names of deleted devices
        self.config = {}
        self.seed = 0

    def teardown(self):
        try:
            if self.pool._h is not None:
                if not self.pool.read_only:
                    report = self.pool.check()
                    assert report.ok, str(report)
                self.pool.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- helpers ----
    def refused(self, expected, fn, *args, **kwargs):
        """fn(*args, **kwargs) must raise one of expected, with a message."""
        try:
            result = fn(*args, **kwargs)
        except expected as e:
            msg = str(e)
            assert len(msg) >= 8, f"{type(e).__name__} without a clear message: {msg!r}"
            note(f"refused: {type(e).__name__}: {msg[:200]}")
            return e
        except Exception as e:
            raise AssertionError(f"{getattr(fn, '__name__', fn)}{args!r:.300}: expected "
                                 f"{expected}, got {type(e).__name__}: {e}") from e
        raise AssertionError(f"{getattr(fn, '__name__', fn)}{args!r:.300} was accepted "
                             f"(returned {result!r:.100}); expected {expected}")

    def live(self, name):
        return isinstance(name, str) and name in self.model.devs

    def pick(self, data, label="name"):
        """Mostly a live device's name; else a deleted one's, or any name."""
        live = sorted(self.model.devs)
        choices = [NAMES]
        if live:
            choices = [st.sampled_from(live)] * 3 + choices
        if self.deleted:
            choices.append(st.sampled_from(self.deleted))
        return data.draw(st.one_of(choices), label=label)

    def absent(self, data):
        """A name that is no device's now: a deleted or unused valid name,
        or one that is no name at all."""
        return data.draw(st.one_of(NAMES, BAD_NAMES).filter(lambda n: not self.live(n)),
                         label="absent name")

    def size_of(self, name):
        return len(self.model.devs[name])

    def span(self, name, data):
        size = self.size_of(name)
        off = data.draw(st.integers(0, size), label="offset")
        length = data.draw(st.integers(0, min(size - off, 3 * self.block_size)), label="length")
        return off, length

    def track(self, dev, name):
        self.ids[dev.id] = name
        return dev

    # ---- valid operations ----
    @initialize(target=handles)
    def first(self):
        self.model.create("base", 8 * self.block_size)
        return self.track(self.pool.create_thin("base", 8 * self.block_size), "base")

    @rule(target=handles, name=NAMES, blocks=st.integers(1, 24), extra=st.sampled_from([0, 4096]))
    def create(self, name, blocks, extra):
        size = blocks * self.block_size + (extra if self.block_size > 4096 else 0)
        if self.live(name):
            self.refused(DeviceExistsError, self.pool.create_thin, name, size)
            return self.pool.device(name)
        self.model.create(name, size)
        return self.track(self.pool.create_thin(name, size), name)

    @rule(target=handles, data=st.data(), name=NAMES, read_only=st.booleans())
    def snapshot(self, data, name, read_only):
        origin = self.pick(data, "origin")
        if not self.live(origin):
            self.refused(DeviceNotFoundError, self.pool.snapshot, origin, name, read_only)
            return self.pool.device("base") if self.live("base") else None
        if self.live(name):
            self.refused(DeviceExistsError, self.pool.snapshot, origin, name, read_only)
            return self.pool.device(name)
        self.model.snapshot(origin, name, read_only)
        return self.track(self.pool.snapshot(origin, name, read_only=read_only), name)

    @rule(data=st.data())
    def write(self, data):
        name = self.pick(data)
        if not self.live(name):
            return
        off, length = self.span(name, data)
        self.seed += 1
        buf = pattern(self.seed, length)
        dev = self.pool.device(name)
        if self.model.read_only[name]:
            self.refused(ReadOnlyError, dev.pwrite, buf, off)
            return
        assert dev.pwrite(buf, off) == length
        self.model.write(name, off, buf)

    @rule(data=st.data(), zeroes=st.booleans(), may_unmap=st.booleans())
    def unmap(self, data, zeroes, may_unmap):
        name = self.pick(data)
        if not self.live(name):
            return
        off, length = self.span(name, data)
        dev = self.pool.device(name)
        call = ((lambda: dev.write_zeroes(off, length, may_unmap=may_unmap)) if zeroes
                else (lambda: dev.discard(off, length)))
        if self.model.read_only[name]:
            self.refused(ReadOnlyError, call)
            return
        call()
        if zeroes:
            self.model.write_zeroes(name, off, length)
        else:
            self.model.discard(name, off, length)

    @rule(data=st.data())
    def block_status(self, data):
        name = self.pick(data)
        if not self.live(name):
            return
        off, length = self.span(name, data)
        extents = self.pool.device(name).block_status(off, length)
        pos = off
        for e in extents:
            assert e.offset == pos and e.length > 0, extents
            pos += e.length
        assert pos == off + length or (not extents and length == 0), extents

    @rule(data=st.data())
    def delete(self, data):
        name = self.pick(data)
        if not self.live(name):
            self.refused(DeviceNotFoundError, self.pool.delete, name)
            return
        did = self.pool.info(name).id
        self.pool.delete(name)
        self.model.delete(name)
        self.ids[did] = None

    @rule(data=st.data(), blocks=st.integers(1, 30), extra=st.sampled_from([0, 4096]))
    def resize(self, data, blocks, extra):
        name = self.pick(data)
        if not self.live(name):
            return
        size = blocks * self.block_size + extra
        dev = self.pool.device(name)
        if self.model.read_only[name]:
            self.refused(ReadOnlyError, dev.resize, size)
            return
        dev.resize(size)
        self.model.resize(name, size)

    @rule(data=st.data(), new=NAMES)
    def rename(self, data, new):
        old = self.pick(data, "old")
        if not self.live(old):
            self.refused(DeviceNotFoundError, self.pool.rename, old, new)
        elif old == new:
            self.pool.rename(old, new)
        elif self.live(new):
            self.refused(DeviceExistsError, self.pool.rename, old, new)
        else:
            did = self.pool.info(old).id
            self.pool.rename(old, new)
            self.model.rename(old, new)
            self.ids[did] = new

    @rule(data=st.data(), flag=st.booleans())
    def set_read_only(self, data, flag):
        name = self.pick(data)
        if not self.live(name):
            self.refused(DeviceNotFoundError, self.pool.set_read_only, name, flag)
            return
        self.pool.set_read_only(name, flag)
        self.model.read_only[name] = flag

    @rule(data=st.data(), labels=st.dictionaries(st.text("xyz", max_size=3),
                                                 st.text(max_size=5), max_size=3))
    def set_labels(self, data, labels):
        name = self.pick(data)
        if not self.live(name):
            self.refused(DeviceNotFoundError, self.pool.set_labels, name, labels)
            return
        self.pool.set_labels(name, labels)
        self.model.labels[name] = dict(labels)

    @rule(data=st.data(), force=st.booleans())
    def rollback(self, data, force):
        name, snap = self.pick(data), self.pick(data, "snapshot")
        if not self.live(name) or not self.live(snap):
            self.refused(DeviceNotFoundError, self.pool.rollback, name, snap)
        elif self.model.read_only[name]:
            self.refused(ReadOnlyError, self.pool.rollback, name, snap)
        elif name == snap:
            self.refused(InvalidArgumentError, self.pool.rollback, name, snap)
        elif not force and not self.model.related(name, snap):   # not of its lineage
            self.refused(ProtectedError, self.pool.rollback, name, snap)
        else:
            self.pool.rollback(name, snap, force=force)
            self.model.rollback(name, snap)

    @rule()
    def commit(self):
        self.pool.commit()

    @rule()
    def reopen(self):
        self.pool.close()
        self.pool = Pool.open(self.path, commit_interval=0)
        report = self.pool.check()
        assert report.ok, str(report)

    @rule(blocks=st.integers(0, 64))
    def grow_pool(self, blocks):
        s = self.pool.stats()
        if s.data_blocks + blocks <= 4096:
            self.pool.resize((s.data_blocks + blocks) * self.block_size)

    # ---- invalid operations ----
    @rule(name=BAD_NAMES, which=st.sampled_from(["create", "snapshot", "rename"]))
    def bad_new_name(self, name, which):
        existing = next(iter(self.model.devs), None)
        if which == "create":
            self.refused(InvalidArgumentError, self.pool.create_thin, name, 4096)
        elif existing is None:
            return
        elif which == "snapshot":
            self.refused(InvalidArgumentError, self.pool.snapshot, existing, name)
        else:
            self.refused(InvalidArgumentError, self.pool.rename, existing, name)

    @rule(data=st.data())
    def absent_name(self, data):
        name = self.absent(data)
        other = next(iter(self.model.devs), "zz")
        pool = self.pool
        assert (name in pool) is False
        for call in (lambda: pool.info(name), lambda: pool.device(name),
                     lambda: pool.delete(name), lambda: pool.usage(name),
                     lambda: pool.set_read_only(name, True), lambda: pool.set_labels(name, {}),
                     lambda: pool.snapshot(name, "fresh0"), lambda: pool.rename(name, "fresh0"),
                     lambda: pool.rollback(name, other), lambda: pool.rollback(other, name),
                     lambda: list(pool.diff(name, other)),
                     lambda: pool.mappings(name) if name is not None else pool.device(name),
                     lambda: pool.add_mappings(name, [])):
            self.refused(DeviceNotFoundError, call)

    @rule(data=st.data(),
          op=st.sampled_from(["pread", "readinto", "pwrite", "discard", "write_zeroes",
                              "block_status"]))
    def bad_range(self, data, op):
        """Offsets and lengths that are not integers in range, or run past
        the end."""
        name = self.pick(data)
        if not self.live(name):
            return
        size = self.size_of(name)
        dev = self.pool.device(name)
        # pread/readinto/pwrite take bools as the ints they are (the hot path is cffi's)
        bad = NOT_U64 if op in ("pread", "readinto", "pwrite") else NOT_U64_OR_BOOL
        past = st.one_of(
            st.tuples(st.integers(size + 1, U64 - 1), st.integers(0, 4096)),
            st.tuples(st.integers(0, size), st.integers(1, U64 - 1)).filter(
                lambda t: t[0] + t[1] > size))
        kind = data.draw(st.sampled_from(["offset", "length", "past"]), label="kind")
        if kind == "past":
            off, length = data.draw(past, label="past the end")
        elif kind == "offset":
            off, length = data.draw(bad, label="offset"), data.draw(st.integers(0, 64))
        else:
            off, length = data.draw(st.integers(0, size)), data.draw(bad, label="length")
        expected = (InvalidArgumentError,)
        if op in ("pwrite", "discard", "write_zeroes") and self.model.read_only[name]:
            expected += (ReadOnlyError,)
        if op == "pread":
            self.refused(expected, dev.pread, length, off)
        elif op == "readinto":
            if not isinstance(length, int) or not 0 <= length <= 1 << 16:
                return  # the buffer's length is the length: nothing to refuse
            self.refused(expected, dev.readinto, bytearray(length), off)
        elif op == "pwrite":
            if not isinstance(length, int) or not 0 <= length <= 1 << 16:
                return
            self.refused(expected, dev.pwrite, b"x" * length, off)
        elif op == "discard":
            self.refused(expected, dev.discard, off, length)
        elif op == "write_zeroes":
            self.refused(expected, dev.write_zeroes, off, length)
        elif length is not None:  # None: to the end
            self.refused(expected, dev.block_status, off, length)

    @rule(data=st.data(), length=st.sampled_from([1 << 40, 1 << 62, U64 - 1, 1 << 33]))
    def huge_read(self, data, length):
        """A read far past the end is refused before a buffer is allocated
        for it (it used to try, and raise MemoryError or take all memory)."""
        name = self.pick(data)
        if self.live(name):
            self.refused(InvalidArgumentError, self.pool.device(name).pread, length, 0)

    @rule(data=st.data(), which=st.sampled_from(["pwrite", "readinto"]),
          buf=st.sampled_from(["text", 5, None, [1, 2], "noncontig", "bytes", 3.5]))
    def bad_buffer(self, data, which, buf):
        name = self.pick(data)
        if not self.live(name):
            return
        dev = self.pool.device(name)
        if buf == "noncontig":
            buf = memoryview(bytearray(16))[::2]
        elif buf == "bytes":
            if which == "pwrite":
                return  # bytes are a fine source
            buf = b"read-only"
        expected = (TypeError,)
        if which == "pwrite" and self.model.read_only[name]:
            expected += (ReadOnlyError,)
        self.refused(expected, getattr(dev, which), buf, 0)

    @rule(name=NAMES, size=st.one_of(
        NOT_U64_OR_BOOL, st.sampled_from([0, 1, 4095, 4097, 6000, U64 - 1]),
        st.integers(1, 1 << 20).filter(lambda n: n % 4096),
        # more than 2^32 blocks, the ones near 2^64 included (they wrapped in C)
        st.integers(((1 << 32) * 65536 // 4096) + 1, (U64 >> 12) - 1).map(lambda n: n * 4096),
        st.sampled_from([U64 - 4096, U64 - 65536, (1 << 32) * 65536 + 4096, 1 << 63])))
    def bad_size(self, name, size):
        if isinstance(size, int) and not isinstance(size, bool) and 0 < size < U64 \
                and size % 4096 == 0 and -(-size // self.block_size) <= 1 << 32:
            return  # a valid size after all (huge sparse devices are fine)
        if not self.live(name):
            self.refused(InvalidArgumentError, self.pool.create_thin, name, size)
            return
        expected = (InvalidArgumentError,) + ((ReadOnlyError,) if self.model.read_only[name]
                                              else ())
        self.refused(expected, self.pool.device(name).resize, size)

    @rule(name=NAMES, labels=st.one_of(
        st.text(min_size=1, max_size=3), st.integers(), st.lists(st.integers(), min_size=1,
                                                                 max_size=2),
        st.dictionaries(st.text(max_size=2), st.one_of(st.integers(), st.none(), st.binary()),
                        min_size=1, max_size=2),
        st.dictionaries(st.integers(), st.text(max_size=2), min_size=1, max_size=2),
        st.just({"k": "v" * 5000})))
    def bad_labels(self, name, labels):
        if not self.live(name):
            self.refused(InvalidArgumentError, self.pool.create_thin, name, 4096, labels=labels)
            return
        self.refused(InvalidArgumentError, self.pool.set_labels, name, labels)

    @rule(handle=handles)
    def stale_handle(self, handle):
        """A handle of a deleted device, or of a closed Pool object."""
        if handle is None:
            return
        if handle.pool is not self.pool:
            expected = PoolClosedError
        elif self.ids.get(handle.id) is None:
            expected = DeviceNotFoundError
        else:  # a live handle: it sees its device, whatever its name now
            name = self.ids[handle.id]
            assert handle.name == name
            assert handle.size == self.size_of(name)
            assert handle.read_only == self.model.read_only[name]
            assert handle.pread(16, 0) == bytes(self.model.devs[name][:16])
            return
        calls = [lambda: handle.pread(1, 0), lambda: handle.readinto(bytearray(1), 0),
                 lambda: handle.pwrite(b"x", 0), lambda: handle.discard(0, 4096),
                 lambda: handle.write_zeroes(0, 4096), lambda: handle.block_status(),
                 lambda: handle.resize(8192), lambda: handle.size, lambda: handle.info(),
                 lambda: handle.read_only, lambda: handle.open("rb")]
        if expected is PoolClosedError:  # a flush commits the pool: no device involved
            calls.append(handle.flush)
        for call in calls:
            self.refused(expected, call)
        repr(handle)

    @rule(handle=handles)
    def closed_pool(self, handle):
        """Everything on a closed pool raises PoolClosedError, then it reopens."""
        pool = self.pool
        pool.close()
        pool.close()  # twice is fine
        assert "closed" in repr(pool)
        name = next(iter(self.model.devs), "base")
        for call in (pool.list, pool.stats, pool.commit, pool.check, pool.trim,
                     lambda: pool.config, lambda: pool.set_config({}), lambda: pool.info(name),
                     lambda: pool.device(name), lambda: pool.device("nope"),
                     lambda: pool.create_thin("fresh0", 4096), lambda: pool.snapshot(name, "s"),
                     lambda: pool.delete(name), lambda: pool.rename(name, "fresh0"),
                     lambda: pool.set_read_only(name, False), lambda: pool.set_labels(name, {}),
                     lambda: pool.usage(name), lambda: list(pool.diff(name, name)),
                     lambda: pool.resize(1 << 30), lambda: pool.resize_metadata(1 << 30),
                     lambda: pool.mappings(), lambda: pool.rollback(name, name)):
            self.refused(PoolClosedError, call)
        if handle is not None:
            for call in (lambda: handle.pread(1, 0), lambda: handle.pwrite(b"x", 0),
                         lambda: handle.size, lambda: handle.discard(0, 0), handle.flush):
                self.refused(PoolClosedError, call)
        self.pool = Pool.open(self.path, commit_interval=0)

    @rule(handle=handles)
    def read_only_pool(self, handle):
        """A pool opened read-only reads as the model and refuses every change."""
        self.pool.close()
        ro = Pool.open(self.path, read_only=True)
        try:
            assert_matches(ro, self.model)
            for name in list(self.model.devs)[:3]:
                dev = ro.device(name)
                for call in (lambda: dev.pwrite(b"x", 0), lambda: dev.discard(0, 4096),
                             lambda: dev.write_zeroes(0, 1), lambda: dev.resize(4096 * 3),
                             lambda: ro.delete(name), lambda: ro.rename(name, "fresh0"),
                             lambda: ro.set_read_only(name, True), lambda: ro.snapshot(name, "s"),
                             lambda: ro.set_labels(name, {"a": "b"})):
                    self.refused(ReadOnlyError, call)
            self.refused(ReadOnlyError, ro.create_thin, "fresh0", 4096)
            self.refused(ReadOnlyError, ro.resize, (ro.stats().data_blocks + 1) * self.block_size)
            self.refused(ReadOnlyError, ro.set_config, {"a": 1})
            assert ro.check().ok
        finally:
            ro.close()
        self.pool = Pool.open(self.path, commit_interval=0)

    @rule(size=st.one_of(NOT_U64_OR_BOOL, st.integers(1, 1 << 40), st.just(U64 - 1)),
          metadata=st.booleans())
    def bad_pool_resize(self, size, metadata):
        s = self.pool.stats()
        if metadata:
            current = s.metadata_capacity_bytes
            if isinstance(size, int) and not isinstance(size, bool) and size >= current \
                    and size % 4096 == 0 and size <= 1 << 30:
                return  # a valid growth
            if isinstance(size, int) and not isinstance(size, bool) and size > 1 << 30 \
                    and size % 4096 == 0 and size < 4 << 40:
                return  # valid, but slow to make
            self.refused(InvalidArgumentError, self.pool.resize_metadata, size)
        else:
            current = s.data_blocks * self.block_size
            if isinstance(size, int) and not isinstance(size, bool) and size >= current \
                    and size % self.block_size == 0:
                return  # a valid growth
            self.refused(InvalidArgumentError, self.pool.resize, size)

    @rule(settings=st.one_of(
        st.lists(st.integers(), max_size=2), st.integers(), st.text(max_size=3), st.none(),
        st.just({1, 2}), st.just({"health": "x"}), st.just({"health": {"bogus": 1}}),
        st.just({"health": {"min_free_space": 101}}), st.just({"health": {"hook": 5}}),
        st.just({"a": float("nan")}), st.just({"a": b"bytes"}), st.just({"a": "x" * 4000})))
    def bad_config(self, settings):
        self.refused(InvalidArgumentError, self.pool.set_config, settings)
        assert self.pool.config == self.config

    @rule(value=st.dictionaries(st.text("abc", max_size=3), st.integers(0, 9), max_size=3))
    def set_config(self, value):
        self.pool.set_config(value)
        self.config = value
        assert self.pool.config == value

    @rule(data=st.data(), pairs=st.one_of(
        st.integers(), st.text(min_size=1, max_size=2),
        st.lists(st.one_of(st.integers(), st.text(max_size=1), st.none()), min_size=1,
                 max_size=2),
        st.lists(st.tuples(st.integers(-5, -1), st.integers(0, 3)), min_size=1, max_size=2),
        st.lists(st.tuples(st.integers(0, 3), st.integers(1 << 32, 1 << 40)), min_size=1,
                 max_size=2),
        st.lists(st.tuples(st.just(0), st.integers(0, 3)), min_size=2, max_size=3),   # repeats
        st.lists(st.tuples(st.integers(0, 2), st.integers(1 << 20, 1 << 30)), min_size=1,
                 max_size=2),   # data blocks past the end of the pool
        st.just([(1 << 31, 0)])))   # a virtual block past the end of the device
    def bad_add_mappings(self, data, pairs):
        name = self.pick(data)
        if not self.live(name):
            self.refused(DeviceNotFoundError, self.pool.add_mappings, name, [])
            return
        expected = (InvalidArgumentError,) + ((ReadOnlyError,) if self.model.read_only[name]
                                              else ())
        self.refused(expected, self.pool.add_mappings, name, pairs)

    @rule(mode=st.sampled_from(["rb", "r+b"]), data=st.data())
    def device_file(self, mode, data):
        name = self.pick(data)
        if not self.live(name):
            return
        dev = self.pool.device(name)
        size = self.size_of(name)
        f = dev.open(mode)
        assert f.seekable() and f.readable() and f.writable() == (mode == "r+b")
        self.refused(InvalidArgumentError, f.seek, -data.draw(st.integers(1, 1 << 70)))
        self.refused(InvalidArgumentError, f.seek, 0, data.draw(st.sampled_from([3, -1, 99])))
        self.refused(TypeError, f.seek, data.draw(st.sampled_from([1.5, "1", None])))
        pos = data.draw(st.integers(0, size), label="pos")
        assert f.seek(pos) == pos
        n = data.draw(st.integers(0, 3 * self.block_size), label="n")
        assert f.read(n) == bytes(self.model.devs[name][pos:pos + n])
        assert f.tell() == min(pos + n, size)
        self.seed += 1
        buf = pattern(self.seed, data.draw(st.integers(1, 2 * self.block_size), label="w"))
        wpos = data.draw(st.integers(0, size + 10), label="wpos")
        f.seek(wpos)
        if mode == "rb":
            self.refused(io.UnsupportedOperation, f.write, buf)
        elif self.model.read_only[name]:
            self.refused((ReadOnlyError, CowblockError), f.write, buf)
        elif wpos + len(buf) > size:
            self.refused(CowblockError, f.write, buf)   # NoSpaceError: past the end
        else:
            assert f.write(buf) == len(buf)
            self.model.write(name, wpos, buf)
        assert f.seek(0, io.SEEK_END) == size
        assert f.read(10) == b""
        f.close()
        self.refused(ValueError, f.read, 1)
        self.refused(ValueError, f.seek, 0)

    @rule(which=st.sampled_from(["nul", "exists", "block", "data", "metadata", "interval",
                                 "missing", "locked", "timeout", "nul-open", "type", "toobig"]),
          value=st.one_of(NOT_U64_OR_BOOL, st.sampled_from([0, 1, 4095, 3 << 12, 1 << 31])))
    def bad_pool_args(self, which, value):
        """Pool.create and Pool.open refuse bad arguments and leave no trace."""
        before = sorted(os.listdir(self.dir))
        new = os.path.join(self.dir, "other")
        if which == "nul":
            self.refused(InvalidArgumentError, Pool.create, new + "\0x", 1 << 20, 4096)
        elif which == "nul-open":
            self.refused(InvalidArgumentError, Pool.open, self.path + "\0")
        elif which == "type":
            if isinstance(value, (str, bytes)):
                return  # a path after all (relative)
            self.refused(InvalidArgumentError, Pool.create, value, 1 << 20, 4096)
        elif which == "toobig":
            self.refused(InvalidArgumentError, Pool.create, new, (U64 - 1) >> 12 << 12, 4096)
        elif which == "exists":
            self.refused(PoolExistsError, Pool.create, self.path, 1 << 20, 4096)
        elif which == "block":
            if value in (4096,) or isinstance(value, int) and not isinstance(value, bool) \
                    and 4096 <= value <= 1 << 30 and value & (value - 1) == 0:
                return
            self.refused(InvalidArgumentError, Pool.create, new, 1 << 20, value)
        elif which == "data":
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value < U64 \
                    and value % 4096 == 0:
                return
            self.refused(InvalidArgumentError, Pool.create, new, value, 4096)
        elif which == "metadata":
            if isinstance(value, int) and not isinstance(value, bool) and (
                    value == 0 or (value % 4096 == 0 and 64 << 10 <= value <= 1 << 32)):
                return
            self.refused(InvalidArgumentError, Pool.create, new, 1 << 20, 4096,
                         metadata_size=value)
        elif which == "interval":
            if value is None or isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value) and value >= 0:
                return
            self.refused(InvalidArgumentError, Pool.create, new, 1 << 20, 4096,
                         commit_interval=value)
        elif which == "missing":
            self.refused(PoolNotFoundError, Pool.open, new)
        elif which == "locked":
            self.refused(PoolLockedError, Pool.open, self.path)
        elif which == "timeout":
            if value is None or isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not math.isnan(value) and value >= 0:
                return  # a valid timeout (inf waits as None does)
            self.refused(InvalidArgumentError, Pool.open, self.path, timeout=value)
        assert sorted(os.listdir(self.dir)) == before

    # ---- the model ----
    @invariant()
    def matches_model(self):
        assert_matches(self.pool, self.model)
        for info in self.pool.list():
            assert info.read_only == self.model.read_only[info.name], info
            assert info.labels == self.model.labels[info.name], info
            assert self.ids.get(info.id) == info.name, (info, self.ids)


class HostileMachine64K(HostileMachine):
    block_size = 65536


EXAMPLES = int(os.environ.get("COWBLOCK_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=50, deadline=None,
                    suppress_health_check=list(HealthCheck))

TestHostile4K = HostileMachine.TestCase
TestHostile4K.settings = SETTINGS
TestHostile64K = HostileMachine64K.TestCase
TestHostile64K.settings = settings(SETTINGS, max_examples=max(EXAMPLES // 2, 1))


# ---- regressions: what the machine and the control-socket fuzzer found ----

@pytest.fixture
def pool64k(tmp_path):
    with Pool.create(tmp_path / "p", 64 << 20, 65536, commit_interval=0) as pool:
        yield pool
        assert pool.check().ok


def test_huge_pread_is_refused_before_allocating(pool64k):
    """pread allocated its buffer before C checked the range: a length of
    2^40 raised MemoryError, 2^33 took 8 GiB for seconds, 2^64 OverflowError."""
    dev = pool64k.create_thin("d", 1 << 20)
    for length in (1 << 33, 1 << 40, 1 << 62, U64 - 1):
        with pytest.raises(InvalidArgumentError, match="past the end"):
            dev.pread(length, 0)
    for length in (U64, -1, 1.0, "1"):
        with pytest.raises(InvalidArgumentError, match="length"):
            dev.pread(length, 0)
    with pytest.raises(InvalidArgumentError, match="offset"):
        dev.pread(2 << 20, -1)
    assert dev.pread(1 << 20, 0) == bytes(1 << 20)


def test_device_sizes_within_a_block_of_2_64_are_refused(pool64k):
    """C's check of 2^32 blocks rounded the size up in 64 bits, which wrapped
    for sizes past 2^64 - block size: such a device was accepted, its block
    numbers were cut to 32 bits, a write at 2^48 landed on block 0 and
    pool.check() found the mapping tree corrupt.  Checked through the C API
    too, since other tools call it directly."""
    for size in ((1 << 64) - 4096, (1 << 64) - 61440, (1 << 48) + 4096):
        with pytest.raises(InvalidArgumentError, match="2\\^32 blocks"):
            pool64k.create_thin("big", size)
    assert "big" not in pool64k
    dev = pool64k.create_thin("max", 1 << 48)     # exactly 2^32 blocks is fine
    dev.pwrite(b"end", (1 << 48) - 3)
    assert dev.pread(3, (1 << 48) - 3) == b"end" and dev.pread(3, 0) == bytes(3)
    with pytest.raises(InvalidArgumentError, match="2\\^32 blocks"):
        dev.resize((1 << 64) - 4096)
    assert dev.size == 1 << 48
    out = ffi.new("uint32_t *")
    assert lib.cb_dev_create(pool64k._handle(), (1 << 64) - 4096, ffi.NULL, b"", 0, out) == -errno.EINVAL
    assert lib.cb_dev_resize(pool64k._handle(), dev.id, (1 << 64) - 4096) == -errno.EINVAL


def test_pool_paths_with_nul_bytes_create_nothing(tmp_path):
    """A NUL cut the path short in C: Pool.create("dir/x\\0y") made a pool at
    dir/x, then failed to open dir/x\\0y (PoolNotFoundError)."""
    with pytest.raises(InvalidArgumentError, match="NUL"):
        Pool.create(str(tmp_path / "x\0y"), 1 << 20, 4096)
    with pytest.raises(InvalidArgumentError, match="NUL"):
        Pool.open(str(tmp_path / "x\0y"))
    assert os.listdir(tmp_path) == []
    with Pool.create(os.fsencode(tmp_path / "bytes"), 1 << 20, 4096) as pool:  # bytes paths work
        assert pool.path == str(tmp_path / "bytes")
    with pytest.raises(InvalidArgumentError, match="pool path"):
        Pool.open(5)


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "1", [1], True])
def test_commit_interval_is_checked(tmp_path, value):
    """commit_interval=-1 made the commit thread spin (commit without
    waiting), "1" or inf killed it with a traceback."""
    with pytest.raises(InvalidArgumentError, match="commit_interval"):
        Pool.create(tmp_path / "p", 1 << 20, 4096, commit_interval=value)
    assert not os.path.exists(tmp_path / "p")


@pytest.mark.parametrize("value", [-1, float("nan"), "1", [1], True])
def test_open_timeout_is_checked(tmp_path, value):
    Pool.create(tmp_path / "p", 1 << 20, 4096, commit_interval=0).close()
    with pytest.raises(InvalidArgumentError, match="timeout"):
        Pool.open(tmp_path / "p", timeout=value)
    Pool.open(tmp_path / "p", timeout=float("inf")).close()  # forever, as None


def test_set_config_refuses_what_would_break_the_pool(pool64k):
    """set_config({"health": "x"}) was stored, and from then on every
    create_thin and snapshot failed with TypeError (health settings are read
    from the config); a list config did the same."""
    for bad in ([1], {"health": "x"}, {"health": {"min_free_space": "5"}},
                {"health": {"bogus": 1}}, {"health": {"hook": 3}}, {"a": {1, 2}},
                {"a": float("nan")}, "text"):
        with pytest.raises(InvalidArgumentError):
            pool64k.set_config(bad)
    assert pool64k.config == {}
    pool64k.set_config({"health": {"min_free_space": 0, "hook": None}, "other": [1]})
    pool64k.create_thin("d", 4096)
    # a bad config stored by something else is ignored, not fatal
    blob = b'{"health":"x"}'
    assert lib.cb_pool_set_config(pool64k._h, blob, len(blob)) == 0
    pool64k.create_thin("e", 4096)


def test_bad_labels_and_mappings_are_invalid_arguments(pool64k):
    """Labels that are no dict raised ValueError or TypeError from dict();
    mappings out of range OverflowError from cffi."""
    pool64k.create_thin("d", 1 << 20)
    for labels in ("ab", 5, [1], {"a": 1}, {1: "a"}):
        with pytest.raises(InvalidArgumentError, match="label"):
            pool64k.set_labels("d", labels)
        with pytest.raises(InvalidArgumentError, match="label"):
            pool64k.create_thin("e", 4096, labels=labels)
    for pairs in (5, [(-1, 0)], [(0, 1 << 32)], [(0,)], [None], ["ab"], [(0, 1.5)]):
        with pytest.raises(InvalidArgumentError, match="mappings"):
            pool64k.add_mappings("d", pairs)
    assert pool64k.info("d").labels == {} and "e" not in pool64k


def test_unhashable_names_and_closed_pools(pool64k):
    pool64k.create_thin("d", 1 << 20)
    assert ["d"] not in pool64k and {} not in pool64k
    with pytest.raises(DeviceNotFoundError):
        pool64k.device(["d"])


def test_a_closed_pool_says_so_for_every_name(tmp_path):
    """pool.device(name) on a closed pool returned a Device, and unknown
    names gave DeviceNotFoundError: PoolClosedError now, for all."""
    pool = Pool.create(tmp_path / "p", 1 << 20, 4096, commit_interval=0)
    pool.create_thin("d", 8192)
    pool.close()
    for call in (lambda: pool.device("d"), lambda: pool.device("nope"), lambda: pool.info("nope"),
                 lambda: pool.delete("nope"), lambda: pool.snapshot("d", "e")):
        with pytest.raises(PoolClosedError):
            call()


def test_buffers_and_files_raise_the_documented_errors(pool64k):
    dev = pool64k.create_thin("d", 1 << 20)
    with pytest.raises(TypeError, match="writable"):
        dev.readinto(b"bytes are read-only", 0)
    with pytest.raises(TypeError, match="contiguous"):
        dev.readinto(memoryview(bytearray(8))[::2], 0)
    with pytest.raises(TypeError, match="contiguous"):
        dev.pwrite(memoryview(b"abcdefgh")[::2], 0)
    with dev.open("r+b") as f:
        with pytest.raises(InvalidArgumentError, match="whence"):
            f.seek(0, 7)           # was KeyError: 7
        with pytest.raises(TypeError):
            f.seek(1.5)            # was accepted, then failed in the next read
        with pytest.raises(InvalidArgumentError, match="before the start"):
            f.seek(-1)
    with DeviceFile(dev, "wb") as f:
        with pytest.raises(io.UnsupportedOperation):
            f.read(1)              # a write-only file read
