"""4 KiB random writes at QD16 with a FLUSH after exactly every N writes, through
libnbd: the flush cadence of benchmarks/nbd_overwrite.py.

fio's `--fsync=N` cannot hold a cadence at QD16: how many FLUSHes it sends
depends on how fast the server answers (47 against 177 per 1000 writes to
cowblock and nbdkit in one run), so the two sides did not do the same
durable work.  This client sends them by count.  Debian's python3-libnbd is
for the system interpreter:

    /usr/bin/python3 benchmarks/nbd_flush_client.py URI SIZE SECONDS EVERY

prints {"iops": writes a second, "writes": n, "flushes": n} as JSON.
"""
import json
import os
import random
import sys
import time

import nbd

DEPTH = 16


def run(uri, size, seconds, every):
    h = nbd.NBD()
    h.connect_uri(uri)
    buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(4096)))
    blocks = size // 4096
    state = {"in_flight": 0, "errors": 0}

    def done(err):
        state["in_flight"] -= 1
        if err.value:
            state["errors"] += 1
        return 1   # retire the command

    writes = flushes = since_flush = 0
    start = time.monotonic()
    while time.monotonic() < start + seconds:
        while state["in_flight"] < DEPTH:
            if since_flush == every:
                h.aio_flush(completion=done)
                flushes, since_flush = flushes + 1, 0
            else:
                h.aio_pwrite(buf, random.randrange(blocks) * 4096, completion=done)
                writes, since_flush = writes + 1, since_flush + 1
            state["in_flight"] += 1
        h.poll(-1)
    while state["in_flight"]:
        h.poll(-1)
    elapsed = time.monotonic() - start
    h.shutdown()
    if state["errors"]:
        sys.exit(f"{state['errors']} requests failed")
    return {"iops": writes / elapsed, "writes": writes, "flushes": flushes}


if __name__ == "__main__":
    uri, size, seconds, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(run(uri, size, seconds, every)))
