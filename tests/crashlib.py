"""A deterministic random workload, and the check of a pool after a crash.

The workload is a pure function of its seed, so the process that runs it and
the one that checks the wreck agree on every operation.  The runner logs
"S i" before operation i and "C i txn" after each operation that returned a
commit; the checker reopens the pool, reads the transaction id T it reports,
and rebuilds the model at T:

- T below the last logged commit: a commit that returned was lost (failure);
- T equal to a logged one: the state after the first operation that logged it;
- T one above the last logged one: the commit of the operation in flight.

Writes after that point that found their block mapped and unshared may have
reached the disk in place ("blocks it owned alone may hold old or newer
data, as on any disk"), so each block may also hold any state those later
writes gave it, or, since a disk may reorder and tear unsynced writes, any
mix of those states by 512-byte sector; every other byte must equal the
model exactly.
"""
import random

from helpers import Model, pattern

BS = 4096
DEV_BLOCKS = 48


def generate(seed, n_ops):
    rng = random.Random(seed)
    names, ops, counter = [], [], 0
    for _ in range(n_ops):
        r = rng.random()
        if not names or (r < 0.08 and len(names) < 6):
            counter += 1
            name = f"d{counter}"
            ops.append(("create", name, DEV_BLOCKS * BS))
            names.append(name)
        elif r < 0.16 and len(names) < 8:
            counter += 1
            name = f"s{counter}"
            ops.append(("snapshot", rng.choice(names), name))
            names.append(name)
        elif r < 0.20 and len(names) > 1:
            name = rng.choice(names)
            names.remove(name)
            ops.append(("delete", name))
        elif r < 0.28:
            name = rng.choice(names)
            off = rng.randrange(DEV_BLOCKS * BS)
            ops.append(("discard", name, off, rng.randrange(1, 6 * BS)))
        elif r < 0.36:
            ops.append(("commit",))
        else:
            name = rng.choice(names)
            length = rng.choice([512, BS, 3 * BS, 5000, 2 * BS + 100])
            off = rng.randrange(DEV_BLOCKS * BS - length)
            ops.append(("write", name, off, len(ops), length))
    return ops


def clamp(model, name, off, length):
    return min(length, len(model.devs[name]) - off)


def apply(model, op):
    kind = op[0]
    if kind == "create":
        model.create(op[1], op[2])
    elif kind == "snapshot":
        model.snapshot(op[1], op[2])
    elif kind == "delete":
        model.delete(op[1])
    elif kind == "discard":
        _, name, off, length = op
        model.discard(name, off, clamp(model, name, off, length))
    elif kind == "write":
        _, name, off, seed, length = op
        model.write(name, off, pattern(seed, length))


def run_op(pool, op):
    """Run one operation; returns True when it committed."""
    kind = op[0]
    if kind == "create":
        pool.create_thin(op[1], op[2])
        return True
    if kind == "snapshot":
        pool.snapshot(op[1], op[2])
        return True
    if kind == "delete":
        pool.delete(op[1])
        return True
    if kind == "commit":
        pool.commit()
        return True
    dev = pool.device(op[1])
    if kind == "discard":
        _, name, off, length = op
        dev.discard(off, min(length, dev.size - off))
    else:
        _, name, off, seed, length = op
        dev.pwrite(pattern(seed, length), off)
    return False


def sectors_each_from(got, states, sector=512):
    """Whether every 512-byte sector of got equals that sector in one of the
    states: a disk that reordered or tore unsynced in-place writes can keep
    any subset of their sectors."""
    return all(any(got[i:i + sector] == st[i:i + sector] for st in states)
               for i in range(0, len(got), sector))


def parse_log(text):
    started, commits = -1, []
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "S":
            started = int(parts[1])
        elif len(parts) == 3 and parts[0] == "C":
            commits.append((int(parts[1]), int(parts[2])))
    return started, commits


def verify(pool, ops, started, commits, initial_txn):
    """Check a reopened pool against the workload; returns a description of
    the state it matched, raises AssertionError otherwise."""
    txn = pool.stats().transaction_id
    last = max([initial_txn] + [t for _, t in commits])
    assert txn >= last, f"transaction {txn} after the crash, but commit {last} had returned"
    if txn == initial_txn:
        k = -1
    else:
        matches = [i for i, t in commits if t == txn]
        if matches:
            k = matches[0]
        else:
            assert txn == last + 1, f"transaction {txn}: more than one past the last logged {last}"
            assert started >= 0 and ops[started][0] in ("create", "snapshot", "delete", "commit"), \
                f"transaction {txn} is new, but operation {started} ({ops[started]}) does not commit"
            k = started
    model = Model(BS)
    for op in ops[:k + 1]:
        apply(model, op)
    # States each block may also hold: writes after k that may have landed in place.
    later = model.copy()
    extra = {}
    for op in ops[k + 1:started + 1]:
        if op[0] == "write" and op[1] in later.devs:
            _, name, off, seed, length = op
            later.write(name, off, pattern(seed, length))
            if name in model.devs:
                for b in range(off // BS, (off + length - 1) // BS + 1):
                    extra.setdefault((name, b), []).append(bytes(later.devs[name][b * BS:(b + 1) * BS]))
        elif op[0] in ("create", "snapshot", "delete", "discard"):
            apply(later, op)
    names = sorted(d.name for d in pool.list())
    assert names == sorted(model.devs), f"devices {names}, expected {sorted(model.devs)} at txn {txn}"
    for name, expect in model.devs.items():
        got = pool.device(name).pread(len(expect), 0)
        for b in range(len(expect) // BS):
            g, e = got[b * BS:(b + 1) * BS], bytes(expect[b * BS:(b + 1) * BS])
            if g != e and g not in extra.get((name, b), ()) and \
                    not sectors_each_from(g, [e] + extra.get((name, b), [])):
                raise AssertionError(f"txn {txn}: device {name} block {b} holds neither its "
                                     f"committed data nor a later write")
    report = pool.check()
    assert report.ok, str(report)
    return f"txn {txn} (operation {k})"
