import click

from ..common import emit, table, with_pool


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--same", is_flag=True, help="also list ranges whose mappings are the same")
@click.option("--content", is_flag=True,
              help="also compare the bytes where mappings differ (different -> changed/equal)")
@click.option("--format", "fmt", type=click.Choice(["table", "thin-delta"]), default="table",
              help="thin-delta: thin_delta's XML")
@with_pool(read_only=True)
def command(settings, pool, a, b, same, content, fmt):
    """Block ranges whose mappings differ between A and B (thin_delta's
    left_only / right_only / different / same); reads only what they do not share.

    \b
    Example:
      cowblock diff layer1 web-1 --content
    """
    if fmt == "thin-delta":
        from ...interop.thinxml import delta
        click.echo(delta(pool, a, b), nl=False)
        return
    bs = pool.block_size
    ranges = []
    for r in pool.diff(a, b, same=same):
        rec = {"kind": r.kind, "begin": r.begin, "length": r.length,
               "offset": r.begin * bs, "bytes": r.length * bs}
        if content and r.kind != "same":
            rec["content"] = compare(pool, a, b, r, bs)
        ranges.append(rec)

    def human(rows):
        if not rows:
            click.echo(f"{a} and {b} map every block the same")
            return
        cols = ["KIND", "BEGIN", "LENGTH"] + (["CONTENT"] if content else [])
        table([[r["kind"], r["begin"], r["length"]] + ([r.get("content", "-")] if content else [])
               for r in rows], cols)
    emit(settings, {"a": a, "b": b, "block_size": bs, "ranges": ranges},
         lambda d: human(d["ranges"]))


def compare(pool, a, b, r, bs):
    """'equal' when the bytes of the range match despite different mappings."""
    da, db = pool.device(a), pool.device(b)
    step = max(bs, 1 << 20)
    for off in range(r.begin * bs, (r.begin + r.length) * bs, step):
        n = min(step, (r.begin + r.length) * bs - off)
        xa = da.pread(max(0, min(n, da.size - off)), off) if off < da.size else b""
        xb = db.pread(max(0, min(n, db.size - off)), off) if off < db.size else b""
        if xa.rstrip(b"\0") != xb.rstrip(b"\0") or (xa != xb and len(xa) == len(xb)):
            return "changed"
    return "equal"
