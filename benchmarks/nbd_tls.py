"""What TLS costs on NBD: nbdcopy of one device to null:, plain and over TLS
(PSK), from `cowblock serve` and from nbdkit's file plugin on a raw copy of
the same data, interleaved, median of N rounds.

    python benchmarks/nbd_tls.py [--runs 5] [--size-mib 512] [--json out.json]

Both servers listen on a Unix socket with --tls=on and the same psktool key,
so each round reads the same bytes four ways.  Needs nbdcopy, psktool
(gnutls-bin) and, for the peer, nbdkit.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile

from cowblock import Pool
from nbd_compare import Server, nbdcopy_out

MiB = 1 << 20


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args()
    for tool in ("nbdcopy", "psktool"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    size = args.size_mib * MiB
    work = tempfile.mkdtemp(prefix="cowblock-tls-bench-")
    raw, psk = os.path.join(work, "data.raw"), os.path.join(work, "keys.psk")
    with open(raw, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(MiB))
    subprocess.run(["psktool", "-u", "bench", "-p", psk], check=True, capture_output=True)
    pool_dir = os.path.join(work, "pool")
    with Pool.create(pool_dir, 2 * size, 65536) as pool:
        dev = pool.create_thin("disk", size)
        with open(raw, "rb") as f:
            for off in range(0, size, 8 * MiB):
                dev.pwrite(f.read(8 * MiB), off)
    sock = os.path.join(work, "s.sock")
    servers = {"cowblock serve": ["cowblock", "--pool", pool_dir, "serve", "--tls=on",
                                  "--tls-psk", psk, "--socket", sock]}
    if shutil.which("nbdkit"):
        servers["nbdkit file"] = ["nbdkit", "-f", "--tls=on", f"--tls-psk={psk}", "-U", sock,
                                  "file", raw]
    results = {name: {"plain": [], "tls": []} for name in servers}
    for _ in range(args.runs):
        for name, argv in servers.items():
            s = Server(argv, sock, name)
            try:
                export = "disk" if name == "cowblock serve" else ""
                plain = f"nbd+unix:///{export}?socket={sock}"
                tls = f"nbds+unix://bench@/{export}?socket={sock}&tls-psk-file={psk}"
                results[name]["plain"].append(size / nbdcopy_out(plain) / 1e6)
                results[name]["tls"].append(size / nbdcopy_out(tls) / 1e6)
            finally:
                s.stop()
    table = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    print(f"nbdcopy of {args.size_mib} MiB to null:, MB/s, median of {args.runs}:")
    for name, r in table.items():
        print(f"  {name:15} plain {r['plain']:8.0f}   TLS {r['tls']:8.0f}   "
              f"TLS/plain {r['tls'] / r['plain']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size_mib": args.size_mib, "runs": args.runs, "median_mb_s": table,
                       "all_mb_s": results}, f, indent=2)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
