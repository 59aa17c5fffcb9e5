"""A workload of atomic sections that keep records and devices in step, as
containerd's snapshotter and an OCI image load will, and the check of a pool
after a crash.

Each section makes a device (created, or snapshotted from another) and puts
the record that names it (a containerd-style key, with spaces), or deletes
both, or relabels a device and rewrites its record to match; plain data
writes, explicit commits and reclaims of deferred removals come between.
The runner logs "S i" before operation i and "C i" after each one that
returned with a commit.  Every operation that changes devices or records
commits as it returns, so after a crash the pool must hold exactly the state
after the last logged operation, or after the one in flight: never a record
without its device, a device without its record, or a record that disagrees
with its device's labels.
"""
import random

BS = 4096
DEV_SIZE = 16 * BS
PADDING = [0, 100, 2000, 9000]    # record sizes: inline, and in value blocks


def generate(seed, n_ops):
    rng = random.Random(seed)
    live, ops, counter = [], [], 0
    for _ in range(n_ops):
        r = rng.random()
        if not live or (r < 0.3 and len(live) < 8):
            counter += 1
            name, key = f"c{counter}", f"default/{counter}/snapshot {counter}"
            pad = rng.choice(PADDING)
            if live and rng.random() < 0.5:
                ops.append(("snapshot", rng.choice(live)[0], name, key, pad))
            else:
                ops.append(("make", name, key, pad))
            live.append((name, key))
        elif r < 0.45:
            name, key = live.pop(rng.randrange(len(live)))
            ops.append(("remove", name, key))
        elif r < 0.55:
            name, key = rng.choice(live)
            ops.append(("label", name, key, len(ops), rng.choice(PADDING)))
        elif r < 0.8:
            name, _ = rng.choice(live)
            ops.append(("write", name, rng.randrange(DEV_SIZE - 600), len(ops)))
        elif r < 0.88:
            ops.append(("reclaim",))
        else:
            ops.append(("commit",))
    return ops


def record_value(name, gen, pad):
    """What a record holds: the device it names, its generation, padding."""
    return f"{name} {gen} ".encode() + bytes([gen % 251 + 1]) * pad


def run_op(pool, op):
    """Run one operation; returns True when it committed as it returned."""
    kind = op[0]
    if kind == "make":
        _, name, key, pad = op
        with pool.atomic():
            pool.create_thin(name, DEV_SIZE, labels={"gen": "0"})
            pool.put_record(key, record_value(name, 0, pad))
    elif kind == "snapshot":
        _, origin, name, key, pad = op
        with pool.atomic():
            pool.snapshot(origin, name, labels={"gen": "0"})
            pool.put_record(key, record_value(name, 0, pad))
    elif kind == "remove":
        _, name, key = op
        with pool.atomic():
            pool.delete(name)
            pool.delete_record(key)
    elif kind == "label":
        _, name, key, gen, pad = op
        with pool.atomic():
            pool.set_labels(name, {"gen": str(gen)})
            pool.put_record(key, record_value(name, gen, pad))
    elif kind == "write":
        _, name, off, seed = op
        pool.device(name).pwrite(bytes([seed % 251 + 1]) * 600, off)
        return False
    elif kind == "reclaim":
        pool.reclaim()
    else:
        pool.commit()
    return True


def model_after(ops, k):
    """(devices: name -> labels, records: key -> value) after ops[0..k]."""
    devices, records = {}, {}
    for op in ops[:k + 1]:
        kind = op[0]
        if kind in ("make", "snapshot"):
            name, key, pad = op[-3:]
            devices[name] = {"gen": "0"}
            records[key.encode()] = record_value(name, 0, pad)
        elif kind == "remove":
            del devices[op[1]]
            del records[op[2].encode()]
        elif kind == "label":
            _, name, key, gen, pad = op
            devices[name] = {"gen": str(gen)}
            records[key.encode()] = record_value(name, gen, pad)
    return devices, records


def parse_log(text):
    started = committed = -1
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "S":
            started = int(parts[1])
        elif len(parts) == 2 and parts[0] == "C":
            committed = int(parts[1])
    return started, committed


def verify(pool, ops, started, committed):
    """The reopened pool against the workload; returns which state it holds."""
    devices = {d.name: d.labels for d in pool.list()}
    records = {r.key: r.value for r in pool.records()}
    # The invariant, as the snapshotter relies on it: records and devices agree.
    for key, value in records.items():
        name, gen = value.split(b" ")[:2]
        assert name.decode() in devices, f"record {key!r} names device {name!r}, which is gone"
        assert devices[name.decode()] == {"gen": gen.decode()}, \
            f"record {key!r} and device {name!r} disagree about its generation"
    named = {v.split(b" ")[0].decode() for v in records.values()}
    assert set(devices) == named, f"devices without their record: {set(devices) - named}"
    # And exactly the state after the last operation that returned, or the one in flight.
    candidates = {committed: model_after(ops, committed)}
    if started > committed:
        candidates[started] = model_after(ops, started)
    matched = [k for k, state in candidates.items() if state == (devices, records)]
    assert matched, (f"the pool holds neither the state after operation {committed} (the last "
                     f"that returned) nor after {started} (in flight): devices {sorted(devices)}")
    report = pool.check()
    assert report.ok, str(report)
    return f"after operation {matched[0]}"
