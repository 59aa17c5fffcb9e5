"""Atomic sections: several changes of a pool in one commit.

    with pool.atomic():                      # commits as it ends
        dev = pool.create_thin("snap-12", size)
        pool.put_record("default/12/snap 12", b"snap-12")

The C core (csrc/txn.c) keeps every commit out while the section is open:
the changes the section makes do not commit one by one, and the periodic
committer, NBD flushes and other threads' changes wait for it to end.  A
crash before the end loses the whole section, never part of it.

There is no abort of the running transaction (it holds other threads'
changes too).  Instead, when the body raises, what it did is undone here,
in reverse, before the section ends and the exception goes on:

- devices created or snapshotted are deleted; renames, labels and read-only
  flags are set back;
- records put or deleted get their old values back;
- devices deleted are restored: inside a section a delete is deferred (the
  device is hidden with the section's commit and its blocks are reclaimed in
  the background once the section has ended), so nothing is lost until the
  section succeeds.

Not undone: data written to devices, discards, device resizes and
rollbacks.  A write that finds the pool full would commit to recycle the
blocks freed in the transaction; inside a section it cannot, and gets
NoSpaceError instead.  If an undo step itself fails, the section ends with
CB_TXN_FAIL: the pool turns read-only (needs check) rather than ever commit
a half-made section, and reopens at its last commit.

Sections are per thread and nest (an inner one joins the outer: its undo
belongs to the outer one if the outer one fails later).  While one is open,
other threads' calls that change devices or records wait for it, and see
its changes only after it ends.  Keep sections short: a commit waits for
them, and sections opened meanwhile wait for that commit.  Inside a
section, pool.commit(), check() and trim() fail (InvalidArgumentError), and
so does close().
"""
import threading

from ._native import check, lib


class _Journal:
    def __init__(self):
        self.undo = []     # callables that put back what the section did, in order
        self.after = []    # callables run once the outermost section succeeded


def _stack(pool):
    local = pool._sections
    if not hasattr(local, "stack"):
        local.stack = []
    return local.stack


def journal(pool):
    """The journal of this thread's innermost section of pool, or None."""
    stack = _stack(pool)
    return stack[-1] if stack else None


def depth(pool):
    return len(_stack(pool))


class Section:
    """What pool.atomic() returns: a context manager."""

    def __init__(self, pool, commit=True):
        self._pool = pool
        self._commit = commit

    def __enter__(self):
        pool = self._pool
        h = pool._handle()
        pool._catalog_lock.acquire()
        try:
            check(lib.cb_pool_txn_begin(h))
        except BaseException:
            pool._catalog_lock.release()
            raise
        _stack(pool).append(_Journal())
        return self

    def __exit__(self, exc_type, exc, tb):
        pool = self._pool
        stack = _stack(pool)
        done = stack.pop()
        flags = 0
        try:
            if exc_type is None and stack:
                stack[-1].undo += done.undo
                stack[-1].after += done.after
            elif exc_type is None:
                flags = lib.CB_TXN_COMMIT if self._commit else 0
            elif not _undo(done):
                flags = lib.CB_TXN_FAIL
            code = lib.cb_pool_txn_end(pool._h, flags)
        finally:
            pool._catalog_lock.release()
        if exc_type is None:
            check(code)
            if not stack:
                for action in done.after:
                    action()
        return False


def _undo(journal):
    """Run the undo steps, newest first; False if one failed."""
    for step in reversed(journal.undo):
        try:
            step()
        except Exception:
            return False
    return True


def new_pool_state():
    """The per-thread section stacks of a new Pool."""
    return threading.local()


# ---- what pool.py notes down as it changes devices inside a section ----

def note_catalog(pool, did):
    """Device did is about to get a name and labels (it is new if it had none)."""
    j = journal(pool)
    if j is not None:
        before = pool._meta.get(did)
        j.undo.append(lambda: _put_catalog_back(pool, did, before))


def note_flags(pool, did, flags):
    """Device did's flags are about to change from flags."""
    j = journal(pool)
    if j is not None:
        j.undo.append(lambda: check(lib.cb_dev_set_flags(pool._handle(), did, flags)))


def note_delete(pool, did, flags):
    """Device did is being deleted inside a section: marked for a deferred
    removal (flags were its flags before), reclaimed once the section ends."""
    j = journal(pool)
    meta = pool._meta[did]

    def put_back():
        check(lib.cb_dev_set_flags(pool._handle(), did, flags))
        pool._names[meta[0]] = did
        pool._meta[did] = meta

    def reclaim():
        pool._reclaim.append(did)
        pool._start_reclaim()
    j.undo.append(put_back)
    j.after.append(reclaim)


def _put_catalog_back(pool, did, before):
    from . import catalog
    name = pool._meta[did][0]
    if pool._names.get(name) == did:
        del pool._names[name]
    if before is None:      # made in the section: it goes
        check(lib.cb_dev_delete(pool._handle(), did))
        del pool._meta[did]
        return
    blob = catalog.encode(*before)
    check(lib.cb_dev_set_catalog(pool._handle(), did, blob, len(blob)))
    pool._names[before[0]] = did
    pool._meta[did] = before
