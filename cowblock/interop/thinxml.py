"""dm-thin interchange: the XML that thin_dump writes and thin_restore reads.

dump() writes a pool's mappings, all taken at one instant (as thin_dump -m
does from a metadata snapshot; it works through the daemon of a served pool
too), so that thin_restore can build kernel dm-thin metadata for the pool's data file (which has no header: data block N is at
N * block size, as dm-thin expects).  Per-mapping `time` follows real
sharing, because the kernel decides copy-on-write from it: a block shared
with another device gets time 0, below its device's snap_time (which is at
least 1 for any device that shares blocks); a block owned alone gets the
device's snap_time.  Names, origins, read-only flags, labels and sizes, which
the XML cannot carry, go to a JSON sidecar.

restore() builds a cowblock pool from such XML over a given data file,
validating every element and attribute and naming the line of any problem.
"""
import json
import os
import subprocess
import xml.parsers.expat
from dataclasses import dataclass, field

from .. import errors
from ..pool import Pool

SECTOR = 512
MIN_DM_BLOCK = 64 << 10       # dm-thin: 64 KiB .. 1 GiB, a multiple of 64 KiB
MAX_DM_BLOCK = 1 << 30


def _runs(keys, values, times):
    """(origin_begin, data_begin, length, time) runs, contiguous in both spaces."""
    run = None
    for k, v, t in zip(keys, values, times):
        if run and k == run[0] + run[2] and v == run[1] + run[2] and t == run[3]:
            run[2] += 1
            continue
        if run:
            yield tuple(run)
        run = [k, v, 1, t]
    if run:
        yield tuple(run)


def dump(pool, out, names_out=None):
    """Write the pool as thin_dump XML to the text stream `out`; the sidecar
    (names, origins, read-only flags, labels, sizes) to `names_out` if given."""
    s = pool.stats()
    bs = s.block_size
    if bs < MIN_DM_BLOCK or bs > MAX_DM_BLOCK or bs % MIN_DM_BLOCK:
        raise errors.InvalidArgumentError(
            f"pool block size {bs} cannot be represented in dm-thin metadata: dm-thin needs "
            "64 KiB to 1 GiB in multiples of 64 KiB (create the pool with --block-size 64K or more)")
    out.write(f'<superblock uuid="" time="{s.time}" transaction="{s.transaction_id}" '
              f'flags="0" version="2" data_block_size="{bs // SECTOR}" '
              f'nr_data_blocks="{s.data_blocks}">\n')
    sidecar = {"block_size": bs, "devices": {}}
    every = pool.mappings()  # every device as of one instant, served or not
    for info in pool.list():
        if info.name not in every:
            continue  # created after the instant of the mappings
        snap_time = info.snap_time
        maps = every[info.name]
        keys, values, shared = ([m[i] for m in maps] for i in range(3))
        if any(shared) and snap_time == 0:
            raise errors.CowblockError(
                f"device {info.name} shares blocks but has snap_time 0: its sharing cannot be "
                "expressed in dm-thin's times")
        times = [0 if sh else snap_time for sh in shared]
        out.write(f'  <device dev_id="{info.id}" mapped_blocks="{len(keys)}" '
                  f'transaction="{info.transaction_id}" '
                  f'creation_time="{info.creation_time}" snap_time="{snap_time}">\n')
        for ob, db, length, t in _runs(keys, values, times):
            if length == 1:
                out.write(f'    <single_mapping origin_block="{ob}" data_block="{db}" time="{t}"/>\n')
            else:
                out.write(f'    <range_mapping origin_begin="{ob}" data_begin="{db}" '
                          f'length="{length}" time="{t}"/>\n')
        out.write("  </device>\n")
        sidecar["devices"][str(info.id)] = {
            "name": info.name, "origin": info.origin, "read_only": info.read_only,
            "size": info.size, "labels": info.labels}
    out.write("</superblock>\n")
    if names_out is not None:
        json.dump(sidecar, names_out, indent=2, sort_keys=True)
        names_out.write("\n")


# ---- restore ----

@dataclass
class _Device:
    dev_id: int
    mapped_blocks: int
    line: int
    maps: list = field(default_factory=list)  # (origin, data, length, line)


class _Parser:
    ELEMENTS = {
        "superblock": ({"uuid", "time", "transaction", "data_block_size", "nr_data_blocks"},
                       {"flags", "version", "metadata_snap"}),
        "device": ({"dev_id", "mapped_blocks", "transaction", "creation_time", "snap_time"}, set()),
        "single_mapping": ({"origin_block", "data_block", "time"}, set()),
        "range_mapping": ({"origin_begin", "data_begin", "length", "time"}, set()),
        "def": ({"name"}, set()),
        "ref": ({"name"}, set()),
    }

    def __init__(self, path):
        self.path = path
        self.sb = None
        self.devices = []
        self.defs = {}
        self.stack = []
        self.p = xml.parsers.expat.ParserCreate()
        self.p.StartElementHandler = self.start
        self.p.EndElementHandler = lambda name: self.stack.pop()

    def fail(self, msg, line=None):
        raise errors.InvalidArgumentError(
            f"{self.path}, line {line or self.p.CurrentLineNumber}: {msg}")

    def num(self, attrs, name):
        v = attrs[name]
        if not v.isdigit():
            self.fail(f"attribute {name}={v!r} is not a non-negative decimal number")
        return int(v)

    def start(self, name, attrs):
        if name not in self.ELEMENTS:
            self.fail(f"unknown element <{name}>")
        required, optional = self.ELEMENTS[name]
        missing = required - set(attrs)
        unknown = set(attrs) - required - optional
        if missing:
            self.fail(f"<{name}> lacks attribute {sorted(missing)[0]}")
        if unknown:
            self.fail(f"<{name}> has unknown attribute {sorted(unknown)[0]}")
        parent = self.stack[-1][0] if self.stack else None
        line = self.p.CurrentLineNumber
        if name == "superblock":
            if parent is not None or self.sb is not None:
                self.fail("<superblock> must be the one root element")
            self.sb = {k: attrs[k] for k in attrs}
            for k in ("time", "transaction", "data_block_size", "nr_data_blocks"):
                self.num(attrs, k)
        elif name == "device":
            if parent != "superblock":
                self.fail("<device> must be inside <superblock>")
            dev = _Device(self.num(attrs, "dev_id"), self.num(attrs, "mapped_blocks"), line)
            for k in ("transaction", "creation_time", "snap_time"):
                self.num(attrs, k)
            if dev.dev_id >= 1 << 24:
                self.fail(f"dev_id {dev.dev_id} does not fit dm-thin's 24 bits")
            self.devices.append(dev)
            self.stack.append((name, dev))
            return
        elif name == "def":
            if parent != "superblock":
                self.fail("<def> must be directly inside <superblock> (no nesting)")
            if attrs["name"] in self.defs:
                self.fail(f"<def name={attrs['name']!r}> is defined twice")
            maps = []
            self.defs[attrs["name"]] = maps
            self.stack.append((name, maps))
            return
        elif name == "ref":
            if parent != "device":
                self.fail("<ref> may only occur inside <device>")
            if attrs["name"] not in self.defs:
                self.fail(f"<ref name={attrs['name']!r}> names no earlier <def>")
            self.stack[-1][1].maps.extend(self.defs[attrs["name"]])
        else:  # a mapping
            if parent not in ("device", "def"):
                self.fail(f"<{name}> must be inside <device> or <def>")
            if name == "single_mapping":
                m = (self.num(attrs, "origin_block"), self.num(attrs, "data_block"), 1, line)
            else:
                m = (self.num(attrs, "origin_begin"), self.num(attrs, "data_begin"),
                     self.num(attrs, "length"), line)
                if m[2] == 0:
                    self.fail("<range_mapping> of length 0")
            self.num(attrs, "time")
            target = self.stack[-1][1]
            (target.maps if parent == "device" else target).append(m)
        self.stack.append((name, None))

    def parse(self):
        try:
            with open(self.path, "rb") as f:
                self.p.ParseFile(f)
        except xml.parsers.expat.ExpatError as e:
            raise errors.InvalidArgumentError(f"{self.path}: malformed XML: {e}") from None
        except OSError as e:
            raise errors.HostFileError(f"cannot read {self.path}: {e.strerror}", e.errno) from None
        if self.sb is None:
            self.fail("no <superblock>", 1)
        return self


def _place_data(data, dest, mode):
    if mode == "move":
        os.replace(data, dest)
    elif mode == "reflink":
        r = subprocess.run(["cp", "--reflink=always", "--sparse=always", data, dest],
                           capture_output=True, text=True)
        if r.returncode:
            raise errors.HostFileError(f"cannot reflink {data}: {r.stderr.strip()} "
                                       "(the filesystem must support reflinks; use copy)")
    else:
        r = subprocess.run(["cp", "--sparse=always", data, dest], capture_output=True, text=True)
        if r.returncode:
            raise errors.HostFileError(f"cannot copy {data}: {r.stderr.strip()}")


def restore(xml_path, data_path, new_pool, *, names_path=None, mode="copy"):
    """Build a cowblock pool at new_pool from thin_dump XML and a data file
    (copied, moved or reflinked into the pool, as mode says)."""
    x = _Parser(xml_path).parse()
    sectors = int(x.sb["data_block_size"])
    bs = sectors * SECTOR
    if bs < 4096 or bs > MAX_DM_BLOCK or bs & (bs - 1):
        x.fail(f"data_block_size {sectors} sectors ({bs // 1024} KiB): cowblock needs a power of "
               "two from 4 KiB to 1 GiB", 1)
    nr_blocks = int(x.sb["nr_data_blocks"])
    if nr_blocks == 0:
        x.fail("nr_data_blocks is 0", 1)
    size = os.stat(data_path).st_size
    if size < nr_blocks * bs:
        raise errors.InvalidArgumentError(
            f"data file {data_path} is {size} bytes, smaller than {nr_blocks} blocks of {bs}")
    sidecar = {}
    if names_path:
        with open(names_path) as f:
            sidecar = json.load(f).get("devices", {})
    plan = []
    seen_ids = set()
    for dev in x.devices:
        if dev.dev_id in seen_ids:
            x.fail(f"dev_id {dev.dev_id} appears twice", dev.line)
        seen_ids.add(dev.dev_id)
        pairs = {}
        for origin, data, length, line in dev.maps:
            if data + length > nr_blocks:
                x.fail(f"device {dev.dev_id}: data block {data + length - 1} is past the end of the "
                       f"data device ({nr_blocks} blocks)", line)
            for i in range(length):
                if origin + i in pairs:
                    x.fail(f"device {dev.dev_id}: virtual block {origin + i} is mapped twice", line)
                pairs[origin + i] = data + i
        if len(pairs) != dev.mapped_blocks:
            x.fail(f"device {dev.dev_id}: mapped_blocks says {dev.mapped_blocks}, its mappings "
                   f"count {len(pairs)}", dev.line)
        meta = sidecar.get(str(dev.dev_id), {})
        last = max(pairs) if pairs else 0
        # A device's size need not be a multiple of the block size (a 4 KiB
        # device, an odd-size import): its last block is then only partly
        # inside it, so the size must reach into that block, not cover it.
        dev_size = meta.get("size") or (last + 1) * bs
        if dev_size <= last * bs:
            x.fail(f"device {dev.dev_id}: the sidecar size {dev_size} ends before its mapped "
                   f"virtual block {last} (bytes {last * bs} to {(last + 1) * bs})", dev.line)
        plan.append((meta.get("name") or f"dev{dev.dev_id}", dev_size, sorted(pairs.items()),
                     meta.get("read_only", False), meta.get("labels", {})))
    if os.path.exists(os.path.join(new_pool, "metadata")):
        raise errors.PoolExistsError(f"a pool exists at {new_pool} already")
    meta_size = max(64 << 20, -(-nr_blocks * 64 // 4096) * 4096)
    Pool.create(new_pool, nr_blocks * bs, bs, metadata_size=meta_size, commit_interval=0).close()
    _place_data(data_path, os.path.join(new_pool, "data"), mode)
    from .. import health
    health.tighten_permissions(new_pool)   # a moved data file came with its own mode
    pool = Pool.open(new_pool, commit_interval=0)
    try:
        health.configure(pool, min_free_space=0)  # restoring fills what it must
        for name, dev_size, pairs, read_only, labels in plan:
            pool.create_thin(name, dev_size, labels=labels, _internal=True)   # as dumped
            pool.add_mappings(name, pairs)
            if read_only:
                pool.set_read_only(name, True)
        health.configure(pool, min_free_space=health.DEFAULTS["min_free_space"])
        report = pool.check()
        if not report.ok:
            raise errors.CorruptMetadataError(f"the restored pool fails its check:\n{report}")
    finally:
        pool.close()
    return new_pool


def delta(pool, a, b):
    """thin_delta's XML for devices a and b (virtual-block ranges)."""
    s = pool.stats()
    ia, ib = pool.info(a), pool.info(b)
    lines = [f'<superblock uuid="" time="{s.time}" transaction="{s.transaction_id}" '
             f'data_block_size="{s.block_size // SECTOR}" nr_data_blocks="{s.data_blocks}">',
             f'  <diff left="{ia.id}" right="{ib.id}">']
    for r in pool.diff(a, b, same=True):
        lines.append(f'    <{r.kind} begin="{r.begin}" length="{r.length}"/>')
    lines += ["  </diff>", "</superblock>"]
    return "\n".join(lines) + "\n"


def thin_ls_rows(pool):
    """thin_ls's fields for every device."""
    bs = pool.block_size
    rows = []
    for info in pool.list():
        u = pool.usage(info.name)
        rows.append({"DEV": info.id, "MAPPED_BLOCKS": u.mapped_blocks,
                     "EXCLUSIVE_BLOCKS": u.exclusive_blocks, "SHARED_BLOCKS": u.shared_blocks,
                     "MAPPED_BYTES": u.mapped_blocks * bs, "EXCLUSIVE_BYTES": u.exclusive_bytes,
                     "SHARED_BYTES": u.shared_bytes, "TRANSACTION": info.transaction_id,
                     "CREATE_TIME": info.creation_time, "SNAP_TIME": info.snap_time,
                     "NAME": info.name})
    return rows

