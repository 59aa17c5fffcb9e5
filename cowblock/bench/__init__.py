"""`cowblock bench`: block-level CoW against file-level union and qcow2 chains.

run() builds one image (a directory tree with a big file, small files and a
database-like file), gives it to every system that can run here, runs the
workloads on each, and returns every figure with the machine's details;
report.py turns that into a table, JSON, plots and a markdown report.
"""
import contextlib
import os
import platform
import shutil
import tempfile
import time

from . import workloads
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


def run(scale=1.0, runs=5, root=None, synced=False, progress=print, depths=None):
    """Every workload on every available system; scale 1.0 is a 1 GiB file and
    100 containers, 0.05 a quick run."""
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
                                            "churn": {}, "realistic_mix": {}}}
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
                    progress(f"{system.name}: {what}")
                    try:
                        results["workloads"][key][system.name] = step(system)
                    except Exception as e:  # reported, and the other workloads go on
                        results["workloads"][key][system.name] = {"error": f"{type(e).__name__}: {e}"}
                        progress(f"{system.name}: {key} failed: {e}")
                        for m in list(system.mounted):
                            with contextlib.suppress(Exception):
                                system.unmount(m)
            finally:
                system.close()
    finally:
        if root is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return results
