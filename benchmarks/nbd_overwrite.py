"""4 KiB random overwrites over NBD: cowblock against nbdkit's file plugin at
equal durability and in the same page-cache state, fio's nbd engine, QD16,
interleaved rounds, median.

    python benchmarks/nbd_overwrite.py [--runs 3] [--size-mib 1024] [--seconds 10] [--json out.json]

cowblock serves a device filled by `cowblock import` of a raw file; nbdkit's
file plugin serves a copy of the same raw file.  Durability: nbdkit's file
plugin syncs only on NBD FLUSH, while cowblock's daemon also commits (and so
fdatasyncs its data file) once a second by default.  So each variant runs
both with the same FLUSH cadence (none, fio's runs; or a FLUSH after exactly
every N writes, from benchmarks/nbd_flush_client.py through libnbd, since
fio's `--fsync=N` sends more FLUSHes to whichever server answers them
faster) and cowblock's timed commit off (`cowblock daemon
--commit-interval 0`); "default" is cowblock as it ships (a commit a second)
against nbdkit without flushes.  Page cache: "fresh" syncs and drops the
caches before the run; "dirty" first rewrites the whole device through the
server, so both backing files are dirty in the page cache (4 KiB writes into
dirty cached pages are several times slower on this kernel than into
dropped ones: ../shared/anchors/baselines.md).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd_compare import Server, fio  # noqa: E402

MiB = 1 << 20
FLUSH_EVERY = 64   # a FLUSH after every 64 writes (benchmarks/nbd_flush_client.py)
FLUSH_CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbd_flush_client.py")
SYSTEM_PYTHON = "/usr/bin/python3"   # where Debian's python3-libnbd is

VARIANTS = {   # name: (fio flush cadence, page-cache state, cowblock commit interval)
    "no flush, fresh cache": (0, "fresh", 0),
    "no flush, dirty cache": (0, "dirty", 0),
    f"a FLUSH every {FLUSH_EVERY} writes, fresh cache": (FLUSH_EVERY, "fresh", 0),
    f"a FLUSH every {FLUSH_EVERY} writes, dirty cache": (FLUSH_EVERY, "dirty", 0),
    "default (cowblock commits every 1 s), fresh cache": (0, "fresh", 1),
}


def flush_cadence(uri, size, seconds, every):
    out = subprocess.run([SYSTEM_PYTHON, FLUSH_CLIENT, uri, str(size), str(seconds), str(every)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"the flush client failed: {out.stderr.strip()}")
    run = json.loads(out.stdout)
    return {"iops": run["iops"], "flushes_per_1000": 1000 * run["flushes"] / max(run["writes"], 1)}


def drop_caches():
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        sys.exit(f"cannot drop the page cache ({e.strerror}): run as root")


class Cowblock:
    """cowblock's daemon with the commit interval asked for, and a listener."""

    def __init__(self, pool, sock, commit_interval):
        self.pool = pool
        self.daemon = subprocess.Popen(["cowblock", "--pool", pool, "daemon", "--commit-interval",
                                        str(commit_interval)], stderr=subprocess.PIPE)
        for _ in range(400):
            if subprocess.run(["cowblock", "--pool", pool, "daemon", "status"],
                              capture_output=True, text=True).stdout.startswith("daemon"):
                break
            time.sleep(0.05)
        self.serve = Server(["cowblock", "--pool", pool, "serve", "--socket", sock, "base"], sock,
                            "cowblock serve")

    def stop(self):
        self.serve.stop()
        subprocess.run(["cowblock", "--pool", self.pool, "daemon", "stop"], check=True,
                       capture_output=True)
        self.daemon.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--only", nargs="*", help="variants whose name contains one of these")
    ap.add_argument("--json")
    args = ap.parse_args()
    for tool in ("fio", "nbdkit"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install {tool})")
    if subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode:
        sys.exit(f"{SYSTEM_PYTHON} cannot import nbd (apt-get install python3-libnbd)")
    size = args.size_mib * MiB
    root = tempfile.mkdtemp(prefix="cowblock-overwrite-", dir="/var/tmp")
    sock = os.path.join(root, "s.sock")
    raw, peer_raw, pool = (os.path.join(root, n) for n in ("base.raw", "peer.raw", "pool"))
    with open(raw, "wb") as f:
        chunk = os.urandom(MiB)
        for _ in range(args.size_mib):
            f.write(chunk)
    shutil.copyfile(raw, peer_raw)
    subprocess.run(["cowblock", "--pool", pool, "pool", "create", "--size", f"{2 * size}",
                    "--block-size", "64K"], check=True, capture_output=True)
    subprocess.run(["cowblock", "--pool", pool, "import", "base", raw], check=True,
                   capture_output=True)
    os.unlink(raw)

    def start(peer, commit_interval):
        if peer == "cowblock":
            return Cowblock(pool, sock, commit_interval), f"nbd+unix:///base?socket={sock}"
        return (Server(["nbdkit", "-f", "-U", sock, "file", peer_raw], sock, "nbdkit"),
                f"nbd+unix:///?socket={sock}")

    variants = {k: v for k, v in VARIANTS.items()
                if not args.only or any(o in k for o in args.only)}
    results = {v: {"cowblock": [], "nbdkit-file": []} for v in variants}
    flush_rates = {v: {"cowblock": [], "nbdkit-file": []} for v in variants}
    for r in range(args.runs):
        for vname, (every, cache, interval) in variants.items():
            # Who goes first alternates from round to round, so neither side
            # always runs just after the page cache was dropped by the other.
            for peer in ("cowblock", "nbdkit-file")[::1 if r % 2 == 0 else -1]:
                drop_caches()
                server, uri = start(peer, interval)
                try:
                    if cache == "dirty":
                        fio(uri, "write", "1m", 0, size)
                    run = flush_cadence(uri, size, args.seconds, every) if every else \
                        fio(uri, "randwrite", "4k", args.seconds, size)
                    results[vname][peer].append(run["iops"])
                    flush_rates[vname][peer].append(run["flushes_per_1000"])
                finally:
                    server.stop()
        print(f"round {r + 1}/{args.runs} done", file=sys.stderr)
    table = {}
    print(f"\n4 KiB random overwrites at QD16 (fio nbd engine; libnbd with flushes), {args.size_mib} MiB, "
          f"{args.seconds} s runs, median of {args.runs} interleaved rounds (IOPS)")
    for vname, by_peer in results.items():
        c, n = (statistics.median(by_peer[p]) for p in ("cowblock", "nbdkit-file"))
        fc, fn = (statistics.median(flush_rates[vname][p]) for p in ("cowblock", "nbdkit-file"))
        table[vname] = {"cowblock_iops": c, "nbdkit_file_iops": n, "ratio": c / n,
                        "cowblock_runs": by_peer["cowblock"], "nbdkit_runs": by_peer["nbdkit-file"],
                        "flushes_per_1000_writes": {"cowblock": fc, "nbdkit-file": fn}}
        print(f"  {vname:50} cowblock {c:9,.0f}  nbdkit-file {n:9,.0f}  {c / n:5.2f}x"
              + (f"   (FLUSHes per 1000 writes: {fc:.0f} / {fn:.0f})" if fc or fn else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": args.runs, "size_mib": args.size_mib, "seconds": args.seconds,
                       "results": table}, f, indent=2)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
