"""Random sequences of record and device operations, atomic sections that
succeed or fail, commits and reopens, against a plain in-memory model.

The pool is made with a node capacity of 3 (and 5), so that records nodes
split, grow levels and empty out all the time.  After every step the store
lists exactly the model, in order, every get agrees, devices and their
records agree, and check() is clean.
"""
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cowblock import Pool
from helpers import pattern

DEVICE_KEY = b"dev/"    # the records that name devices; the other rules leave them alone
KEYS = st.one_of(
    st.binary(min_size=1, max_size=6),
    st.text("ab /:.", min_size=1, max_size=12).map(str.encode),
    st.builds(lambda c, n: bytes([c]) * n, st.integers(0, 255), st.integers(900, 1024)),
).filter(lambda k: not k.startswith(DEVICE_KEY))
VALUES = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda s, n: pattern(s, n), st.integers(0, 99), st.sampled_from([300, 1300, 1400])),
    st.builds(lambda s, n: pattern(s, n), st.integers(0, 99), st.integers(4000, 13000)),
)
DEV_SIZE = 8 * 4096


class RecordsMachine(RuleBasedStateMachine):
    node_capacity = 3

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="cowblock-records-")
        self.path = os.path.join(self.dir, "pool")
        self.pool = Pool.create(self.path, 512 * 4096, 4096, commit_interval=0,
                                _node_capacity=self.node_capacity)
        self.records = {}
        self.devices = set()
        self.counter = 0

    def teardown(self):
        if self.pool._h is not None:
            self.pool.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _known(self, data):
        """A key of the model (not a device's), or any other."""
        plain = sorted(k for k in self.records if not k.startswith(DEVICE_KEY))
        return data.draw(st.sampled_from(plain)) if plain and data.draw(st.booleans()) \
            else data.draw(KEYS)

    @rule(key=KEYS, value=VALUES)
    def put(self, key, value):
        self.pool.put_record(key, value)
        self.records[key] = value

    @rule(data=st.data())
    def replace(self, data):
        key, value = self._known(data), data.draw(VALUES)
        self.pool.put_record(key, value)
        self.records[key] = value

    @rule(data=st.data())
    def delete(self, data):
        key = self._known(data)
        assert self.pool.delete_record(key) == (key in self.records)
        self.records.pop(key, None)

    @rule(data=st.data())
    def get(self, data):
        key = data.draw(st.sampled_from(sorted(self.records))) if self.records else b"x"
        assert self.pool.get_record(key) == self.records.get(key)

    @rule(prefix=st.one_of(st.just(b""), st.binary(max_size=2), st.sampled_from([b"a", b"/"])),
          data=st.data(), limit=st.one_of(st.none(), st.integers(0, 5)))
    def list_page(self, prefix, data, limit):
        after = data.draw(st.one_of(st.none(), st.binary(max_size=3)))
        want = sorted((k, v) for k, v in self.records.items()
                      if k.startswith(prefix) and (after is None or k > after))
        want = want if limit is None else want[:limit]
        assert [tuple(r) for r in self.pool.records(prefix, after, limit)] == want
        assert self.pool.record_count(prefix) == sum(1 for k in self.records
                                                     if k.startswith(prefix))

    @rule(value=VALUES)
    def make_device_and_record(self, value):
        self.counter += 1
        name = f"d{self.counter}"
        with self.pool.atomic():
            self.pool.create_thin(name, DEV_SIZE)
            self.pool.put_record(b"dev/" + name.encode(), name.encode() + b" " + value)
        self.devices.add(name)
        self.records[b"dev/" + name.encode()] = name.encode() + b" " + value

    @precondition(lambda self: self.devices)
    @rule(data=st.data())
    def remove_device_and_record(self, data):
        name = data.draw(st.sampled_from(sorted(self.devices)))
        with self.pool.atomic():
            self.pool.delete(name)
            assert self.pool.delete_record(b"dev/" + name.encode())
        self.devices.remove(name)
        del self.records[b"dev/" + name.encode()]

    @rule(data=st.data(), n=st.integers(1, 4))
    def failed_section(self, data, n):
        """Changes of every kind, then the body raises: all undone."""
        with pytest.raises(ZeroDivisionError):
            with self.pool.atomic():
                for _ in range(n):
                    what = data.draw(st.sampled_from(["put", "delete", "device", "remove"]))
                    if what == "put":
                        self.pool.put_record(self._known(data), data.draw(VALUES))
                    elif what == "delete":
                        self.pool.delete_record(self._known(data))
                    elif what == "device":
                        self.counter += 1
                        self.pool.create_thin(f"tmp{self.counter}", DEV_SIZE)
                    elif self.devices:
                        name = data.draw(st.sampled_from(sorted(self.devices)))
                        if name in self.pool:
                            self.pool.delete(name)
                1 / 0

    @precondition(lambda self: self.devices)
    @rule(data=st.data())
    def write(self, data):
        name = data.draw(st.sampled_from(sorted(self.devices)))
        self.pool.device(name).pwrite(b"w" * 100, data.draw(st.integers(0, DEV_SIZE - 100)))

    @rule()
    def commit(self):
        self.pool.commit()

    @rule()
    def reopen(self):
        self.pool.close()
        self.pool = Pool.open(self.path, commit_interval=0)

    @invariant()
    def matches_model(self):
        assert [tuple(r) for r in self.pool.records()] == sorted(self.records.items())
        assert self.pool.record_count() == len(self.records)
        assert {d.name for d in self.pool.list()} == self.devices
        for name in self.devices:
            assert self.pool.get_record(b"dev/" + name.encode()).split(b" ")[0] == name.encode()
        report = self.pool.check()
        assert report.ok, str(report)


class RecordsMachine5(RecordsMachine):
    node_capacity = 5


EXAMPLES = int(os.environ.get("COWBLOCK_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
                    suppress_health_check=list(HealthCheck))

TestRecords3 = RecordsMachine.TestCase
TestRecords3.settings = SETTINGS
TestRecords5 = RecordsMachine5.TestCase
TestRecords5.settings = settings(SETTINGS, max_examples=max(EXAMPLES // 2, 1))


def test_many_records_in_a_small_node_tree(tmp_path):
    """Thousands of records in a capacity-3 tree (deep), deleted in another
    order, against the model; reopened and checked."""
    import random
    rng = random.Random(9)
    model = {}
    with Pool.create(tmp_path / "p", 64 * 4096, 4096, commit_interval=0,
                     _node_capacity=3) as pool:
        with pool.atomic():
            for i in range(4000):
                key = rng.randbytes(rng.choice([1, 2, 8, 30]))
                model[key] = rng.randbytes(rng.choice([0, 20, 2000]))
                pool.put_record(key, model[key])
        keys = list(model)
        rng.shuffle(keys)
        with pool.atomic():
            for key in keys[:2500]:
                assert pool.delete_record(key)
                del model[key]
        assert [tuple(r) for r in pool.records()] == sorted(model.items())
        assert pool.check().ok
    with Pool.open(tmp_path / "p") as pool:
        assert [tuple(r) for r in pool.records()] == sorted(model.items())
        assert pool.check().ok
