"""Write the seed corpora of the libFuzzer harnesses: valid inputs that the
fuzzer mutates from (python3 make_corpus.py; the output is committed)."""
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
REQ_MAGIC = 0x25609513
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, BLOCK_STATUS = 0, 1, 2, 3, 4, 5, 6, 7
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def request(kind, offset=0, length=0, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, kind, cookie, offset, length) + payload


def nbd_inputs():
    rng = random.Random(1)
    yield bytes([0]) + request(READ, 0, 4096)
    yield bytes([1]) + request(READ, 4096, 65536, DF)
    yield bytes([0]) + request(WRITE, 512, 1024, FUA, payload=bytes(range(256)) * 4)
    yield bytes([1]) + request(WRITE, 65536, 4096, payload=b"x" * 4096) + request(FLUSH)
    yield bytes([13]) + request(BLOCK_STATUS, 0, 1 << 20, REQ_ONE) + request(BLOCK_STATUS, 4096, 8192)
    yield bytes([0]) + request(TRIM, 0, 65536) + request(ZEROES, 8192, 8192, NO_HOLE)
    yield bytes([1]) + request(ZEROES, 0, 4096, FAST_ZERO) + request(CACHE, 0, 4096)
    yield bytes([2]) + request(WRITE, 0, 16, payload=b"r" * 16)  # read-only: EPERM
    yield bytes([32]) + request(READ, 0, 4096) + request(DISC)
    for _ in range(8):
        opt, stream = rng.randrange(128), b""
        for _ in range(rng.randrange(1, 6)):
            kind = rng.choice([READ, WRITE, FLUSH, TRIM, ZEROES, BLOCK_STATUS, CACHE])
            off, length = rng.randrange(0, 1 << 20, 512), rng.choice([1, 512, 4096, 5000])
            payload = os.urandom(length) if kind == WRITE else b""
            stream += request(kind, off, length, rng.choice([0, FUA, DF]), rng.randrange(99), payload)
        yield bytes([opt]) + stream


def metadata_inputs():
    yield b"\x00"
    yield b"\x02"
    for block in range(64):  # a change at the start of each block that keeps it valid
        # (the first blocks hold the device trees, the later ones the records store)
        yield b"\x02" + struct.pack("<HHB", block, 8, 0)
    yield b"\x00" + struct.pack("<HHB", 0, 64, 8) + struct.pack("<Q", 99)
    yield b"\x01" + struct.pack("<HHB", 3, 100, 4) + b"\xff\xff\xff\xff"


def write(name, inputs):
    out = os.path.join(HERE, "corpus", name)
    os.makedirs(out, exist_ok=True)
    for i, data in enumerate(inputs):
        with open(os.path.join(out, f"seed-{i:03d}"), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    write("nbd_transmit", nbd_inputs())
    write("metadata", metadata_inputs())
