"""cffi build declaration for the C core (out-of-line API mode).

setup.py names this module in ``cffi_modules``; the extension is compiled at
install time, never at import.  The cdef is csrc/api.h itself, so the Python
side and the C side cannot drift apart.
"""
import os
import pathlib
import subprocess

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["errors.c", "crc32c.c", "copy.c", "format.c", "io.c", "meta.c", "sm.c", "btree.c", "pool.c",
           "device.c", "dataio.c", "diff.c", "check.c", "records.c", "records_api.c", "txn.c",
           "space.c", "nbd/transmit.c", "nbd/tls.c", "attach/fuse.c", "remote.c"]

# COWBLOCK_SANITIZE=address (or address,undefined) builds the core with
# sanitizers, for the tests that run it so (tests/test_sanitizers.py).
SANITIZE = [f"-fsanitize={os.environ['COWBLOCK_SANITIZE']}", "-fno-omit-frame-pointer", "-g"] \
    if os.environ.get("COWBLOCK_SANITIZE") else []



def gnutls():
    """GnuTLS's compiler flags and libraries (pkg-config), or None: TLS is then
    left out and asking for it says which package to install.
    COWBLOCK_GNUTLS=0 leaves it out on purpose (the tests of that build)."""
    if os.environ.get("COWBLOCK_GNUTLS") == "0":
        return None
    try:
        out = subprocess.run(["pkg-config", "--cflags", "--libs", "gnutls"], capture_output=True,
                             text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # no pkg-config: the usual place
        return ([], ["gnutls"]) if os.path.exists("/usr/include/gnutls/gnutls.h") else None
    return ([f[2:] for f in out if f.startswith("-I")], [f[2:] for f in out if f.startswith("-l")])


TLS = gnutls()


def fuse3():
    """libfuse3's compiler flags and libraries (pkg-config fuse3), or None
    (also with COWBLOCK_FUSE=0): attach/fuse.c then builds as stubs, and
    asking for FUSE attach says which package to install."""
    if os.environ.get("COWBLOCK_FUSE") == "0":
        return None
    try:
        out = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True,
                             text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return ([f[2:] for f in out if f.startswith("-I")], [f[2:] for f in out if f.startswith("-l")])


FUSE = fuse3()


def librados():
    """Whether librados' headers are here (Debian's librados-dev); without
    them (or with COWBLOCK_RADOS=0) remote.c builds as stubs, and asking for
    a pool on RADOS says which package to install."""
    if os.environ.get("COWBLOCK_RADOS") == "0":
        return False
    return os.path.exists("/usr/include/rados/librados.h")


RADOS = librados()

ffibuilder = FFI()
ffibuilder.cdef((HERE / "api.h").read_text())
ffibuilder.cdef((HERE / "nbd" / "tls.h").read_text())
ffibuilder.cdef((HERE / "attach" / "fuse.h").read_text())
ffibuilder.cdef((HERE / "remote.h").read_text())
ffibuilder.set_source(
    "cowblock._core",
    '#include "cowblock.h"\n#include "nbd/tls.h"\n#include "attach/fuse.h"\n#include "remote.h"',
    sources=[str((HERE / name).relative_to(HERE.parent)) for name in SOURCES],
    include_dirs=[str(HERE.relative_to(HERE.parent))] + (TLS[0] if TLS else [])
    + (FUSE[0] if FUSE else []),
    define_macros=([("COWBLOCK_GNUTLS", "1")] if TLS else [])
    + ([("COWBLOCK_HAVE_FUSE", "1")] if FUSE else [])
    + ([("COWBLOCK_HAVE_RADOS", "1")] if RADOS else []),
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-fvisibility=hidden", "-D_GNU_SOURCE"] + SANITIZE,
    extra_link_args=SANITIZE,
    libraries=["pthread"] + (TLS[1] if TLS else []) + (FUSE[1] if FUSE else [])
    + (["rados"] if RADOS else []),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
