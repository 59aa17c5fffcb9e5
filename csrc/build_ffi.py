"""cffi build declaration for the C core (out-of-line API mode).

setup.py names this module in ``cffi_modules``; the extension is compiled at
install time, never at import.  The cdef is csrc/api.h itself, so the Python
side and the C side cannot drift apart.
"""
import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["errors.c", "crc32c.c", "format.c", "io.c", "meta.c", "sm.c", "btree.c", "pool.c",
           "device.c", "dataio.c", "diff.c", "check.c", "records.c", "records_api.c", "txn.c", "nbd/transmit.c"]

# COWBLOCK_SANITIZE=address (or address,undefined) builds the core with
# sanitizers, for the tests that run it so (tests/test_sanitizers.py).
SANITIZE = [f"-fsanitize={os.environ['COWBLOCK_SANITIZE']}", "-fno-omit-frame-pointer", "-g"] \
    if os.environ.get("COWBLOCK_SANITIZE") else []

ffibuilder = FFI()
ffibuilder.cdef((HERE / "api.h").read_text())
ffibuilder.set_source(
    "cowblock._core",
    '#include "cowblock.h"',
    sources=[str((HERE / name).relative_to(HERE.parent)) for name in SOURCES],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-fvisibility=hidden", "-D_GNU_SOURCE"] + SANITIZE,
    extra_link_args=SANITIZE,
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
