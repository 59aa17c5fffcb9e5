"""The workloads of `cowblock bench`, each run on every available system.

Fairness (stated in the report too): the same durability on both sides
(overlayfs with -o volatile against cowblock without commits; the "synced"
figures fsync the file on every system), cold caches before each first write
(sync and drop_caches, when root), space measured for every system as
allocated bytes on the host (st_blocks), each figure the median of repeated
runs with min and max.
"""
import contextlib
import os
import shutil
import stat
import sysconfig
import statistics
import time

from .coldcache import drop_caches

MiB = 1 << 20


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": list(values)}


SOURCE_LIMIT = 64 * MiB


def copy_source_tree(dest, limit):
    """A real source tree: the Python standard library's .py files (up to
    limit bytes), as a package set or a checkout would be unpacked."""
    src = sysconfig.get_paths()["stdlib"]
    total = 0
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests",
                                                      "__pycache__", "idlelib", "tkinter"))
        for f in sorted(files):
            if not f.endswith(".py") or total >= limit:
                continue
            rel = os.path.relpath(os.path.join(root, f), src)
            os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
            shutil.copyfile(os.path.join(root, f), os.path.join(dest, rel))
            total += os.path.getsize(os.path.join(dest, rel))
    return total


def big_files(big_size):
    """The big files of the image, for the copy-up cost against file size."""
    return {"big-quarter.bin": big_size // 4, "big-half.bin": big_size // 2, "big.bin": big_size}


def make_tree(root, big_size, small_files=200, source_limit=SOURCE_LIMIT):
    """The image content: big files, a few hundred small ones, a
    database-like file and a real source tree."""
    os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    chunk = os.urandom(MiB)
    for name, size in big_files(big_size).items():
        with open(os.path.join(root, name), "wb") as f:
            for off in range(0, size, MiB):
                f.write(chunk[:min(MiB, size - off)])
    copy_source_tree(os.path.join(root, "usr", "lib", "python"), source_limit)
    os.makedirs(os.path.join(root, "var", "log"), exist_ok=True)
    for i in range(small_files):
        with open(os.path.join(root, "etc", f"f{i:04d}.conf"), "w") as f:
            f.write(f"setting {i} = {'x' * (i % 500)}\n")
    with open(os.path.join(root, "db.bin"), "wb") as f:
        f.write(os.urandom(8 * MiB))


def timed_write(path, offset, synced):
    """open(O_RDWR) + 4 KiB pwrite (+ fsync) + close: where overlayfs copies up."""
    data = os.urandom(4096)
    t = time.perf_counter()
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, data, offset)
    if synced:
        os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t


@contextlib.contextmanager
def mounted_container(system, name, scratch):
    """A new container of the image, mounted; unmounted and removed after.
    Yields (mount, directory)."""
    system.new_container(name)
    mnt = os.path.join(scratch, f"mnt-{system.name}-{name}")
    m = system.mount(name, mnt)
    try:
        yield m, mnt
    finally:
        system.unmount(m)
        system.remove_container(name)


def first_write(system, big_size, runs, scratch, synced):
    """Workload 1: 4 KiB into the middle of the big file, then again; and the
    first write into files of a quarter and half that size (copy-up cost
    against file size)."""
    first, second, space = [], [], []
    by_size = {size: [] for size in big_files(big_size).values()}
    for r in range(runs):
        with mounted_container(system, f"fw{r}", scratch) as (m, mnt):
            drop_caches(system)
            before = system.space()
            first.append(timed_write(os.path.join(mnt, "big.bin"), big_size // 2, synced))
            second.append(timed_write(os.path.join(mnt, "big.bin"), big_size // 2 + 8192, synced))
            system.flush(m)
            space.append(system.space() - before)
            by_size[big_size].append(first[-1])
            for fname, size in big_files(big_size).items():
                if size != big_size:
                    drop_caches(system)
                    by_size[size].append(timed_write(os.path.join(mnt, fname), size // 2, synced))
    return {"first_write_s": summary(first), "second_write_s": summary(second),
            "space_bytes": summary(space),
            "by_file_size": {str(s): summary(v) for s, v in by_size.items()}}


def fan_out(system, containers):
    """Workload 3: start many containers from one image (their writable roots)."""
    before = system.space()
    curve = []
    t = time.perf_counter()
    for i in range(containers):
        system.new_container(f"fan{i}")
        if (i + 1) % max(1, containers // 10) == 0 or i + 1 == containers:
            curve.append((i + 1, system.space() - before))
    elapsed = time.perf_counter() - t
    for i in range(containers):
        system.remove_container(f"fan{i}")
    return {"containers": containers, "seconds": elapsed,
            "per_container_ms": elapsed / containers * 1e3,
            "space_bytes": curve[-1][1], "space_curve": curve}


def churn(system, working_set, scratch):
    """Workload 4: write a working set in a container, commit it as a layer,
    delete the container: what the host gets back, and what the layer keeps."""
    base = system.space()
    system.new_container("churn")
    mnt = os.path.join(scratch, f"mnt-{system.name}-churn")
    m = system.mount("churn", mnt)
    os.makedirs(os.path.join(mnt, "work"), exist_ok=True)
    chunk = os.urandom(MiB)
    for i in range(max(1, working_set // MiB)):
        with open(os.path.join(mnt, "work", f"w{i}"), "wb") as f:
            f.write(chunk)
    system.flush(m)
    system.unmount(m)
    written = system.space() - base
    system.layer_from_container("churn", "churn-layer")
    committed = system.space() - base
    system.remove_container("churn")
    removed = system.space() - base
    return {"working_set_bytes": working_set, "written_bytes": written,
            "after_commit_bytes": committed, "after_remove_bytes": removed,
            "reclaimed_bytes": committed - removed}


def depth(system, depths, scratch, fs_size, runs=3):
    """Workload 2: cold lookups and reads through 1..N layers.  Each layer
    above the image holds a little data of its own (a file for the unions, a
    few blocks past the filesystem's end for the block systems), and the
    files read come from the bottom one."""
    out = {}
    made = 0
    saved = system.top_state()
    for d in depths:
        while made < d:
            system.add_layer(f"L{made}", fs_size + made * 4096)
            made += 1
        name = f"depth{d}"
        system.new_container(name)
        mnt = os.path.join(scratch, f"mnt-{system.name}-{name}")
        m = system.mount(name, mnt)
        stats, reads = [], []
        for _ in range(runs):
            drop_caches(system)
            t = time.perf_counter()
            etc = os.path.join(mnt, "etc")
            for f in os.listdir(etc):
                os.stat(os.path.join(etc, f))
            stats.append(time.perf_counter() - t)
            drop_caches(system)
            t = time.perf_counter()
            with open(os.path.join(mnt, "db.bin"), "rb") as f:
                while f.read(MiB):
                    pass
            reads.append(time.perf_counter() - t)
        system.unmount(m)
        system.remove_container(name)
        out[str(d)] = {"stat_all_s": statistics.median(stats), "read_8mib_s": statistics.median(reads),
                       "stat_runs": stats, "read_runs": reads}
    system.set_top_state(saved)  # later workloads start from the image again
    return out


def realistic_mix(system, scratch, synced, runs=3):
    """Workload 5: in a container of an image holding a real source tree,
    modify a few source files, append to a log, and rewrite a database-like
    file at random offsets; time each step, and the space the container takes."""
    import random
    steps = {"modify 20 source files": [], "append 2000 log lines": [],
             "rewrite 500 random 4 KiB pages of an 8 MiB file": []}
    space = []
    for r in range(runs):
        name = f"mix{r}"
        system.new_container(name)
        mnt = os.path.join(scratch, f"mnt-{system.name}-{name}")
        m = system.mount(name, mnt)
        drop_caches(system)
        before = system.space()
        sources = []
        for root, _, files in os.walk(os.path.join(mnt, "usr", "lib", "python")):
            sources += [os.path.join(root, f) for f in files]
            if len(sources) > 200:
                break
        t = time.perf_counter()
        for path in sorted(sources)[:20]:
            with open(path, "a") as f:
                f.write("# patched in the container\n")
                if synced:
                    f.flush()
                    os.fsync(f.fileno())
        steps["modify 20 source files"].append(time.perf_counter() - t)
        t = time.perf_counter()
        with open(os.path.join(mnt, "var", "log", "app.log"), "a") as f:
            for i in range(2000):
                f.write(f"request {i} served in {i % 97} ms\n")
            if synced:
                f.flush()
                os.fsync(f.fileno())
        steps["append 2000 log lines"].append(time.perf_counter() - t)
        rng = random.Random(r)
        page = os.urandom(4096)
        t = time.perf_counter()
        fd = os.open(os.path.join(mnt, "db.bin"), os.O_RDWR)
        for _ in range(500):
            os.pwrite(fd, page, rng.randrange(8 * MiB // 4096) * 4096)
        if synced:
            os.fsync(fd)
        os.close(fd)
        steps["rewrite 500 random 4 KiB pages of an 8 MiB file"].append(time.perf_counter() - t)
        system.flush(m)
        space.append(system.space() - before)
        system.unmount(m)
        system.remove_container(name)
    return {"steps_s": {k: summary(v) for k, v in steps.items()}, "space_bytes": summary(space)}


# ---- the real image (cowblock.bench.realimage), loaded by each system its own way ----
def _warm(paths):
    """Read the layer blobs into the page cache: every system starts from
    blobs in memory, as after a pull."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(MiB):
                pass


def _regular_files(root):
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(d, f)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                out.append((path, st.st_size))
    return out


def image_load(system, image, runs, scratch):
    """Load the image (timed; each run after the first unloads it first),
    then check a container of it: the files the image's layers add are
    there, those its last layer deletes are gone.  Returns the times, the
    space the image takes and the largest file of its rootfs (for
    image_first_write)."""
    blobs = [path for path, _ in image.layers("first")]
    system.prepare_image(image)
    before = system.space()
    times = []
    for r in range(runs):
        if r:
            system.unload_image()
        _warm(blobs)
        t = time.perf_counter()
        system.load_image(image)
        times.append(time.perf_counter() - t)
    space = system.space() - before
    with mounted_container(system, "image-check", scratch) as (_, mnt):
        wrong = [rel for rel, present in image.probes.items()
                 if os.path.lexists(os.path.join(mnt, rel)) != present]
        files = _regular_files(mnt)
        largest, size = max(files, key=lambda f: f[1])
    if wrong:
        raise AssertionError(f"the loaded image is wrong at {', '.join(wrong)}: expected "
                             f"{', '.join(str(image.probes[w]) for w in wrong)}")
    return {"load_s": summary(times), "layers": len(blobs), "space_bytes": space,
            "files": len(files), "largest_file": os.path.relpath(largest, mnt),
            "largest_file_bytes": size}


def image_first_write(system, rel, size, runs, scratch, synced):
    """4 KiB into the middle of the image's largest file (a shared library):
    a copy-up of the whole file on the unions, one block on the others."""
    first, space = [], []
    for r in range(runs):
        with mounted_container(system, f"ifw{r}", scratch) as (m, mnt):
            drop_caches(system)
            before = system.space()
            first.append(timed_write(os.path.join(mnt, rel), size // 2 & ~4095, synced))
            system.flush(m)
            space.append(system.space() - before)
    return {"file": rel, "file_bytes": size, "first_write_s": summary(first),
            "space_bytes": summary(space)}


def image_read_all(system, runs, scratch):
    """Cold read of every regular file of the rootfs in a container (what
    a scan, a checksum or an antivirus does): the cost of the layers on reads."""
    times, total = [], 0
    with mounted_container(system, "iread", scratch) as (_, mnt):
        for _ in range(runs):
            drop_caches(system)
            t = time.perf_counter()
            total = 0
            for path, _ in _regular_files(mnt):
                with open(path, "rb") as f:
                    while chunk := f.read(MiB):
                        total += len(chunk)
            times.append(time.perf_counter() - t)
    return {"read_s": summary(times), "bytes": total}
