"""containerd's Snapshots service (`cowblock snapshotter`) at the gRPC level:
a real pool daemon started by the CLI, driven by a gRPC client as
containerd's proxy plugin drives it.  Semantics and error codes as
containerd's own snapshotters have them; device files written and read
through the returned mounts; a SIGKILL of the daemon in the middle of
Prepares leaves keys and devices agreeing.  (containerd itself:
test_containerd_e2e.py.)"""
import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from cowblock import Pool
from cowblock.attach import blockdev
from cowblock.runtime import RuntimeDir, process_alive

grpc = pytest.importorskip("grpc", reason="the containerd extra (grpcio) is not installed")
pytest.importorskip("grpc_tools", reason="the containerd extra (grpcio-tools) is not installed")
from cowblock.attach import fuse  # noqa: E402
from cowblock.containerd import api, filters, store  # noqa: E402
from test_daemon import wait_for  # noqa: E402

COWBLOCK = shutil.which("cowblock")
FUSE_OK, FUSE_WHY = fuse.available()
MISSING = blockdev.missing_capabilities() + ([] if FUSE_OK else [FUSE_WHY]) + \
    ([] if COWBLOCK else ["the cowblock command is not installed"]) + \
    [f"{t} is not installed (e2fsprogs)" for t in ("mkfs.ext4", "debugfs") if not shutil.which(t)]
needs_daemon = pytest.mark.skipif(bool(MISSING), reason="; ".join(MISSING))
MiB = 1 << 20
SIZE = 128 * MiB
KILLS = int(os.environ.get("COWBLOCK_CTRD_KILLS", "3"))   # SIGKILL rounds (a long run: 1000)
pb = api.pb
Code = grpc.StatusCode


def run(pool, *args, check=True, env=None):
    r = subprocess.run([COWBLOCK, "--pool", str(pool), *args], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, **(env or {})))
    if check and r.returncode:
        raise AssertionError(f"{args}: {r.returncode} {r.stderr}")
    return r


def start(pool, sock):
    return json.loads(run(pool, "--json", "snapshotter", "--socket", str(sock),
                          "--default-size", str(SIZE)).stdout)


class Client:
    def __init__(self, sock):
        self.channel = grpc.insecure_channel(f"unix:{sock}")
        self.stub = api.grpc.SnapshotsStub(self.channel)

    def prepare(self, key, parent="", labels=None):
        return list(self.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent,
                                                                labels=labels or {})).mounts)

    def view(self, key, parent):
        return list(self.stub.View(pb.ViewSnapshotRequest(key=key, parent=parent)).mounts)

    def mounts(self, key):
        return list(self.stub.Mounts(pb.MountsRequest(key=key)).mounts)

    def commit(self, name, key, labels=None):
        self.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {}))

    def remove(self, key):
        self.stub.Remove(pb.RemoveSnapshotRequest(key=key))

    def stat(self, key):
        return self.stub.Stat(pb.StatSnapshotRequest(key=key)).info

    def update(self, key, labels, paths=()):
        info = pb.Info(name=key, labels=labels)
        req = pb.UpdateSnapshotRequest(info=info)
        req.update_mask.paths.extend(paths)
        return self.stub.Update(req).info

    def list(self, *filters_):
        return [i for r in self.stub.List(pb.ListSnapshotsRequest(filters=list(filters_)))
                for i in r.info]

    def usage(self, key):
        return self.stub.Usage(pb.UsageRequest(key=key)).size

    def cleanup(self):
        self.stub.Cleanup(pb.CleanupRequest())


def code_of(call, *args):
    with pytest.raises(grpc.RpcError) as e:
        call(*args)
    return e.value.code(), e.value.details()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One pool daemon with the snapshotter for the module's tests (each
    uses keys of its own)."""
    if MISSING:
        pytest.skip("; ".join(MISSING))
    d = tmp_path_factory.mktemp("ctrd")
    pool, sock = d / "pool", d / "snap.sock"
    run(pool, "pool", "create", "--size", "2G")
    start(pool, sock)
    client = Client(sock)
    yield pool, sock, client
    client.channel.close()
    run(pool, "daemon", "stop", "--force", check=False)


# ---- the filter syntax (no daemon) ----

def test_filters_select_as_containerd_does():
    infos = [{"name": "a", "parent": "", "kind": "committed",
              "labels": {"containerd.io/snapshot.ref": "sha256:1", "x": "1"}},
             {"name": "b", "parent": "a", "kind": "active", "labels": {}},
             {"name": "c d", "parent": "a", "kind": "view", "labels": {"x": ""}}]

    def names(*fs):
        m = filters.matcher(fs)
        return [i["name"] for i in infos if m(i)]
    assert names() == ["a", "b", "c d"]
    assert names('parent=="a"') == ["b", "c d"]
    assert names("parent==a,kind==view") == ["c d"]
    assert names('labels."containerd.io/snapshot.ref"==sha256:1,parent==""') == ["a"]
    assert names("labels.x") == ["a"]          # present and not empty
    assert names("kind~=^(active|view)$") == ["b", "c d"]
    assert names("name!=a") == ["b", "c d"]
    assert names('name=="c d"', "name==a") == ["a", "c d"]    # any of the filters
    for bad in ("==a", "name==a,", 'labels."x==1', "name~=(", "name a"):
        with pytest.raises(Exception) as e:
            filters.parse(bad)
        assert "filter" in str(e.value)


# ---- the service ----

@needs_daemon
def test_prepare_commit_view_and_the_data_between(served):
    _, _, c = served
    m = c.prepare("default/1/extract 1 sha256:aa", labels={"containerd.io/snapshot/x": "1"})
    assert [(x.type, x.options) for x in m] == [("ext4", ["loop"])]
    path = m[0].source
    assert os.path.getsize(path) == SIZE
    assert c.mounts("default/1/extract 1 sha256:aa")[0].source == path
    # a parentless snapshot is an empty ext4 filesystem, without lost+found
    r = subprocess.run(["debugfs", "-R", "ls -l /", path], capture_output=True, text=True)
    assert r.returncode == 0 and "lost+found" not in r.stdout, r.stdout + r.stderr
    with open(path, "r+b") as f:
        f.seek(100 * MiB)
        f.write(b"layer-one" * 1000)
    own = c.usage("default/1/extract 1 sha256:aa")
    assert 9000 <= own <= 2 * MiB, own
    c.commit("default/2/sha256:aa", "default/1/extract 1 sha256:aa", {"l": "v"})
    assert code_of(c.stat, "default/1/extract 1 sha256:aa")[0] == Code.NOT_FOUND
    info = c.stat("default/2/sha256:aa")
    assert (info.kind, info.parent, dict(info.labels)) == (pb.COMMITTED, "", {"l": "v"})
    assert c.usage("default/2/sha256:aa") == own      # fixed at commit
    assert not os.path.exists(path)                    # a committed snapshot has no file
    child = c.prepare("default/3/c1", "default/2/sha256:aa")[0].source
    assert c.usage("default/3/c1") == 0                # nothing of its own yet
    view = c.view("default/4/v1", "default/2/sha256:aa")[0]
    assert view.options == ["loop", "ro"]
    for p in (child, view.source):
        with open(p, "rb") as f:
            f.seek(100 * MiB)
            assert f.read(9) == b"layer-one"
    with pytest.raises(OSError):
        open(view.source, "r+b")
    with open(child, "r+b") as f:
        f.seek(100 * MiB)
        f.write(b"container")
    with open(view.source, "rb") as f:
        f.seek(100 * MiB)
        assert f.read(9) == b"layer-one"               # the parent is unchanged
    assert {i.name: i.kind for i in c.list('parent=="default/2/sha256:aa"')} == \
        {"default/3/c1": pb.ACTIVE, "default/4/v1": pb.VIEW}
    for key in ("default/4/v1", "default/3/c1", "default/2/sha256:aa"):
        c.remove(key)
    assert not [i for i in c.list() if i.name.startswith("default/")]


@needs_daemon
def test_error_codes_containerd_relies_on(served):
    _, _, c = served
    c.prepare("e/1/a")
    assert code_of(c.prepare, "e/1/a")[0] == Code.ALREADY_EXISTS
    assert code_of(c.prepare, "e/2/b", "e/404")[0] == Code.NOT_FOUND
    code, why = code_of(c.prepare, "e/2/b", "e/1/a")
    assert code == Code.FAILED_PRECONDITION and "not a committed" in why
    assert code_of(c.commit, "e/3/a", "e/404")[0] == Code.NOT_FOUND
    c.commit("e/3/a", "e/1/a")
    c.prepare("e/4/b")
    assert code_of(c.commit, "e/3/a", "e/4/b")[0] == Code.ALREADY_EXISTS   # name taken
    assert code_of(c.commit, "e/5/x", "e/3/a")[0] == Code.FAILED_PRECONDITION  # not active
    assert code_of(c.mounts, "e/3/a")[0] == Code.FAILED_PRECONDITION
    c.view("e/6/v", "e/3/a")
    assert code_of(c.commit, "e/7/v", "e/6/v")[0] == Code.FAILED_PRECONDITION
    code, why = code_of(c.remove, "e/3/a")
    assert code == Code.FAILED_PRECONDITION and "e/6/v" in why
    for key in ("e/6/v", "e/3/a", "e/4/b"):
        c.remove(key)
        assert code_of(c.remove, key)[0] == Code.NOT_FOUND      # repeated: no harm
    for call, args in [(c.prepare, ("",)), (c.stat, ("",)), (c.list, ("name==a,",)),
                       (c.prepare, ("e/8/x", "", {store.SIZE_LABEL: "12 apples"})),
                       (c.prepare, ("e/8/x", "", {store.SIZE_LABEL: "1M"}))]:
        code, why = code_of(call, *args)
        assert code == Code.INVALID_ARGUMENT, (args, code, why)
    assert code_of(c.stat, "e/8/x")[0] == Code.NOT_FOUND         # nothing was made


@needs_daemon
def test_stat_update_and_list_by_labels(served):
    _, _, c = served
    c.prepare("u/1/a", labels={"containerd.io/snapshot/k": "1", "other": "2"})
    before = c.stat("u/1/a")
    assert dict(before.labels) == {"containerd.io/snapshot/k": "1", "other": "2"}
    time.sleep(0.01)
    info = c.update("u/1/a", {"other": "", "new": "3"}, ["labels.other", "labels.new"])
    assert dict(info.labels) == {"containerd.io/snapshot/k": "1", "new": "3"}
    assert info.updated_at.ToNanoseconds() > before.updated_at.ToNanoseconds()
    assert info.created_at == before.created_at
    assert dict(c.update("u/1/a", {"only": "this"}).labels) == {"only": "this"}
    assert code_of(c.update, "u/1/a", {}, ["parent"])[0] == Code.INVALID_ARGUMENT
    assert code_of(c.update, "u/404", {})[0] == Code.NOT_FOUND
    assert [i.name for i in c.list("labels.only==this")] == ["u/1/a"]
    assert dict(c.stat("u/1/a").labels) == {"only": "this"}
    c.remove("u/1/a")


@needs_daemon
def test_size_label_and_children_inherit_it(served):
    _, _, c = served
    p = c.prepare("s/1/a", labels={store.SIZE_LABEL: "80M"})[0].source
    assert os.path.getsize(p) == 80 * MiB
    c.commit("s/2/a", "s/1/a")
    assert os.path.getsize(c.prepare("s/3/b", "s/2/a")[0].source) == 80 * MiB
    for key in ("s/3/b", "s/2/a"):
        c.remove(key)


@needs_daemon
def test_commit_waits_for_the_device_file_to_close(served):
    _, _, c = served
    path = c.prepare("w/1/a")[0].source
    f = open(path, "r+b")
    threading.Timer(0.5, f.close).start()
    t = time.monotonic()
    c.commit("w/2/a", "w/1/a")
    assert time.monotonic() - t >= 0.4
    c.remove("w/2/a")


@needs_daemon
def test_owned_devices_status_and_stop(tmp_path):
    pool, sock = tmp_path / "pool", tmp_path / "snap.sock"
    run(pool, "pool", "create", "--size", "1G")
    rec = start(pool, sock)
    assert rec["address"] == str(sock) and oct(os.stat(sock).st_mode & 0o777) == "0o600"
    r = run(pool, "snapshotter", "--socket", str(tmp_path / "two.sock"), check=False)
    assert r.returncode and "already" in r.stderr
    c = Client(sock)
    c.prepare("o/0/base")
    c.commit("o/0/done", "o/0/base")
    c.prepare("o/1/a", "o/0/done")
    status = json.loads(run(pool, "--json", "daemon", "status").stdout)
    assert [(a["kind"], a["snapshots"]) for a in status["attachments"]] == [("snapshotter", 2)]
    dev = next(d["name"] for d in json.loads(run(pool, "--json", "ls").stdout)
               if d["name"].startswith("ctrd-") and not d["read_only"])
    r = run(pool, "rm", dev, check=False)
    assert r.returncode and "containerd" in r.stderr
    out = run(pool, "daemon", "stop").stdout
    assert "snapshotter" in out and not os.path.exists(sock)
    c.channel.close()
    with Pool.open(pool) as p:        # the snapshot outlives the daemon, with its key
        assert dev in p
        assert json.loads(p.get_record(store.PREFIX + b"o/1/a"))["device"] == dev
        assert p.check().ok
    start(pool, sock)                 # a new daemon knows the parent has a child
    c = Client(sock)
    assert code_of(c.remove, "o/0/done")[0] == Code.FAILED_PRECONDITION
    c.remove("o/1/a")
    c.remove("o/0/done")
    assert c.list() == []
    c.channel.close()
    run(pool, "daemon", "stop")


@needs_daemon
def test_sigkill_during_prepares_leaves_keys_and_devices_agreeing(tmp_path):
    """Prepares and Commits run until the daemon is SIGKILLed at a random
    instant (COWBLOCK_CTRD_KILLS rounds, 3 by default); after a restart every key names its device and every device of
    containerd has its key, and each Prepare the client was told had
    succeeded is there."""
    import random
    pool, sock = tmp_path / "pool", tmp_path / "snap.sock"
    run(pool, "pool", "create", "--size", "1G")
    for round_ in range(KILLS):
        start(pool, sock)
        c = Client(sock)
        done, stop = [], threading.Event()
        committing = []        # a Commit cut off by the kill: either side may be there

        def work():
            n = 0
            while not stop.is_set():
                key = f"k/{round_}/{n} x"
                try:
                    c.prepare(key)
                    done.append(key)
                    if n % 2:
                        committing.append(done.pop())
                        c.commit(key + " done", key)
                        done.append(committing.pop() + " done")
                except grpc.RpcError:
                    return
                n += 1
        t = threading.Thread(target=work)
        t.start()
        # the kill lands at a random instant once Prepares are flowing (a
        # loaded machine may take a while to answer the first)
        wait_for(lambda: done or committing or not t.is_alive(), 60, "the first Prepare")
        time.sleep(random.random() * 0.5)
        pid = RuntimeDir(pool).pid()
        os.kill(pid, signal.SIGKILL)
        while process_alive(pid):
            time.sleep(0.02)
        stop.set()
        t.join(30)
        c.channel.close()
        run(pool, "ls")                # cleans what the daemon left
        with Pool.open(pool, timeout=30) as p:
            recs = {r.key[len(store.PREFIX):].decode(): json.loads(r.value)
                    for r in p.records(store.PREFIX)}
            owned = {i.name for i in p.list() if i.labels.get("cowblock.owner") == "containerd"}
            assert {r["device"] for r in recs.values()} == owned
            assert set(done) <= set(recs), set(done) - set(recs)
            for key in committing:
                assert (key in recs) != (key + " done" in recs), key
            for key, r in recs.items():
                assert p.info(r["device"]).read_only == (r["kind"] != "active"), key
            assert p.check().ok
        assert done or committing, "no Prepare finished before the kill"
    start(pool, sock)                  # the restarted daemon serves again
    c = Client(sock)
    assert {i.name for i in c.list()} == set(recs)
    c.channel.close()
    run(pool, "daemon", "stop")


@needs_daemon
def test_without_the_fuse_attach_it_says_why(tmp_path):
    pool = tmp_path / "pool"
    run(pool, "pool", "create", "--size", "1G")
    r = run(pool, "snapshotter", "--socket", str(tmp_path / "s.sock"), check=False,
            env={"COWBLOCK_ATTACH": "nbdfuse"})
    assert r.returncode and "FUSE attach" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "s.sock").exists()
    run(pool, "daemon", "stop", check=False)


@needs_daemon
def test_foreground_stops_on_sigterm_and_exits_14_when_the_daemon_dies(tmp_path):
    pool, sock = tmp_path / "pool", tmp_path / "snap.sock"
    run(pool, "pool", "create", "--size", "1G")
    cmd = [COWBLOCK, "--pool", str(pool), "snapshotter", "--socket", str(sock),
           "--default-size", str(SIZE), "--foreground"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.05)
    Client(sock).prepare("f/1/a")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert not sock.exists()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not sock.exists() and time.monotonic() < end + 30 and proc.poll() is None:
        time.sleep(0.05)
    assert [i.name for i in Client(sock).list()] == ["f/1/a"]
    os.kill(RuntimeDir(pool).pid(), signal.SIGKILL)
    assert proc.wait(timeout=30) == 14
    assert "stopped or removed" in proc.stderr.read()
    run(pool, "daemon", "stop", "--force", check=False)
