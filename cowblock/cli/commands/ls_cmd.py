import click

from ..common import emit, format_size, table, with_pool


def device_record(info):
    """What ls and info show of a DeviceInfo (with its usage, if it has it)."""
    d = {"name": info.name, "id": info.id, "uuid": info.uuid, "origin": info.origin,
         "size": info.size, "mapped": info.mapped_bytes, "read_only": info.read_only,
         "created": info.created.isoformat(timespec="seconds"), "labels": info.labels}
    if info.exclusive_blocks is not None:
        d.update(exclusive=info.exclusive_blocks * info.block_size,
                 shared=info.shared_blocks * info.block_size)
    return d


@click.command("ls")
@click.option("--usage", is_flag=True, help="add exclusive and shared bytes (walks each tree)")
@click.option("--tree", is_flag=True, help="show the snapshot tree")
@click.option("--format", "fmt", type=click.Choice(["table", "thin-ls"]), default="table",
              help="thin-ls: thin_ls's fields (DEV, MAPPED/EXCLUSIVE/SHARED blocks and bytes, ...)")
@with_pool(read_only=True)
def command(settings, pool, usage, tree, fmt):
    """List devices, like lvs.

    \b
    Example:
      cowblock ls --usage
      cowblock ls --tree
    """
    if fmt == "thin-ls":
        from ...interop.thinxml import thin_ls_rows
        rows = thin_ls_rows(pool)
        cols = list(rows[0]) if rows else ["DEV"]
        emit(settings, rows, lambda rs: table([[r[c] for c in cols] for r in rs], cols))
        return
    records = [device_record(i) for i in pool.list(usage=usage)]

    def human(rows):
        if tree:
            children = {}
            for r in rows:
                children.setdefault(r["origin"], []).append(r)

            def walk(parent, depth):
                for r in children.get(parent, []):
                    flag = " (ro)" if r["read_only"] else ""
                    click.echo(f"{'  ' * depth}{'└─ ' if depth else ''}{r['name']}{flag}")
                    walk(r["name"], depth + 1)
            names = {r["name"] for r in rows}
            for root in [r for r in rows if r["origin"] not in names]:
                children.setdefault("\0root", []).append(root)
            walk("\0root", 0)
            return
        cols = ["NAME", "ORIGIN", "SIZE", "MAPPED", "RO", "CREATED"]
        if usage:
            cols += ["EXCLUSIVE", "SHARED"]
        out = []
        for r in rows:
            row = [r["name"], r["origin"] or "-", format_size(r["size"]), format_size(r["mapped"]),
                   "ro" if r["read_only"] else "rw", r["created"].replace("T", " ")]
            if usage:
                row += [format_size(r["exclusive"]), format_size(r["shared"])]
            out.append(row)
        table(out, cols)
    emit(settings, records, human)
