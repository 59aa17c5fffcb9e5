"""`cowblock serve` side by side with nbdkit and qemu-nbd, driven by fio's nbd
engine and nbdcopy, on the same data, interleaved, median of N rounds.

    python benchmarks/nbd_compare.py [--runs 5] [--size-mib 1024] [--seconds 10] [--json out.json]

Servers: cowblock serve (a fully written device, and a fresh snapshot of it
for first writes), nbdkit's file plugin on a raw copy, nbdkit's cow filter
over it, and qemu-nbd -t over a qcow2 overlay of a qcow2 copy.  Each fio run
starts a fresh server (and, for first writes, a fresh snapshot or overlay),
as in ../shared/anchors/baselines.md.  Peers that are not installed are
reported as skipped.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from cowblock import Pool

MiB = 1 << 20


def wait_for(path, proc, what):
    for _ in range(400):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.025)
    raise RuntimeError(f"{what} never created {path}")


class Server:
    def __init__(self, argv, sock, what, env=None):
        self.sock, self.what = sock, what
        if os.path.exists(sock):
            os.unlink(sock)
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
        wait_for(sock, self.proc, what)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fio(uri, rw, bs, seconds, size, extra=()):
    argv = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            "--iodepth=16", f"--size={size}", "--output-format=json", *extra]
    if seconds:
        argv += [f"--runtime={seconds}", "--time_based"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"fio failed: {out.stderr.strip()}")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    flushes = job.get("sync", {}).get("total_ios", 0)
    return {"iops": side["iops"], "mb_s": side["bw_bytes"] / 1e6,
            "p99_us": pct.get("99.000000", 0) / 1000,
            "flushes_per_1000": 1000 * flushes / max(side["total_ios"], 1)}


def nbdcopy_out(uri):
    t = time.perf_counter()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not shutil.which("fio"):
        sys.exit("fio is not installed (apt-get install fio)")
    size = args.size_mib * MiB
    root = tempfile.mkdtemp(prefix="cowblock-nbd-", dir="/var/tmp")
    sock = os.path.join(root, "s.sock")
    raw = os.path.join(root, "base.raw")
    with open(raw, "wb") as f:
        chunk = os.urandom(MiB)
        for _ in range(args.size_mib):
            f.write(chunk)
    pool_dir = os.path.join(root, "pool")
    with Pool.create(pool_dir, 4 * size, 65536) as pool:
        from cowblock.transfer import import_file
        import_file(pool, "base", raw)
    have = {t: bool(shutil.which(t)) for t in ("nbdkit", "qemu-nbd", "qemu-img", "nbdcopy")}
    if have["qemu-img"]:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw,
                        os.path.join(root, "base.qcow2")], check=True)

    def cowblock(name="base", fresh_snapshot=False):
        if fresh_snapshot:
            with Pool.open(pool_dir) as pool:
                for d in pool.list():
                    if d.name.startswith("snap"):
                        pool.delete(d.name)
                pool.snapshot("base", "snap")
            name = "snap"
        s = Server(["cowblock", "--pool", pool_dir, "serve", "--socket", sock, name], sock, "cowblock")
        return s, f"nbd+unix:///{name}?socket={sock}"

    def nbdkit(cow=False):
        tmp = os.path.join(root, "cowtmp")
        os.makedirs(tmp, exist_ok=True)
        argv = ["nbdkit", "-f", "-U", sock] + (["--filter=cow"] if cow else []) + ["file", raw]
        env = dict(os.environ, TMPDIR=tmp)
        return Server(argv, sock, "nbdkit", env), f"nbd+unix:///?socket={sock}"

    def qemu_nbd(fresh=True):
        ovl = os.path.join(root, "ovl.qcow2")
        if os.path.exists(ovl):
            os.unlink(ovl)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                        os.path.join(root, "base.qcow2"), "-F", "qcow2", ovl], check=True)
        argv = ["qemu-nbd", "-t", "-k", sock, "-f", "qcow2", "--cache=writeback",
                "--aio=threads", "-e", "4", ovl]
        return Server(argv, sock, "qemu-nbd"), f"nbd+unix:///?socket={sock}"

    peers = {"cowblock": lambda fresh=False: cowblock(fresh_snapshot=fresh)}
    if have["nbdkit"]:
        peers["nbdkit-file"] = lambda fresh=False: nbdkit(False)
        peers["nbdkit-cow"] = lambda fresh=False: nbdkit(True)
    if have["qemu-nbd"] and have["qemu-img"]:
        peers["qemu-nbd-qcow2"] = lambda fresh=False: qemu_nbd()
    workloads = {
        "4k randread": lambda u: fio(u, "randread", "4k", args.seconds, size),
        "4k randwrite": lambda u: fio(u, "randwrite", "4k", args.seconds, size),
        "1m seqread": lambda u: fio(u, "read", "1m", args.seconds, size),
        "4k first writes (CoW)": lambda u: fio(u, "write:60k", "4k", 0, size),
    }
    results = {w: {p: [] for p in peers} for w in workloads}
    copies = {p: [] for p in peers}
    for r in range(args.runs):
        for wname, work in workloads.items():
            for pname, start in peers.items():
                if wname.startswith("4k first") and pname == "nbdkit-file":
                    continue  # no CoW there
                fresh = wname.startswith("4k first")
                subprocess.run(["sync"])
                time.sleep(0.5 if fresh else 0)
                server, u = start(fresh)
                try:
                    results[wname][pname].append(work(u))
                finally:
                    server.stop()
        if have["nbdcopy"]:
            for pname, start in peers.items():
                server, u = start(False)
                try:
                    copies[pname].append(size / nbdcopy_out(u) / 1e6)
                finally:
                    server.stop()
        print(f"round {r + 1}/{args.runs} done", file=sys.stderr)
    table = {}
    print(f"\nNBD servers, fio nbd engine iodepth 16, {args.size_mib} MiB, median of {args.runs} "
          "interleaved rounds (IOPS or MB/s, p99 latency)")
    for wname in workloads:
        print(f"\n{wname}:")
        for pname in peers:
            runs = results[wname][pname]
            if not runs:
                continue
            iops = statistics.median(x["iops"] for x in runs)
            mb = statistics.median(x["mb_s"] for x in runs)
            p99 = statistics.median(x["p99_us"] for x in runs)
            lo, hi = min(x["iops"] for x in runs), max(x["iops"] for x in runs)
            table.setdefault(wname, {})[pname] = {"iops": iops, "mb_s": mb, "p99_us": p99,
                                                  "iops_min": lo, "iops_max": hi}
            print(f"  {pname:15} {iops:10,.0f} IOPS ({lo:,.0f}-{hi:,.0f})  {mb:8,.0f} MB/s  "
                  f"p99 {p99:8,.0f} us")
    if have["nbdcopy"]:
        print("\nnbdcopy to null: (MB/s):")
        for pname, runs in copies.items():
            table.setdefault("nbdcopy", {})[pname] = statistics.median(runs)
            print(f"  {pname:15} {statistics.median(runs):10,.0f}")
    missing = [t for t, ok in have.items() if not ok]
    if missing:
        print(f"\nskipped peers: {', '.join(missing)} not installed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": args.runs, "size_mib": args.size_mib, "results": table,
                       "skipped": missing}, f, indent=2)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
