"""cowblock pool create|info|resize|check|trim|set|dump|restore|copy"""
import os
import sys

import click

from ... import errors, health
from ...pool import Pool
from ...control.client import run
from ..common import (EXIT_CHECK_FAILED, RESIZE, SIZE, SignedSizeCommand, emit, format_size, note,
                      progress_bar, table, with_pool)


@click.group("pool")
def command():
    """Create, inspect, grow, check and trim the pool.

    \b
    Example:
      cowblock pool create --size 100G --block-size 64K
      cowblock pool info
    """


@command.command("create")
@click.option("--size", type=SIZE, default="16G", show_default=True, help="data size (sparse)")
@click.option("--block-size", type=SIZE, default="64K", show_default=True,
              help="data block size, a power of two from 4K to 1G")
@click.option("--metadata-size", type=SIZE, default=None,
              help="metadata capacity (default: 64 bytes per data block, at least 64M; sparse)")
@click.pass_obj
def create(settings, size, block_size, metadata_size):
    """Create a pool.

    \b
    Example:
      cowblock --pool /var/lib/cowblock pool create --size 1T
    """
    with Pool.create(settings.pool_path, size, block_size, metadata_size=metadata_size or 0) as p:
        s = p.stats()
    emit(settings, {"path": settings.pool_location, "size": size, "block_size": s.block_size,
                    "metadata_capacity": s.metadata_capacity_bytes, "uuid": s.uuid},
         lambda d: click.echo(f"created pool {d['path']}: {format_size(size)} in "
                              f"{format_size(d['block_size'])} blocks"))


@command.command("info")
@with_pool(read_only=True)
def info(settings, pool):
    """Sizes, space used and free, metadata, transaction id, health.

    \b
    Example:
      cowblock pool info --json
    """
    def human(d):
        rows = [("path", d["path"]), ("uuid", d["uuid"]),
                ("block size", format_size(d["block_size"])),
                ("data", f"{format_size(d['data_used'])} used of {format_size(d['data_size'])} "
                         f"({d['data_free_pct']}% free)"),
                ("metadata", f"{format_size(d['metadata_used'])} used of "
                             f"{format_size(d['metadata_capacity'])} ({d['metadata_free_pct']}% "
                             f"free, {format_size(d['metadata_reserve'])} reserve)"),
                ("devices", f"{d['devices']}, {format_size(d['provisioned'])} provisioned"
                            + (" (over-provisioned)" if d["overprovisioned"] else "")),
                ("low-water marks", f"data {d['low_water_data']}%, metadata "
                                    f"{d['low_water_metadata']}%, min free "
                                    f"{d['min_free_space']}%"),
                ("hook", f"{d['hook']} (writes wait {d['hook_timeout']:g} s for it)"
                 if d["hook"] else "-"),
                ("transaction id", d["transaction_id"]),
                ("needs check", "yes" if d["needs_check"] else "no")]
        table(rows, ["FIELD", "VALUE"])
        for w in d["warnings"]:
            click.echo(f"warning: {w}")
        if d["overprovisioned"]:
            click.echo("warning: the devices' total size over-provisions the pool: writes can "
                       "fill it before the devices are full")
    emit(settings, run(pool, health.report), human)


@command.command("resize", cls=SignedSizeCommand)
@click.argument("size", type=RESIZE, required=False)
@click.option("--metadata", "metadata", type=SIZE, default=None, help="new metadata capacity")
@with_pool()
def resize(settings, pool, size, metadata):
    """Grow the pool's data space to SIZE, or by +SIZE (what a low-water
    hook wants), and/or its metadata.

    \b
    Example:
      cowblock pool resize 200G
      cowblock pool resize +10G
      cowblock pool resize --metadata 1G
    """
    if size is None and metadata is None:
        raise click.UsageError("give a new SIZE, --metadata SIZE, or both")
    if size is not None:
        sign, amount = size
        if sign < 0:
            raise click.BadParameter("a pool only grows: give a larger SIZE or +SIZE",
                                     param_hint="SIZE")
        if sign:
            s = pool.stats()
            amount += s.data_blocks * s.block_size
        pool.resize(amount)
    if metadata is not None:
        pool.resize_metadata(metadata)
    s = pool.stats()
    emit(settings, {"data_size": s.data_blocks * s.block_size,
                    "metadata_capacity": s.metadata_capacity_bytes},
         lambda d: click.echo(f"pool is {format_size(d['data_size'])}, metadata "
                              f"{format_size(d['metadata_capacity'])}"))


@command.command("check")
@click.option("--repair", is_flag=True,
              help="set every reference count from the trees (leaks, miscounts), drop the "
                   "devices whose trees are damaged (asks first) and make the pool files "
                   "owner-only; refused while the pool is served or when other metadata is "
                   "damaged")
@click.option("--dry-run", is_flag=True,
              help="show what --repair would do (it repairs a scratch copy of the metadata), "
                   "changing nothing")
@click.option("--yes", "-y", is_flag=True,
              help="repair without asking, even when devices (and their data) would be dropped")
@click.pass_obj
def check(settings, repair, dry_run, yes):
    """Verify all metadata (like thin_check): checksums, tree invariants and
    every reference count.  Exits 9 when a problem remains.  A repair that
    would drop devices asks first (or needs --yes).

    \b
    Example:
      cowblock pool check
      cowblock pool check --dry-run
      cowblock pool check --repair
    """
    from ... import repair as repairs
    from ...control import client
    exclusive = repair or dry_run
    pool = client.open_exclusive(settings.pool_path, timeout=settings.timeout, on_note=note) \
        if exclusive else settings.open(read_only=True, create=False)
    with pool:
        report = pool.check(repair=repair and yes and not dry_run)
        preview = None
        if dry_run and not report.ok or repair and not yes and report.error_count:
            preview = repairs.preview(pool)   # only errors in trees make a repair drop devices
        if dry_run:
            _report_dry_run(settings, report, preview)
        else:
            if preview is not None and preview.dropped:
                _confirm_drop(preview.dropped)
            if repair and not yes:
                report = pool.check(repair=True)
            emit(settings, _check_record(report, repair), lambda d: click.echo(str(report)))
    if not report.ok:
        sys.exit(EXIT_CHECK_FAILED)


def _check_record(report, repaired):
    return {"ok": report.ok, "errors": report.errors, "leaks": report.leaks,
            "error_count": report.error_count, "leak_count": report.leak_count,
            "nodes_checked": report.nodes_checked, "repaired": repaired,
            "records": [r._asdict() for r in report.records],
            "repair_records": [r._asdict() for r in report.repair_records],
            "warnings": report.warnings}


def _report_dry_run(settings, report, preview):
    record = _check_record(report, False)
    record.update(dry_run=True, would_drop=preview.dropped if preview else [],
                  would_do=preview.done if preview else [])

    def human(d):
        click.echo(str(report))
        if report.ok:
            click.echo("a repair would have nothing to do")
            return
        click.echo("--repair would do what it did to a scratch copy of the metadata:")
        for line in d["would_do"]:
            click.echo(f"  {line}")
    emit(settings, record, human)


def _confirm_drop(names):
    listed = ("device " if len(names) == 1 else "devices ") + ", ".join(map(repr, names))
    why = "damaged mapping " + ("tree: its data is lost" if len(names) == 1 else
                                "trees: their data is lost")
    if sys.stdin.isatty() and sys.stderr.isatty():
        if click.confirm(f"the repair drops {listed} ({why}); repair?", default=False, err=True):
            return
        raise errors.ProtectedError("repair cancelled: nothing was changed")
    raise errors.ProtectedError(
        f"a repair would drop {listed} ({why}): give --yes to repair anyway, or --dry-run to "
        "see all it would do; nothing was changed")


@command.command("trim")
@with_pool()
def trim(settings, pool):
    """Give unused data-file space back to the host (like thin_trim).

    \b
    Example:
      cowblock pool trim
    """
    released = pool.trim()
    emit(settings, {"released": released},
         lambda d: click.echo(f"released {format_size(d['released'])} to the host"))


@command.command("set")
@click.option("--low-water-data", type=float, help="warn under this % of free data")
@click.option("--low-water-metadata", type=float, help="warn under this % of free metadata")
@click.option("--min-free-space", type=float, help="refuse new devices under this % free")
@click.option("--hook", help="command run once each time free space falls under a low-water "
                            "mark ('' to clear)")
@click.option("--hook-timeout", type=click.FloatRange(0, health.MAX_HOOK_TIMEOUT, min_open=True),
              help="seconds a write into the full pool waits for the hook, then is tried once "
                   "more  [default: 60]")
@with_pool()
def set_(settings, pool, **opts):
    """Pool health settings.  The hook runs once per crossing of a low-water
    mark (again only after free space was back above it), by the pool's
    daemon when one holds the pool (its output in the daemon's log), else by
    the command that crossed it, before that command returns.  A write that
    finds the pool full waits for the hook (--hook-timeout) and is tried
    once more before it fails.

    \b
    Example:
      cowblock pool set --low-water-data 20 --hook 'cowblock pool resize +10G'
    """
    changes = {k: v for k, v in opts.items() if v is not None}
    if "hook" in changes and not changes["hook"]:
        changes["hook"] = None
    health.configure(pool, **changes)
    emit(settings, health.settings(pool), lambda d: click.echo(
        ", ".join(f"{k}={v}" for k, v in d.items())))


@command.command("dump")
@click.option("--format", "fmt", type=click.Choice(["thin-xml"]), default="thin-xml",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="-",
              help="output file (default: stdout)")
@click.option("--names", type=click.Path(dir_okay=False),
              help="also write names, origins, read-only flags, labels and sizes (JSON) here")
@with_pool(read_only=True)
def dump(settings, pool, fmt, output, names):
    """Write the pool's mappings as thin_dump XML, for thin_restore and a
    kernel dm-thin pool over the same data file.

    \b
    Example:
      cowblock pool dump -o pool.xml --names names.json
      thin_restore -i pool.xml -o /dev/mapper/meta
    """
    from ...interop import thinxml
    out = sys.stdout if output == "-" else open(output, "w")
    sidecar = open(names, "w") if names else None
    try:
        thinxml.dump(pool, out, sidecar)
    finally:
        if out is not sys.stdout:
            out.close()
        if sidecar:
            sidecar.close()


@command.command("restore")
@click.argument("new_pool", type=click.Path(file_okay=False))
@click.option("--from-xml", "xml_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="thin_dump XML")
@click.option("--data", "data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="the data device or file the XML maps into")
@click.option("--names", type=click.Path(exists=True, dir_okay=False),
              help="the JSON sidecar of `pool dump --names` (else devices are named devN)")
@click.option("--copy", "mode", flag_value="copy", default=True, help="copy the data file (default)")
@click.option("--move", "mode", flag_value="move", help="move the data file into the pool")
@click.option("--reflink", "mode", flag_value="reflink", help="reflink the data file (btrfs, xfs)")
@click.pass_obj
def restore(settings, new_pool, xml_path, data, names, mode):
    """Build a new cowblock pool from thin_dump XML and its data file.

    \b
    Example:
      thin_dump /dev/mapper/meta > pool.xml
      cowblock pool restore --from-xml pool.xml --data /dev/mapper/data /var/lib/cowblock/pool
    """
    from ...interop import thinxml
    thinxml.restore(xml_path, data, new_pool, names_path=names, mode=mode)
    emit(settings, {"pool": new_pool}, lambda d: click.echo(f"restored pool {new_pool}"))


@command.command("copy")
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.pass_obj
def copy(settings, src, dst):
    """Copy the whole pool SRC to a new pool DST: every device, snapshot,
    name, label and read-only flag, the records, the settings; a block
    shared by devices is stored once in DST too.  Each of SRC and DST is a
    directory or rados:CEPHPOOL/NAME, so this moves a pool between hosts.

    DST must not exist.  It is built under a temporary name (a directory) or
    marked unfinished until the end (RADOS), so an interrupted copy leaves
    nothing that opens as a pool.  SRC is only read; as `qemu-img convert`
    does with an image in use, a copy refuses a pool that is in use for
    writing (a daemon with attachments or clients is named; an idle one is
    stopped first).

    
    Example:
      cowblock pool copy /var/lib/cowblock/pool rados:cowblock/pool
      cowblock pool copy rados:cowblock/pool /var/lib/cowblock/pool
    """
    from ... import poolcopy, rados
    from ...control import client
    poolcopy.check_location(src)
    poolcopy.check_location(dst)
    src_path = rados.resolve(src)
    if not rados.is_location(src) and not os.path.isfile(os.path.join(src_path, "metadata")):
        raise errors.PoolNotFoundError(f"no pool at {src} (no metadata file there)")
    # A daemon holding SRC: an idle one stops, a busy one is named.
    client.stop_idle_daemon(src_path)
    with poolcopy.open_source(src, timeout=settings.timeout) as pool, \
            progress_bar(f"copy {src}") as progress:
        result = poolcopy.copy(pool, dst, progress=progress)
    emit(settings, result.__dict__, lambda d: click.echo(
        f"copied pool {d['source']} to {d['dest']}: {d['devices']} "
        f"device{'s' if d['devices'] != 1 else ''}, {d['records']} "
        f"record{'s' if d['records'] != 1 else ''}, "
        f"{format_size(d['data_blocks'] * d['block_size'])} of data"))


@command.command("damage")
@click.argument("kind", type=click.Choice(__import__("cowblock.damage", fromlist=["KINDS"]).KINDS))
@click.pass_obj
def damage_(settings, kind):
    """FOR TESTING: damage the pool's metadata on purpose (a bit flip in a kind
    of block, truncation, a stale superblock, a wrong block size, or damage that
    keeps checksums valid), to see `pool check` find it and `--repair` fix it.
    The pool must not be open.

    \b
    Example:
      cowblock --pool /tmp/scratch pool damage refcount
      cowblock --pool /tmp/scratch pool check --repair
    """
    from ...damage import damage
    what = damage(settings.pool_path, kind)
    emit(settings, {"damage": kind, "done": what}, lambda d: click.echo(f"damaged: {what}"))
