"""cffi build declaration for the C core (out-of-line API mode).

setup.py names this module in ``cffi_modules``; the extension is compiled at
install time, never at import.  The cdef is csrc/api.h itself, so the Python
side and the C side cannot drift apart.
"""
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["errors.c", "crc32c.c", "io.c", "meta.c", "sm.c", "btree.c", "pool.c",
           "device.c", "dataio.c", "diff.c", "check.c", "nbd/transmit.c"]

ffibuilder = FFI()
ffibuilder.cdef((HERE / "api.h").read_text())
ffibuilder.set_source(
    "cowblock._core",
    '#include "cowblock.h"',
    sources=[str((HERE / name).relative_to(HERE.parent)) for name in SOURCES],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-fvisibility=hidden", "-D_GNU_SOURCE"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
