"""Shared test helpers: deterministic data and a plain in-memory model."""


def write_file(path, content, holes=()):
    """Write content to path, leaving the (offset, length) ranges (all zero) as holes."""
    with open(path, "wb") as f:
        pos = 0
        for off, n in sorted(holes):
            assert not any(content[off:off + n])
            f.write(content[pos:off])
            f.seek(off + n)
            pos = off + n
        f.write(content[pos:])
        f.truncate(len(content))
    return path


def pattern(seed, length):
    """Deterministic non-zero bytes, different for each seed."""
    unit = bytes(((seed + i) * 31 + 17) % 251 + 1 for i in range(251))
    return (unit * (length // 251 + 1))[:length]


class Model:
    """What the pool should hold: device name -> bytearray, plus flags."""

    def __init__(self, block_size):
        self.block_size = block_size
        self.devs = {}
        self.read_only = {}

    def create(self, name, size):
        self.devs[name] = bytearray(size)
        self.read_only[name] = False

    def snapshot(self, origin, name, read_only=False):
        self.devs[name] = bytearray(self.devs[origin])
        self.read_only[name] = read_only

    def write(self, name, offset, data):
        self.devs[name][offset:offset + len(data)] = data

    def whole_blocks(self, name, offset, length):
        bs, size = self.block_size, len(self.devs[name])
        first = -(-offset // bs)
        end = offset + length
        last = (end + bs - 1) // bs if end == size else end // bs
        return first, max(first, last)

    def discard(self, name, offset, length):
        first, last = self.whole_blocks(name, offset, length)
        bs, dev = self.block_size, self.devs[name]
        lo, hi = first * bs, min(last * bs, len(dev))
        if lo < hi:
            dev[lo:hi] = bytes(hi - lo)

    def write_zeroes(self, name, offset, length):
        self.devs[name][offset:offset + length] = bytes(length)

    def delete(self, name):
        del self.devs[name]
        del self.read_only[name]

    def resize(self, name, size):
        dev = self.devs[name]
        if size < len(dev):
            del dev[size:]
        else:
            dev.extend(bytes(size - len(dev)))

    def copy(self):
        m = Model(self.block_size)
        m.devs = {k: bytearray(v) for k, v in self.devs.items()}
        m.read_only = dict(self.read_only)
        return m


def assert_matches(pool, model):
    names = sorted(d.name for d in pool.list())
    assert names == sorted(model.devs)
    for name, expect in model.devs.items():
        dev = pool.device(name)
        assert dev.size == len(expect), name
        got = dev.pread(len(expect), 0)
        if got != bytes(expect):
            first = next(i for i in range(len(expect)) if got[i] != expect[i])
            raise AssertionError(f"device {name}: first difference at byte {first} "
                                 f"(block {first // model.block_size}): got {got[first]}, "
                                 f"expected {expect[first]}")
