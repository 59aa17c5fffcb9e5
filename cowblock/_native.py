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
