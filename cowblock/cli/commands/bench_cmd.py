import os
import sys

import click

from ..common import pass_settings


@click.command("bench")
@click.option("--quick", is_flag=True, help="a one-minute run (scale 0.05, 3 runs)")
@click.option("--scale", type=float, default=None, help="size factor: 1.0 = a 1 GiB file, 100 containers")
@click.option("--runs", type=click.IntRange(1, 100), default=None, help="repetitions per figure")
@click.option("--synced", is_flag=True, help="fsync every write on every system (default: none)")
@click.option("--no-image", is_flag=True,
              help="leave out the real image (Debian minbase in 3 OCI layers, built with "
              "mmdebstrap and umoci once and cached under /var/tmp; --quick uses it only "
              "when built)")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="where to write results.json, report.md and the plots")
@pass_settings
def command(settings, quick, scale, runs, synced, no_image, out):
    """Compare block-level CoW (cowblock) with file-level union (overlayfs,
    fuse-overlayfs) and qcow2 backing chains on the same image and workloads:
    first small write into a big file, starting many containers, layer churn;
    then loading a real OCI image and the same on its rootfs.  Systems that cannot run here are reported as skipped, with the reason.

    \b
    Example:
      cowblock bench --quick
      cowblock bench --scale 1 --runs 5 --out benchmarks/results/full
    """
    from ...bench import real_image, report, run

    def progress(m):
        click.echo(f"bench: {m}", err=True)
    scale = scale if scale is not None else (0.05 if quick else 1.0)
    runs = runs or (3 if quick else 5)
    image, why = (None, "left out (--no-image)") if no_image else \
        real_image(build=not quick, progress=progress)
    if why:
        progress(f"the real image: skipped ({why})")
    results = run(scale=scale, runs=runs, synced=synced, progress=progress, oci_image=image,
                  oci_skipped=why)
    if settings.json:
        import json
        click.echo(json.dumps(results, indent=2))
    else:
        report.print_table(results)
    if out:
        os.makedirs(out, exist_ok=True)
        report.write_json(results, os.path.join(out, "results.json"))
        images = report.plots(results, out)
        report.markdown(results, os.path.join(out, "report.md"),
                        "cowblock bench " + " ".join(sys.argv[2:]), images)
        click.echo(f"bench: wrote {out}/results.json, report.md and {len(images)} plots", err=True)
