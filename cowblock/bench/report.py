"""Reports of `cowblock bench`: a terminal table (rich), a JSON file of every
figure, PNG plots (matplotlib) and a markdown report."""
import json
import os

from ..errors import MissingExtraError

MiB = 1 << 20

FAIRNESS = """Fairness rules: the same durability on every side (overlayfs mounted with
`-o volatile` against cowblock without commits; with `--synced`, every write is
fsynced on every system); sync and cold caches (drop_caches, as root) before
each first write and each cold read, after the pool daemon has given back
the pages of the files it maps (drop_caches leaves mapped pages alone); space measured the same way for every system, as bytes
allocated on the host (st_blocks); each time the median of the runs, with min
and max.  Starting a container means creating its writable root: a snapshot
(cowblock), an upper and work directory (overlayfs), an overlay file (qcow2).
File-level workloads run on a real ext4 (cowblock through its pool daemon's
device file and a loop device; qcow2 through qemu-nbd, nbdfuse and a loop
device) or on the union mount itself.  Loading the real OCI image starts from
its layer blobs in the page cache and ends with everything synced: cowblock
`image load` (one ext4 snapshot per layer), overlayfs and fuse-overlayfs
`tar -x` of each layer into a lower directory (whiteouts made overlayfs')
then syncfs, qcow2 one overlay per layer with the layer applied by the OCI
rules; the one-time set-up (cowblock's empty filesystem, qcow2's empty ext4
base) is not timed."""


def _ms(s):
    return f"{s * 1e3:,.2f} ms"


def _mib(b):
    return f"{b / MiB:,.2f} MiB"


def rows(results):
    """(workload, system, figure, value) rows for the table and the markdown."""
    out = []
    w = results["workloads"]
    for key, wl in w.items():
        for name, r in wl.items():
            if "error" in r:
                out.append((key, name, "error", r["error"][:300]))
    w = {k: {n: r for n, r in wl.items() if "error" not in r} for k, wl in w.items()}
    for name, r in w["first_write"].items():
        if "skipped" in r:
            out.append(("first 4 KiB write into the big file", name, "skipped", r["skipped"]))
            continue
        f, s, sp = r["first_write_s"], r["second_write_s"], r["space_bytes"]
        out.append(("first 4 KiB write into the big file", name, "time",
                    f"{_ms(f['median'])} ({_ms(f['min'])} to {_ms(f['max'])})"))
        out.append(("first 4 KiB write into the big file", name, "second write",
                    f"{_ms(s['median'])}"))
        out.append(("first 4 KiB write into the big file", name, "space used", _mib(sp["median"])))
    for name, r in w.get("realistic_mix", {}).items():
        if "skipped" in r:
            continue
        for step, v in r["steps_s"].items():
            out.append((f"realistic mix: {step}", name, "time", _ms(v["median"])))
        out.append(("realistic mix", name, "space used", _mib(r["space_bytes"]["median"])))
    for name, r in w.get("depth", {}).items():
        if "skipped" in r:
            continue
        for d, v in r.items():
            out.append((f"cold stat of 200 files / read of 8 MiB at layer depth {d}", name,
                        "time", f"{_ms(v['stat_all_s'])} / {_ms(v['read_8mib_s'])}"))
    for name, r in w["fan_out"].items():
        if "skipped" in r:
            continue
        out.append((f"start {r['containers']} containers", name, "time",
                    f"{r['seconds']:.3f} s ({r['per_container_ms']:.2f} ms each)"))
        out.append((f"start {r['containers']} containers", name, "space used",
                    _mib(r["space_bytes"])))
    for name, r in w["churn"].items():
        if "skipped" in r:
            continue
        label = f"churn: write {_mib(r['working_set_bytes'])}, commit as a layer, remove"
        out.append((label, name, "space after writing", _mib(r["written_bytes"])))
        out.append((label, name, "space with container and layer", _mib(r["after_commit_bytes"])))
        out.append((label, name, "space after removing the container",
                    _mib(r["after_remove_bytes"])))
    out += _image_rows(results, w)
    for name, s in results["systems"].items():
        if s.get("error"):
            out.append(("(system failed)", name, "error", s["error"][:300]))
        if s.get("cold_caveat"):
            out.append(("(cold reads not cold)", name, "caveat", s["cold_caveat"]))
    return out


def _image_rows(results, w):
    out = []
    for name, r in w.get("image_load", {}).items():
        if "skipped" in r:
            out.append(("load the real image", name, "skipped", r["skipped"]))
            continue
        t = r["load_s"]
        out.append((f"load the real image ({r['layers']} layers)", name, "time",
                    f"{t['median']:.3f} s ({t['min']:.3f} to {t['max']:.3f} s)"))
        out.append((f"load the real image ({r['layers']} layers)", name, "space used",
                    _mib(r["space_bytes"])))
    for name, r in w.get("image_first_write", {}).items():
        if "skipped" not in r:
            label = f"first 4 KiB write into the image's {r['file']} ({_mib(r['file_bytes'])})"
            out.append((label, name, "time", _ms(r["first_write_s"]["median"])))
            out.append((label, name, "space used", _mib(r["space_bytes"]["median"])))
    for name, r in w.get("image_fan_out", {}).items():
        if "skipped" not in r:
            out.append((f"start {r['containers']} containers of the real image", name, "time",
                        f"{r['seconds']:.3f} s ({r['per_container_ms']:.2f} ms each)"))
    for name, r in w.get("image_read_all", {}).items():
        if "skipped" not in r:
            out.append((f"cold read of every file of the real image ({_mib(r['bytes'])})", name,
                        "time", _ms(r["read_s"]["median"])))
    return out


def print_table(results):
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"cowblock bench (scale {results['scale']}, {results['runs']} runs)")
    for c in ("workload", "system", "figure", "value"):
        t.add_column(c)
    for r in rows(results):
        t.add_row(*r)
    Console().print(t)


def write_json(results, path):
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


def plots(results, out_dir):
    """PNG plots: space vs containers, read time vs layer depth, copy-up cost
    vs file size, first-write time per system."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("the bench plots need matplotlib: pip install 'cowblock[bench]'") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results["workloads"]["fan_out"].items():
        if "space_curve" in r:
            xs, ys = zip(*r["space_curve"])
            ax.plot(xs, [y / MiB for y in ys], marker="o", label=name)
    ax.set_xlabel("containers started")
    ax.set_ylabel("host space used (MiB)")
    ax.set_title("Space vs containers")
    ax.legend()
    path = os.path.join(out_dir, "space_vs_containers.png")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results["workloads"].get("depth", {}).items():
        if "skipped" not in r and r:
            ds = sorted(int(d) for d in r)
            ax.plot(ds, [r[str(d)]["read_8mib_s"] * 1e3 for d in ds], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("layers")
    ax.set_ylabel("cold read of an 8 MiB file (ms)")
    ax.set_title("Read cost vs layer depth")
    ax.legend()
    path = os.path.join(out_dir, "time_vs_depth.png")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results["workloads"]["first_write"].items():
        if "by_file_size" in r:
            sizes = sorted(int(s) for s in r["by_file_size"])
            ax.plot([s / MiB for s in sizes], [r["by_file_size"][str(s)]["median"] * 1e3
                                              for s in sizes], marker="o", label=name)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("first 4 KiB write (ms)")
    ax.set_yscale("log")
    ax.set_title("Copy-up cost vs file size")
    ax.legend()
    path = os.path.join(out_dir, "copy_up_vs_file_size.png")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    names, vals, errs = [], [], []
    for name, r in results["workloads"]["first_write"].items():
        if "first_write_s" in r:
            f = r["first_write_s"]
            names.append(name)
            vals.append(f["median"] * 1e3)
            errs.append([[f["median"] * 1e3 - f["min"] * 1e3], [f["max"] * 1e3 - f["median"] * 1e3]])
    if names:
        lo = [e[0][0] for e in errs]
        hi = [e[1][0] for e in errs]
        ax.bar(names, vals, yerr=[lo, hi], capsize=4)
        ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    big = results["parameters"]["big_file_bytes"] // MiB
    ax.set_title(f"First 4 KiB write into a {big} MiB file (copy-up cost)")
    path = os.path.join(out_dir, "first_write.png")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written


def markdown(results, path, command, images=()):
    lines = [f"# cowblock bench: block CoW against file-level union and qcow2", "",
             f"Command: `{command}`", "",
             f"Machine: {results['machine'].get('platform')}, {results['machine'].get('cpus')} CPUs; "
             f"started {results['started']}; scale {results['scale']}, {results['runs']} runs; "
             f"big file {results['parameters']['big_file_bytes'] // MiB} MiB.", "",
             FAIRNESS, "", "| workload | system | figure | value |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(results)]
    image = results.get("oci_image", {})
    if image.get("skipped"):
        lines += ["", f"The real image: skipped ({image['skipped']})."]
    elif image:
        lines += ["", f"The real image: {image.get('source', 'generated')}, "
                  f"{len(image['layers'])} layers of "
                  f"{' + '.join(_mib(la['blob_bytes']) for la in image['layers'])} (compressed)."]
    skipped = {n: s["skipped"] for n, s in results["systems"].items() if s.get("skipped")}
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{n}: {why}" for n, why in skipped.items())]
    lines += [""] + [f"![{os.path.basename(i)}]({os.path.basename(i)})" for i in images]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
