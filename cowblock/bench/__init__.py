"""`cowblock bench`: block-level CoW against file-level union and qcow2 chains.

run() builds one image (a directory tree with a big file, small files and a
database-like file), gives it to every system that can run here, runs the
workloads on each, then loads a real OCI image (realimage: Debian minbase
in three layers) on each and runs the workloads that make sense on its
rootfs; it returns every figure with the machine's details; report.py turns
that into a table, JSON, plots and a markdown report.
"""
import contextlib
import os
import platform
import shutil
import tempfile
import time

from . import realimage, workloads
from .systems import all_systems, make_ext4_image

MiB = 1 << 20


def machine():
    info = {"python": platform.python_version(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        with open("/proc/meminfo") as f:
            info["memory_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    return info


IMAGE_WORKLOADS = ("image_load", "image_first_write", "image_fan_out", "image_read_all")


def real_image(build=True, progress=print):
    """The real image (realimage.minbase_image(), built when BUILD and not
    cached yet), or the reason there is none."""
    if not build and not realimage.cached():
        return None, ("the Debian minbase image is not built yet (a few minutes, once; "
                      "`cowblock bench` without --quick builds it)")
    try:
        return realimage.minbase_image(progress=progress), None
    except realimage.Unavailable as e:
        return None, str(e)


def run(scale=1.0, runs=5, root=None, synced=False, progress=print, depths=None,
        oci_image=None, oci_skipped="no real image was given"):
    """Every workload on every available system; scale 1.0 is a 1 GiB file and
    100 containers, 0.05 a quick run.  OCI_IMAGE (a realimage.Image) is the
    real image the image workloads load; without one they are reported
    skipped with OCI_SKIPPED as the reason."""
    big = max(4, int(1024 * scale)) * MiB
    containers = max(5, int(100 * scale))
    working_set = max(4, int(256 * scale)) * MiB
    depths = depths or ([1, 8, 32, 128] if scale >= 0.5 else [1, 4, 8])
    scratch = root or tempfile.mkdtemp(prefix="cowblock-bench-", dir="/var/tmp")
    os.makedirs(scratch, exist_ok=True)
    results = {"machine": machine(), "scale": scale, "runs": runs, "synced": synced,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "parameters": {"big_file_bytes": big, "containers": containers,
                              "working_set_bytes": working_set, "depths": depths},
               "systems": {}, "workloads": {"first_write": {}, "depth": {}, "fan_out": {},
                                            "churn": {}, "realistic_mix": {},
                                            **{k: {} for k in IMAGE_WORKLOADS}},
               "oci_image": dict(oci_image.info) if oci_image else {"skipped": oci_skipped}}
    try:
        tree = os.path.join(scratch, "tree")
        workloads.make_tree(tree, big, source_limit=max(2 * MiB, int(64 * MiB * min(scale, 1))))
        image = os.path.join(scratch, "image.raw")
        # room in the filesystem for the churn's working set, twice over; and
        # past its end, room for the layers' own blocks (the depth workload)
        fs_size = 2 * big + 2 * working_set + 192 * MiB
        make_ext4_image(tree, image, fs_size)
        os.truncate(image, fs_size + max(depths) * 4096 + 4 * MiB)
        for system in all_systems(os.path.join(scratch, "systems"), volatile=not synced):
            why = system.available()
            results["systems"][system.name] = {"available": why is None, "skipped": why}
            if why:
                progress(f"{system.name}: skipped ({why})")
                for w in results["workloads"].values():
                    w[system.name] = {"skipped": why}
                continue
            try:
                progress(f"{system.name}: building the image")
                system.build_image(tree, image, os.path.getsize(image))
            except Exception as e:  # a peer failing is reported, not hidden
                results["systems"][system.name]["error"] = f"building the image: {e}"
                progress(f"{system.name}: failed: {e}")
                system.close()
                continue
            steps = [
                ("first_write", "first write into the big file",
                 lambda s: workloads.first_write(s, big, runs, scratch, synced)),
                ("realistic_mix", "a realistic mix (sources, a log, a database file)",
                 lambda s: workloads.realistic_mix(s, scratch, synced, runs)),
                ("fan_out", f"fan-out of {containers} containers",
                 lambda s: workloads.fan_out(s, containers)),
                ("depth", f"read cost at layer depths {depths}",
                 lambda s: workloads.depth(s, depths, scratch, fs_size, runs)),
                ("churn", f"churn of a {working_set // MiB} MiB working set",
                 lambda s: workloads.churn(s, working_set, scratch)),
            ]
            try:
                for key, what, step in steps:
                    _step(results, system, key, what, step, progress)
                if oci_image is None:
                    for key in IMAGE_WORKLOADS:
                        results["workloads"][key][system.name] = {"skipped": oci_skipped}
                else:
                    _image_steps(results, system, oci_image, scratch, containers, runs, synced,
                                 progress)
            finally:
                if system.cold_caveat:
                    results["systems"][system.name]["cold_caveat"] = system.cold_caveat
                    progress(f"{system.name}: {system.cold_caveat}: its cold reads are warm on the host")
                system.close()
    finally:
        if root is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return results


def _step(results, system, key, what, step, progress):
    """Run one workload on one system; a failure is reported, and the other
    workloads go on."""
    progress(f"{system.name}: {what}")
    try:
        results["workloads"][key][system.name] = out = step(system)
        return out
    except Exception as e:
        results["workloads"][key][system.name] = {"error": f"{type(e).__name__}: {e}"}
        progress(f"{system.name}: {key} failed: {e}")
        for m in list(system.mounted):
            with contextlib.suppress(Exception):
                system.unmount(m)
        return None


def _image_steps(results, system, image, scratch, containers, runs, synced, progress):
    """The workloads of the real image: load it (a few times at full scale,
    once in a quick run: a load takes seconds), then on its rootfs a first
    write, a fan-out and a cold read of every file (as many times)."""
    loads = reads = min(runs, 3) if results["scale"] >= 0.5 else 1
    loaded = _step(results, system, "image_load",
                   f"load the {len(image.layers('first'))}-layer image", lambda s:
                   workloads.image_load(s, image, loads, scratch), progress)
    later = [("image_first_write", "first write into the image's largest file", lambda s:
              workloads.image_first_write(s, loaded["largest_file"],
                                          loaded["largest_file_bytes"], runs, scratch, synced)),
             ("image_fan_out", f"fan-out of {containers} containers of the image",
              lambda s: workloads.fan_out(s, containers)),
             ("image_read_all", "cold read of every file of the image",
              lambda s: workloads.image_read_all(s, reads, scratch))]
    for key, what, step in later:
        if loaded is None:
            results["workloads"][key][system.name] = {"skipped": "the image did not load"}
        else:
            _step(results, system, key, what, step, progress)
