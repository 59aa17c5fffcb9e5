"""The records store: keys to values, in the pool's metadata, committed in
the same transaction as the devices (csrc/records.c).

Keys are 1 to KEY_MAX bytes of anything (a str is taken as its UTF-8), kept
in bytewise order; values are bytes, up to VALUE_MAX.  Each change commits
before it returns, as device changes do, unless it is made inside
``pool.atomic()``: then it lands in the section's one commit, with whatever
else the section changed.

    pool.put_record("default/12/web app", config_json)
    pool.get_record(b"default/12/web app")            # bytes, or None
    for key, value in pool.records(prefix="default/"):
        ...
    page = list(pool.records(prefix="default/", start_after=last_key, limit=100))

Readers in other threads see a section's changes only once it has ended
(every call here waits for a section another thread has open).
"""
import struct
from typing import NamedTuple, Optional

from . import errors, format
from ._native import check, ffi, lib

KEY_MAX = format.CONSTANTS["CB_RECORD_KEY_MAX"]
VALUE_MAX = format.CONSTANTS["CB_RECORD_VALUE_MAX"]
PAGE_ENTRIES = 1024      # records fetched from C at a time by records()
PAGE_BYTES = 8 << 20     # ... or this many bytes of keys and values, whichever comes first
_LENGTHS = struct.Struct("<II")


class Record(NamedTuple):
    key: bytes
    value: Optional[bytes]   # None when listed with values=False


def key_bytes(key, what="record key", empty_ok=False):
    """A key as bytes: str as UTF-8, or any bytes-like object."""
    if isinstance(key, str):
        try:
            key = key.encode("utf-8")
        except UnicodeEncodeError as e:
            raise errors.InvalidArgumentError(f"{what} {key!r:.80} is not valid text: {e}") from None
    elif isinstance(key, (bytes, bytearray, memoryview)):
        key = bytes(key)
    else:
        raise errors.InvalidArgumentError(f"{what} {key!r:.80} is not a str or bytes")
    if not key and not empty_ok:
        raise errors.InvalidArgumentError(f"{what} is empty: keys have 1 to {KEY_MAX} bytes")
    if len(key) > KEY_MAX:
        raise errors.InvalidArgumentError(
            f"{what} {key[:40]!r}... is {len(key)} bytes, more than {KEY_MAX}")
    return key


def value_bytes(value):
    if isinstance(value, str):
        raise errors.InvalidArgumentError(
            "record values are bytes: encode text first (value.encode())")
    try:
        view = memoryview(value)
    except TypeError:
        raise errors.InvalidArgumentError(
            f"record value {value!r:.80} is not bytes or another buffer") from None
    if not view.c_contiguous:
        raise errors.InvalidArgumentError("a record value must be a contiguous buffer")
    if view.nbytes > VALUE_MAX:
        raise errors.InvalidArgumentError(
            f"a record value of {view.nbytes} bytes is larger than {VALUE_MAX}")
    return view.cast("B")


class RecordStore:
    """The records methods of a Pool (cowblock.pool.Pool inherits them)."""

    def put_record(self, key, value):
        """Create or replace the record of key (str or bytes) with value (bytes)."""
        key, value = key_bytes(key), value_bytes(value)
        with self._catalog_lock:
            journal = self._section_journal()
            old = self.get_record(key) if journal is not None else None
            check(lib.cb_rec_put(self._handle(), key, len(key), ffi.from_buffer(value),
                                 len(value)))
            if journal is not None:
                journal.undo.append(lambda: _restore(self, key, old))

    def get_record(self, key):
        """The value of key, as bytes, or None if there is no such record."""
        key = key_bytes(key)
        out, length = ffi.new("uint8_t **"), ffi.new("uint32_t *")
        with self._catalog_lock:
            found = check(lib.cb_rec_get(self._handle(), key, len(key), out, length))
        if not found:
            return None
        try:
            return ffi.buffer(out[0], length[0])[:]
        finally:
            lib.cb_free(out[0])

    def delete_record(self, key):
        """Remove the record of key; returns whether there was one."""
        key = key_bytes(key)
        with self._catalog_lock:
            journal = self._section_journal()
            old = self.get_record(key) if journal is not None else None
            gone = check(lib.cb_rec_delete(self._handle(), key, len(key))) == 1
            if journal is not None and gone:
                journal.undo.append(lambda: _restore(self, key, old))
        return gone

    def records(self, prefix=b"", start_after=None, limit=None, *, values=True):
        """Yield Record(key, value) for every key that starts with prefix, in
        key order, after start_after if given (the last key of a page before:
        a cursor that stays valid whatever changes meanwhile), at most limit
        of them.  values=False gives keys only (value None).  Fetched a page
        at a time: changes made while it runs show from the next page on."""
        prefix = key_bytes(prefix, "record prefix", empty_ok=True)
        after = b"" if start_after is None else key_bytes(start_after, "start_after",
                                                          empty_ok=True)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                  or limit < 0):
            raise errors.InvalidArgumentError(f"limit {limit!r} is not an integer >= 0 (or None)")
        return self._records(prefix, after, limit, values)

    def _records(self, prefix, after, limit, values):
        left = limit
        while left is None or left > 0:
            page, last = self._record_page(prefix, after, PAGE_ENTRIES if left is None
                                           else min(left, PAGE_ENTRIES), values)
            yield from page
            if last:
                return
            if left is not None:
                left -= len(page)
            after = page[-1].key

    def _record_page(self, prefix, after, count, values):
        """Up to count records, and whether the listing ended there."""
        out, length = ffi.new("uint8_t **"), ffi.new("uint64_t *")
        with self._catalog_lock:
            n = check(lib.cb_rec_list(self._handle(), prefix, len(prefix), after, len(after),
                                      count, PAGE_BYTES, 1 if values else 0, out, length))
        try:
            raw = ffi.buffer(out[0], length[0])[:]
        finally:
            lib.cb_free(out[0])
        page, at, unpack, header = [], 0, _LENGTHS.unpack_from, _LENGTHS.size
        for _ in range(n):
            klen, vlen = unpack(raw, at)
            at += header + klen
            key = raw[at - klen:at]
            if values:
                page.append(Record(key, raw[at:at + vlen]))
                at += vlen
            else:
                page.append(Record(key, None))
        return page, n < count and length[0] < PAGE_BYTES

    def record_count(self, prefix=b""):
        """How many records there are (whose key starts with prefix)."""
        prefix = key_bytes(prefix, "record prefix", empty_ok=True)
        with self._catalog_lock:
            return check(lib.cb_rec_count(self._handle(), prefix, len(prefix)))


def _restore(pool, key, value):
    """Undo: put the record back as it was (None: absent), without journaling."""
    h = pool._handle()
    if value is None:
        check(lib.cb_rec_delete(h, key, len(key)))
    else:
        check(lib.cb_rec_put(h, key, len(key), value, len(value)))
