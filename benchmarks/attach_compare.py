"""Local attach paths side by side: fio inside a mounted ext4 on each.

    python benchmarks/attach_compare.py [--rounds 3] [--seconds 10] [--size-mib 4096]
        [--file-mib 1024] [--only SYSTEM,...] [--json benchmarks/results/attach.json]

Systems (each an ext4 of the same size, made by mkfs.ext4 with the same
options, holding one fio file laid out by a sequential write first, so
every system starts with the same filesystem state and fully written data):
  fuse        cowblock's in-process FUSE server (cowblock.attach): device file
              -> loop device -> ext4
  nbdfuse     today's path: cowblock's NBD server in this process, nbdfuse,
              a loop device (as cowblock/bench/systems.py mounts it)
  fuse-file   a minimal libfuse server of our own (benchmarks/fuse_file_server.c,
              built here) serving a plain sparse file with pread/pwrite, with
              the same FUSE flags, through the same loop path: the FUSE ceiling
  loop-file   ext4 on a loop device over a plain sparse file (losetup's default,
              buffered; loop-file+loopdirect: --direct-io=on): the kernel ceiling
  overlayfs   overlayfs on the host filesystem (fio's file in the upper dir)
Variants of the FUSE systems: NAME[+flag...] with flags from FLAGS below,
e.g. --only fuse+pagecache,fuse-file+pagecache.  Default flags: direct_io,
parallel direct writes, losetup --direct-io=on, and the loop device's
readahead as cowblock mount sets it (cowblock.daemon.mounts.READAHEAD).

fio: direct=1, libaio, iodepth 16, one job; 4 KiB randread, 4 KiB randwrite,
1 MiB sequential read and write; time-based runs.  Rounds are interleaved
(every workload on every system, then again), and each figure is the median
of the rounds.  Two counts that a loaded machine does not blur go with each
run into the JSON: MiB written to the host disk per GiB fio wrote, and the
serving processes' CPU seconds per GiB fio moved.  Needs root, /dev/fuse, loop devices, fio, nbdfuse, libfuse3-dev.
"""
import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from cowblock import Pool  # noqa: E402
from cowblock.attach import FuseAttach, FuseOptions  # noqa: E402
from cowblock.daemon.mounts import READAHEAD as MOUNT_READAHEAD  # noqa: E402

MiB = 1 << 20
WORKLOADS = [("randread-4k", "randread", "4k"), ("randwrite-4k", "randwrite", "4k"),
             ("read-1m", "read", "1M"), ("write-1m", "write", "1M"),
             ("cold-read-8m", None, None)]
# Variant flags of the FUSE systems: (FuseOptions changes, fuse_file_server words, loop dio)
FLAGS = {
    "pagecache": ({"direct_io": False, "parallel_direct_writes": False}, ["-direct_io"], None),
    "keepcache": ({"keep_cache": True}, ["keep_cache"], None),
    "writeback": ({"writeback_cache": True}, ["writeback"], None),
    "serial": ({"parallel_direct_writes": False}, ["-parallel"], None),
    "loopbuffered": ({}, [], False),
    "loopdirect": ({}, [], True),   # loop-file with losetup --direct-io=on, as cowblock mounts
    "t2": ({"threads": 2}, ["threads=2"], None),
    "t4": ({"threads": 4}, ["threads=4"], None),
    "t8": ({"threads": 8}, ["threads=8"], None),
    "t16": ({"threads": 16}, ["threads=16"], None),
    "t32": ({"threads": 32}, ["threads=32"], None),
    "bg12": ({"max_background": 12}, ["max_background=12"], None),
    "nocommit": ({}, [], None),   # the pool without its once-a-second commit (diagnosis only)
    # the periodic commit as it was before cb_pool_checkpoint: a full commit
    # (an fsync of the data file after any write) every second
    "fullcommit": ({}, [], None),
    "ra4m": ({}, [], None),       # the loop device's readahead at 4 MiB (blockdev --setra)
    "kernelra": ({}, [], None),   # a FUSE system's loop device with the kernel's readahead (128 KiB)
}


def run(*argv, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def wait(cond, seconds, what):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def mkfs_mount(dev, directory):
    # One set of options for every system (lazy init off: no background
    # zeroing running under the measurements).
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
    os.makedirs(directory, exist_ok=True)
    run("mount", dev, directory)


class System:
    def __init__(self, root, size, flags):
        self.root, self.size, self.flags = root, size, flags
        os.makedirs(root, exist_ok=True)
        self.mnt = os.path.join(root, "mnt")
        self.loop = None
        # The FUSE ceiling runs with cowblock's defaults, changed by the same flags.
        self.opts, dio = {}, True
        self.server_words = ["direct_io", "parallel", f"threads={FuseOptions().threads}"]
        self.commit_interval = 0 if {"nocommit", "fullcommit"} & set(flags) else 1.0
        for flag in flags:
            o, words, d = FLAGS[flag]
            self.opts.update(o)
            for w in words:
                if w.startswith("-"):
                    self.server_words.remove(w[1:])
                else:
                    self.server_words.append(w)
            dio = dio if d is None else d
        self.loop_dio = dio

    def attach_loop(self, path, readahead=None):
        """readahead: bytes, as cowblock mount sets it on a FUSE file's loop device."""
        self.loop = run("losetup", "-f", "--show", f"--direct-io={'on' if self.loop_dio else 'off'}",
                        path)
        if "ra4m" in self.flags:
            readahead = 4 * MiB
        elif "kernelra" in self.flags:
            readahead = None
        if readahead:
            run("blockdev", "--setra", str(readahead // 512), self.loop)
        mkfs_mount(self.loop, self.mnt)

    def server_pids(self):
        """The processes that serve the device file (none: the kernel alone)."""
        return []

    def close(self):
        with contextlib.suppress(Exception):
            run("umount", self.mnt)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)


class Fuse(System):
    def setup(self):
        self.pool = Pool.create(os.path.join(self.root, "pool"), 2 * self.size, 65536,
                                commit_interval=self.commit_interval)
        self.pool.create_thin("dev", self.size)
        self.attach = FuseAttach(self.pool, os.path.join(self.root, "dev"),
                                 FuseOptions(**self.opts)).start()
        self.attach_loop(self.attach.add("dev"), MOUNT_READAHEAD)
        self.stop_commits = threading.Event()
        if "fullcommit" in self.flags:
            threading.Thread(target=self.commit_every_second, daemon=True).start()

    def server_pids(self):
        return [os.getpid()]   # the server's threads run in this process (idle during fio)

    def commit_every_second(self):
        while not self.stop_commits.wait(1.0):
            self.pool.commit()

    def close(self):
        if getattr(self, "stop_commits", None):
            self.stop_commits.set()
        super().close()
        if getattr(self, "attach", None):
            wait(lambda: self.attach.opens("dev") == (0, 0), 30, "the loop device to let go")
            self.attach.stop()
        if getattr(self, "pool", None):
            self.pool.close()


class FuseFile(System):
    def setup(self):
        binary = build_file_server(self.root)
        backing = os.path.join(self.root, "backing.raw")
        with open(backing, "wb") as f:
            f.truncate(self.size)
        self.fmnt = os.path.join(self.root, "fmnt")
        os.makedirs(self.fmnt, exist_ok=True)
        self.proc = subprocess.Popen([binary, backing, self.fmnt, *self.server_words],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        image = os.path.join(self.fmnt, "file")
        wait(lambda: os.path.exists(image) or self.proc.poll() is not None, 30, "fuse_file_server")
        if self.proc.poll() is not None:
            raise RuntimeError(f"fuse_file_server exited: {self.proc.stderr.read().decode()}")
        self.attach_loop(image, MOUNT_READAHEAD)

    def server_pids(self):
        return [self.proc.pid]

    def close(self):
        super().close()
        if getattr(self, "proc", None):
            subprocess.run(["umount", self.fmnt], capture_output=True)
            self.proc.wait(timeout=30)


class NbdFuse(System):
    def setup(self):
        from cowblock.nbd.server import NBDServer
        self.pool = Pool.create(os.path.join(self.root, "pool"), 2 * self.size, 65536)
        self.pool.create_thin("dev", self.size)
        sock = os.path.join(self.root, "nbd.sock")
        self.server = NBDServer(self.pool, socket_path=sock)
        self.server.start()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        # cowblock.mount.attach_uri's sequence (nbdfuse, losetup with its
        # default buffered I/O), with the same mkfs as the other systems.
        fuse_dir = os.path.join(self.root, "fuse")
        os.makedirs(fuse_dir, exist_ok=True)
        self.nbdfuse = subprocess.Popen(["nbdfuse", os.path.join(fuse_dir, "dev"),
                                         f"nbd+unix:///dev?socket={sock}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait(lambda: os.path.exists(os.path.join(fuse_dir, "dev")), 30, "nbdfuse")
        self.fuse_dir = fuse_dir
        self.loop_dio = False
        self.attach_loop(os.path.join(fuse_dir, "dev"))

    def server_pids(self):
        return [os.getpid(), self.nbdfuse.pid]   # the NBD server runs in this process

    def close(self):
        super().close()
        if getattr(self, "nbdfuse", None):
            subprocess.run(["fusermount3", "-u", self.fuse_dir], capture_output=True)
            self.nbdfuse.wait(timeout=30)
        if getattr(self, "server", None):
            self.server.stop()
            self.thread.join(timeout=30)
            self.pool.close()


class LoopFile(System):
    def setup(self):
        backing = os.path.join(self.root, "backing.raw")
        with open(backing, "wb") as f:
            f.truncate(self.size)
        # losetup's default (the kernel-only path as people use it), unless +loopdirect
        self.loop_dio = "loopdirect" in self.flags
        self.attach_loop(backing)


class Overlay(System):
    def setup(self):
        for d in ("lower", "upper", "work"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)
        r = self.root
        run("mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={r}/lower,upperdir={r}/upper,workdir={r}/work", self.mnt)


SYSTEMS = {"fuse": Fuse, "nbdfuse": NbdFuse, "fuse-file": FuseFile, "loop-file": LoopFile,
           "overlayfs": Overlay}


def build_file_server(root):
    out = os.path.join(root, "fuse_file_server")
    if not os.path.exists(out):
        cflags = run("pkg-config", "--cflags", "--libs", "fuse3").split()
        run("gcc", "-O2", "-Wall", os.path.join(HERE, "fuse_file_server.c"), "-o", out, *cflags)
    return out


def fio(directory, rw, bs, seconds, file_size):
    argv = ["fio", "--name=b", f"--filename={directory}/fio.dat", f"--size={file_size}",
            "--direct=1", "--ioengine=libaio", "--iodepth=16", f"--rw={rw}", f"--bs={bs}",
            "--output-format=json"]
    if seconds:
        argv += [f"--runtime={seconds}", "--time_based"]
    out = run(*argv, timeout=900)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return side["bw_bytes"] / 1e6, side["io_bytes"]


def disk_sectors_written(directory):
    """Sectors written so far to the host disk that holds directory (its
    whole-disk counters: other writers on the machine count too)."""
    dev = os.stat(directory).st_dev
    path = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    if os.path.exists(os.path.join(path, "partition")):
        path = os.path.join(path, "..")
    with open(os.path.join(path, "stat")) as f:
        return int(f.read().split()[6])


def cpu_seconds(pids):
    """User and system CPU seconds used so far by the processes pids."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])   # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cold_read(directory, n):
    """MB/s of reading an 8 MiB file in 1 MiB reads at depth 1 with every
    cache dropped, as `cowblock bench` times it (milliseconds in the report).
    A new file each time: pages a server has mapped (cowblock's data file)
    survive drop_caches, so a file read before is never cold again."""
    path = os.path.join(directory, f"cold{n}.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(8 * MiB))
        os.fsync(f.fileno())
    drop_caches()
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(MiB):
            pass
    return 8 * MiB / (time.perf_counter() - t) / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--size-mib", type=int, default=4096, help="each ext4's size")
    ap.add_argument("--file-mib", type=int, default=1024, help="fio's file in it")
    ap.add_argument("--only", default="fuse,nbdfuse,fuse-file,loop-file,overlayfs")
    ap.add_argument("--workloads", default=",".join(w[0] for w in WORKLOADS))
    ap.add_argument("--dir", default="/var/tmp/cowblock-attach-compare")
    ap.add_argument("--json")
    args = ap.parse_args()
    names = args.only.split(",")
    workloads = [w for w in WORKLOADS if w[0] in args.workloads.split(",")]
    shutil.rmtree(args.dir, ignore_errors=True)
    systems = {}
    results = {n: {w[0]: [] for w in workloads} for n in names}
    disk_per_gib = {n: {w[0]: [] for w in workloads if w[1] in ("write", "randwrite")} for n in names}
    cpu_per_gib = {n: {w[0]: [] for w in workloads if w[1]} for n in names}
    try:
        for n in names:
            base, *flags = n.split("+")
            s = SYSTEMS[base](os.path.join(args.dir, n.replace("+", "_")), args.size_mib * MiB, flags)
            systems[n] = s
            s.setup()
            fio(s.mnt, "write", "1M", 0, f"{args.file_mib}M")  # lay the file out
            os.sync()
        # fio's rounds first: dropping the caches for the cold reads would
        # make later fio reads disk reads on some systems and not others.
        for rnd in range(args.rounds):
            for label, rw, bs in workloads:
                for n, s in systems.items():
                    if rw is None:
                        continue
                    before = disk_sectors_written(args.dir)
                    cpu = cpu_seconds(s.server_pids())
                    mb, nbytes = fio(s.mnt, rw, bs, args.seconds, f"{args.file_mib}M")
                    # what reached the host disk for each GiB fio wrote (a count,
                    # where the MB/s of a loaded machine are noise)
                    written_gib = nbytes / (1 << 30)
                    disk = (disk_sectors_written(args.dir) - before) * 512 / MiB
                    cpu = cpu_seconds(s.server_pids()) - cpu
                    results[n][label].append(mb)
                    if s.server_pids():
                        cpu_per_gib[n][label].append(cpu / (nbytes / (1 << 30)))
                    if rw in ("write", "randwrite"):
                        disk_per_gib[n][label].append(disk / written_gib)
                    print(f"round {rnd + 1} {label:13} {n:28} {mb:9.1f} MB/s, host disk {disk:7.0f} "
                          f"MiB written, server CPU {cpu:6.2f} s", file=sys.stderr)
        for rnd in range(args.rounds if "cold-read-8m" in args.workloads else 0):
            for n, s in systems.items():
                mb = cold_read(s.mnt, rnd)
                results[n]["cold-read-8m"].append(mb)
                print(f"round {rnd + 1} cold-read-8m  {n:28} {mb:9.1f} MB/s", file=sys.stderr)
    finally:
        for s in reversed(list(systems.values())):
            s.close()
        shutil.rmtree(args.dir, ignore_errors=True)   # gigabytes of ext4 images
    med = {n: {w: statistics.median(v) for w, v in r.items()} for n, r in results.items()}
    report(med, names, workloads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "kernel": os.uname().release,
                       "median_mb_s": med, "runs_mb_s": results,
                       "host_disk_mib_per_gib_written": disk_per_gib,
                       "server_cpu_s_per_gib": cpu_per_gib}, f, indent=2)


def report(med, names, workloads):
    def ratio(n, w, ref):
        if ref in med and med[ref][w]:
            return f"{med[n][w] / med[ref][w]:.2f}x"
        return "-"
    print("| system | workload | MB/s | /nbdfuse | /fuse-file | /loop-file |")
    print("|---|---|---|---|---|---|")
    for label, _, _ in workloads:
        for n in names:
            ff = "fuse-file" + n[len(n.split("+")[0]):] if n.startswith("fuse") else "fuse-file"
            ff = ff if ff in med else "fuse-file"
            mb = med[n][label]
            shown = f"{mb:.1f} ({8 * MiB / mb / 1e3:.1f} ms)" if label == "cold-read-8m" else \
                f"{mb:.1f}"
            print(f"| {n} | {label} | {shown} | {ratio(n, label, 'nbdfuse')} | "
                  f"{ratio(n, label, ff)} | {ratio(n, label, 'loop-file')} |")


if __name__ == "__main__":
    main()
