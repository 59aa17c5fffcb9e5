"""The compiled C core (built by cffi at install time from csrc/)."""
from ._core import ffi, lib  # noqa: F401  (re-exported)

from . import errors


def last_error():
    return ffi.string(lib.cb_last_error()).decode("utf-8", "replace")


def check(code, **kw):
    """Raise the cowblock exception for a negative C return code (its class
    chosen by the kind of error the core recorded, never by its message)."""
    if code < 0:
        raise errors.from_code(code, last_error(), lib.cb_error_kind(code), **kw)
    return code


def space_wait_callback(pool):
    """A C cb_space_wait_fn calling pool.space_wait at each call (the C loops
    call it on a write that found the pool full, from their own threads;
    cffi takes the GIL), or ffi.NULL when the pool has none.  Keep it alive
    as long as C may call it."""
    if pool.space_wait is None:
        return ffi.NULL

    def wait(ctx):
        fn = pool.space_wait
        if fn is not None:
            fn()
    return ffi.callback("cb_space_wait_fn", wait, onerror=_space_wait_failed)


def _space_wait_failed(exc_type, exc, tb):
    # The write is tried again either way; an error here must not kill a C thread.
    return None
