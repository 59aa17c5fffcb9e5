"""C errors reach Python with a kind (enum cb_error_kind), and the exception
class is chosen by that kind, never by the message's text; no number of the
C core is written down in the Python package."""
import errno
import os
import re

import pytest

from cowblock import (BusyError, CorruptMetadataError, DeviceNotFoundError, MetadataSpaceError,
                      NoSpaceError, Pool, PoolIOError, format)
from cowblock import errors
from cowblock._native import ffi, lib

BS = 4096
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kind,cls", [
    ("CB_E_DATA_SPACE", NoSpaceError), ("CB_E_METADATA_SPACE", MetadataSpaceError),
    ("CB_E_HOST_SPACE", NoSpaceError), ("CB_E_LIMIT", NoSpaceError)])
def test_the_kind_not_the_text_picks_the_class(kind, cls):
    for text in ("metadata space is exhausted", "the pool is out of data space"):
        e = errors.from_code(-errno.ENOSPC, text, getattr(lib, kind))
        assert type(e) is cls and e.errno == errno.ENOSPC and str(e) == text


def test_ebusy_is_busy_error():
    e = errors.from_code(-errno.EBUSY, "device web is exported")
    assert isinstance(e, BusyError) and e.errno == errno.EBUSY
    assert lib.cb_error_kind(-errno.EBUSY) == lib.CB_E_BUSY


def test_an_errno_no_kind_names_is_an_io_error():
    e = errors.from_code(-errno.EXDEV, "cross-device")
    assert isinstance(e, PoolIOError) and e.errno == errno.EXDEV


def test_corrupt_metadata_errno_is_euclean():
    assert CorruptMetadataError("x").errno == errno.EUCLEAN


@pytest.fixture
def pool(tmp_path):
    with Pool.create(tmp_path / "p", 64 * BS, BS, metadata_size=16 * BS, commit_interval=0) as p:
        yield p


def test_the_core_records_the_kind_with_each_error(pool):
    info = ffi.new("cb_devinfo *")
    code = lib.cb_dev_info(pool._handle(), 999, info)
    assert code == -errno.ENOENT and lib.cb_error_kind(code) == lib.CB_E_NOT_FOUND
    # the kind recorded belongs to that errno only: asked about another, the errno decides
    assert lib.cb_error_kind(-errno.EROFS) == lib.CB_E_READ_ONLY
    assert lib.cb_error_kind(0) == lib.CB_E_NONE


def test_data_and_metadata_space_reach_python_as_their_classes(tmp_path):
    with Pool.create(tmp_path / "data", 16 * BS, BS, commit_interval=0) as p:
        d = p.create_thin("d", 64 * BS)
        with pytest.raises(NoSpaceError) as exc:
            d.pwrite(b"x" * (32 * BS), 0)
        assert not isinstance(exc.value, MetadataSpaceError)
    # metadata of 16 blocks: all but the reserve is gone at once
    with Pool.create(tmp_path / "meta", 64 * BS, BS, metadata_size=16 * BS,
                     commit_interval=0) as p:
        with pytest.raises(MetadataSpaceError) as exc:
            p.create_thin("d", 64 * BS)
        assert exc.value.errno == errno.ENOSPC


def test_a_corrupt_read_is_corrupt_metadata_error(tmp_path):
    path = tmp_path / "p"
    with Pool.create(path, 64 * BS, BS, commit_interval=0) as p:
        p.create_thin("d", 64 * BS).pwrite(b"x" * BS, 0)
    commit = format.Commit(open(path / "metadata", "rb").read())
    leaf = commit.map_leaves[0]
    with open(path / "metadata", "r+b") as f:
        f.seek(leaf * format.META_BLOCK_SIZE + 100)
        f.write(b"\xff")
    with Pool.open(path, read_only=True) as p:
        with pytest.raises(CorruptMetadataError) as exc:
            p.device("d").pread(BS, 0)
        assert exc.value.errno == errno.EUCLEAN and f"metadata block {leaf}" in str(exc.value)
        with pytest.raises(DeviceNotFoundError):
            p.device("nope")


# Numbers that belong to the C core and have no business in Python source:
# format constants that are not also everyday numbers, and errno values.
C_NUMBERS = {name: format.CONSTANTS[name] for name in (
    "CB_MAGIC", "CB_POOL_CONFIG_MAX", "CB_CATALOG_MAX", "CB_SM_ENTRIES", "CB_MAX_BLOCKS",
    "CB_NODE_SPACE", "CB_BT_SUPERBLOCK", "CB_BT_INTERNAL", "CB_BT_MAP_LEAF", "CB_BT_DEV_LEAF",
    "CB_BT_SM_INDEX", "CB_BT_SM_REFS", "CB_BT_CATALOG")}
C_NUMBERS["EUCLEAN"] = errno.EUCLEAN


def test_no_c_number_is_written_in_the_python_package():
    found = []
    number = re.compile(r"(?<![\w.])(0[xX][0-9a-fA-F_]+|\d[\d_]*)(?![\w.])")
    for top, _, files in os.walk(os.path.join(ROOT, "cowblock")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(top, name)
            for n, line in enumerate(open(path), 1):
                code = line.split("#")[0]
                for literal in number.findall(code):
                    value = int(literal.replace("_", ""), 0) if not literal.startswith("0") \
                        or literal.lower().startswith("0x") or literal == "0" else None
                    hits = [c for c, v in C_NUMBERS.items() if v == value]
                    if hits:
                        found.append(f"{os.path.relpath(path, ROOT)}:{n}: {literal} ({hits[0]})")
    assert not found, "\n".join(found)
