#!/usr/bin/env python3
"""Control calls per CLI command, and the latency of `cowblock snapshot`,
through a running pool daemon (a `cowblock serve` holds the pool).

Calls are counted as the requests the CLI process sends on its control
socket (strace of sendto), which works for any cowblock version; latency is
the wall time of whole `cowblock snapshot` processes, median of --runs.

    python benchmarks/daemon_calls.py --runs 50 [--cowblock PATH] [--json OUT]
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

COMMANDS = [["create", "c1", "--size", "8M"], ["snapshot", "c1", "c1-s", "--read-only"],
            ["ls"], ["ls", "--usage"], ["info", "c1"], ["rename", "c1-s", "c1-t"],
            ["set", "c1", "--label", "k=v"], ["resize", "c1", "16M"], ["rm", "c1", "c1-t"],
            ["pool", "info"], ["image", "ls"], ["container", "ls"]]


def control_sends(cowblock, pool, args, sock_hint):
    """Requests the command sent to a control socket (connect(...sock_hint...) fds)."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as trace:
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect,sendto,write", "-o", trace.name,
                        cowblock, "--pool", pool, *args], check=True, capture_output=True)
        fds, count = set(), 0
        for line in trace.read().splitlines():
            m = re.search(r"connect\((\d+), \{sa_family=AF_UNIX, sun_path=\"([^\"]+)\"", line)
            if m and sock_hint in m.group(2):
                fds.add(m.group(1))
            m = re.search(r"(?:sendto|write)\((\d+),", line)
            if m and m.group(1) in fds:
                count += 1
        return count


class Setup:
    """A pool served by one cowblock version's `cowblock serve`."""

    def __init__(self, cowblock):
        self.cowblock = cowblock
        self.root = tempfile.mkdtemp(prefix="cowblock-daemon-calls-")
        self.pool, sock = os.path.join(self.root, "pool"), os.path.join(self.root, "nbd.sock")
        for args in (["pool", "create", "--size", "1G"], ["create", "base", "--size", "64M"]):
            subprocess.run([cowblock, "--pool", self.pool, *args], check=True, capture_output=True)
        self.serve = subprocess.Popen([cowblock, "--pool", self.pool, "serve", "--socket", sock],
                                      stderr=subprocess.DEVNULL)
        while not os.path.exists(sock):
            time.sleep(0.05)
        time.sleep(0.5)
        self.times = []

    def snapshot(self, i):
        t = time.perf_counter()
        subprocess.run([self.cowblock, "--pool", self.pool, "snapshot", "base", f"s{i}"],
                       check=True, capture_output=True)
        self.times.append(time.perf_counter() - t)

    def close(self):
        self.serve.send_signal(signal.SIGTERM)
        self.serve.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--cowblock", action="append",
                    help="a cowblock command to measure (repeat to compare versions, "
                         "interleaved); default: the one on PATH")
    ap.add_argument("--json")
    a = ap.parse_args()
    setups = [Setup(c) for c in (a.cowblock or [shutil.which("cowblock")])]
    out = {}
    try:
        for s in setups:
            out[s.cowblock] = {"calls": {" ".join(c): control_sends(s.cowblock, s.pool, c,
                                                                    "control.sock")
                                         for c in COMMANDS}}
        for i in range(a.runs):      # interleaved: both see the same machine
            for s in setups:
                s.snapshot(i)
    finally:
        for s in setups:
            s.close()
    for s in setups:
        r = out[s.cowblock]
        r["snapshot_ms"] = {"median": statistics.median(s.times) * 1000,
                            "min": min(s.times) * 1000, "max": max(s.times) * 1000,
                            "runs": a.runs}
        print(s.cowblock)
        for cmd, n in r["calls"].items():
            print(f"  {n:3d}  cowblock {cmd}")
        t = r["snapshot_ms"]
        print(f"  cowblock snapshot through the daemon: median {t['median']:.1f} ms "
              f"({t['min']:.1f}-{t['max']:.1f}, {a.runs} runs)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
