"""cowblock as a real containerd's snapshotter: a private containerd 1.6
with cowblock as a proxy plugin, an image made here offline (busybox-static,
a whiteout, a hard link, an opaque directory), `ctr image import`, `ctr
run` with runc reading the layers and writing its own files, the rootfs
compared with umoci's unpack of the same image, the `ctr snapshots` verbs,
containerd's garbage collector leaving no device, SIGKILLs of the
snapshotter's daemon and of containerd in the middle of an import or a
run, after which the retried import and run succeed and nothing is left over, and a
running container getting EIO when the daemon dies."""
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from cowblock.attach import blockdev
from cowblock.runtime import RuntimeDir, process_alive

pytest.importorskip("grpc", reason="the containerd extra (grpcio) is not installed")
pytest.importorskip("grpc_tools", reason="the containerd extra (grpcio-tools) is not installed")
from cowblock.attach import fuse  # noqa: E402
from containerd_lib import IMAGE, Containerd, digests, make_image, sh, wait_for  # noqa: E402

TOOLS = {"containerd": "containerd", "ctr": "containerd", "runc": "runc", "umoci": "umoci",
         "skopeo": "skopeo", "busybox": "busybox-static", "cowblock": "cowblock itself"}
FUSE_OK, FUSE_WHY = fuse.available()
MISSING = [f"{t} is not installed ({p})" for t, p in TOOLS.items() if not shutil.which(t)] + \
    blockdev.missing_capabilities() + ([] if FUSE_OK else [FUSE_WHY])
pytestmark = pytest.mark.skipif(bool(MISSING), reason="; ".join(MISSING))
SIZE = "128M"
KILLS = int(os.environ.get("COWBLOCK_CTRD_E2E_KILLS", "1"))   # kills of each victim (long: 100)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ctrd-e2e"))
    archive, ref = make_image(d)
    pool, snap_sock = f"{d}/pool", f"{d}/snap.sock"
    sh("cowblock", "--pool", pool, "pool", "create", "--size", "2G")

    def snapshotter():
        sh("cowblock", "--pool", pool, "snapshotter", "--socket", snap_sock,
           "--default-size", SIZE)
    snapshotter()
    c = Containerd(d, snap_sock)
    try:
        c.start()
        plugins = c.ctr("plugins", "ls").stdout
        if not any("cowblock" in line and " ok" in line for line in plugins.splitlines()):
            pytest.skip(f"containerd did not load the proxy plugin:\n{plugins}")
        yield {"c": c, "pool": pool, "archive": archive, "ref": ref,
               "snapshotter": snapshotter}
    finally:
        c.stop()
        c.reap_shims()
        sh("cowblock", "--pool", pool, "daemon", "stop", "--force", check=False)


def devices(pool):
    ls = json.loads(sh("cowblock", "--pool", pool, "--json", "ls").stdout)
    return [x["name"] for x in ls if x["labels"].get("cowblock.owner") == "containerd"]


def left_over(w):
    snaps = w["c"].ctr("snapshots", "--snapshotter", "cowblock", "ls", check=False)
    infos = [w["c"].ctr("snapshots", "--snapshotter", "cowblock", "info", line.split()[0],
                        check=False).stdout for line in snaps.stdout.splitlines()[1:]]
    leases = w["c"].ctr("leases", "ls", check=False).stdout
    try:
        with open(RuntimeDir(w["pool"]).log) as f:
            log = f.read()[-3000:]
    except OSError as e:
        log = str(e)
    with open(w["c"].log.name, errors="replace") as f:
        complaints = [line for line in f if "level=error" in line or "level=warn" in line]
    return (f"containerd's GC to remove {devices(w['pool'])}; containerd has\n{snaps.stdout}"
            f"{snaps.stderr}{''.join(infos)}\nleases: {leases}\nthe daemon's log: {log}\n"
            f"containerd's errors and warnings: {''.join(complaints[-15:])}")


def containerd_temp_mounts():
    prefix = os.path.join(tempfile.gettempdir(), "containerd-mount")
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


def import_run_remove(w, name):
    c, pool = w["c"], w["pool"]
    c.retry("image", "import", "--snapshotter", "cowblock", w["archive"])
    script = ("echo hi; cat /greeting; echo mine > /written; cat /written; "
              "cd / && find data greeting -type f | sort | while read f; do md5sum /$f; done")
    r = c.retry("run", "--rm", "--snapshotter", "cowblock", IMAGE, name, "/bin/sh", "-c",
                script)
    lines = r.stdout.splitlines()
    assert lines[:3] == ["hi", "hello from a layer", "mine"], r.stdout
    seen = {path: md5 for md5, path in (line.split() for line in lines[3:])}
    assert seen == digests(w["ref"], "data", "greeting")   # as umoci unpacks the image
    assert "/data/gone/x" not in seen and "/data/keep/old" not in seen
    assert "/data/keep/new" in seen and seen["/data/hardlink"] == seen["/data/file"]
    c.ctr("image", "rm", "--sync", IMAGE)   # and wait for the GC
    wait_for(lambda: not devices(pool), what=lambda: left_over(w))


def test_import_run_and_garbage_collection(world):
    import_run_remove(world, "t-plain")
    r = sh("cowblock", "--pool", world["pool"], "pool", "check")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ctr_snapshots_verbs(world):
    c = world["c"]
    snap = ["snapshots", "--snapshotter", "cowblock"]
    c.retry("image", "import", "--snapshotter", "cowblock", world["archive"])
    top = c.ctr(*snap, "ls").stdout.splitlines()[1:]
    assert len(top) == 3 and all("Committed" in line for line in top)
    rows = [line.split() for line in top]
    parent, = {r[0] for r in rows} - {r[1] for r in rows if len(r) == 3}   # the top layer
    c.ctr(*snap, "prepare", "p1", parent)
    mounts = c.ctr(*snap, "mounts", "/mnt", "p1").stdout
    assert "-t ext4" in mounts and "-o loop" in mounts
    info = json.loads(c.ctr(*snap, "info", "p1").stdout)
    assert (info["Kind"], info["Parent"]) == ("Active", parent)
    c.ctr(*snap, "label", "p1", "containerd.io/snapshot/x=y")
    assert json.loads(c.ctr(*snap, "info", "p1").stdout)["Labels"][
        "containerd.io/snapshot/x"] == "y"
    usage = c.ctr(*snap, "usage").stdout
    assert "p1" in usage
    c.ctr(*snap, "commit", "c1", "p1")
    # a view has no gc.root label: containerd's GC may take it any time
    view = json.loads(c.ctr(*snap, "view", "--mounts", "v1", "c1").stdout)
    assert [(m["Type"], m["Options"]) for m in view] == [("ext4", ["loop", "ro"])]
    assert "c1" in c.ctr(*snap, "tree").stdout
    r = c.ctr(*snap, "rm", "v1", check=False)
    assert r.returncode == 0 or "not found" in r.stderr, r.stderr
    c.ctr(*snap, "rm", "c1")
    c.ctr("image", "rm", "--sync", IMAGE)   # and wait for the GC
    wait_for(lambda: not devices(world["pool"]), what=lambda: left_over(world))


@pytest.mark.parametrize("victim", ["snapshotter", "containerd"])
@pytest.mark.parametrize("round_", range(KILLS))
def test_sigkill_mid_import_or_run_then_retry(world, victim, round_):
    """SIGKILL the snapshotter's daemon (or containerd) at a random instant
    of an import followed by a `ctr run --rm`; restart it; the retried import
    and run succeed, and after GC no device is left and the pool checks
    clean."""
    c, pool = world["c"], world["pool"]
    name = f"k-{victim}-{round_}"
    ctr = f"ctr --address {c.sock}"
    work = subprocess.Popen(
        ["sh", "-c", f"{ctr} image import --snapshotter cowblock {world['archive']} && "
                     f"{ctr} run --rm --snapshotter cowblock {IMAGE} {name} /bin/sh -c "
                     "'echo x > /f; sync'"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(random.uniform(0.05, 2.0))     # an import here takes ~1 s, the run ~0.5 s
    if victim == "snapshotter":
        pid = RuntimeDir(pool).pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(pid), what="the daemon to die")
    else:
        c.stop(signal.SIGKILL)
        os.killpg(work.pid, signal.SIGKILL)   # ctr waits for its containerd to come back
    work.wait(timeout=60)
    if victim == "snapshotter":
        world["snapshotter"]()          # the next command cleans up, the daemon serves again
    else:
        c.start()
        # containerd applies a layer in a temporary mount of its own, which a
        # SIGKILL leaves behind (and which keeps the device file open, so the
        # GC's Remove is refused): an operator unmounts it
        for mnt in containerd_temp_mounts():
            sh("umount", mnt)
    # what the killed commands left is given up as its owner would: the
    # container of an interrupted `run --rm`, and the killed ctr's lease
    # (24 h by default), which keeps what it made
    c.ctr("task", "rm", "--force", name, check=False)
    if name in c.ctr("container", "ls", "-q").stdout.split():
        c.retry("container", "rm", name)
    for line in c.ctr("leases", "ls").stdout.splitlines()[1:]:
        c.ctr("leases", "rm", "--sync", line.split()[0])
    import_run_remove(world, f"t-{victim}-{round_}")
    r = sh("cowblock", "--pool", pool, "pool", "check")
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_running_container_gets_eio_when_the_daemon_dies(world):
    """The container's writes fail (EIO, not a hang) once the daemon is
    SIGKILLed; after a restart containerd runs containers again and the GC
    removes what is left."""
    c, pool = world["c"], world["pool"]
    c.retry("image", "import", "--snapshotter", "cowblock", world["archive"])
    c.ctr("run", "-d", "--snapshotter", "cowblock", IMAGE, "t-eio", "/bin/sleep", "600")
    try:
        write = ["task", "exec", "--exec-id", "w", "t-eio", "/bin/sh", "-c",
                 "echo data > /f && sync /f && cat /f"]
        assert c.ctr(*write).stdout == "data\n"
        pid = RuntimeDir(pool).pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(pid), what="the daemon to die")
        r = c.ctr(*write[:3], "w2", *write[4:], check=False, timeout=60)
        assert r.returncode != 0 and "Input/output error" in r.stdout + r.stderr, \
            r.stdout + r.stderr
    finally:
        c.ctr("task", "kill", "-s", "SIGKILL", "t-eio", check=False)
        wait_for(lambda: c.ctr("task", "rm", "t-eio", check=False).returncode == 0 or
                 "not found" in c.ctr("task", "ls").stdout, what="the task to go")
        c.ctr("container", "rm", "t-eio", check=False)
    world["snapshotter"]()
    import_run_remove(world, "t-after-eio")
    r = sh("cowblock", "--pool", pool, "pool", "check")
    assert r.returncode == 0, r.stdout + r.stderr
