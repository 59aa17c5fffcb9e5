"""cowblock image load|ls|inspect|rm|prune and containers of OCI images,
end to end through the CLI and the pool daemon: real images (a static
busybox, so the container runs /bin/sh), built here by hand as `docker
save` tars and OCI layouts, unpacked by umoci to compare with.

Layers are small filesystems (--size 128M) so that the tests stay quick;
the rules do not depend on the size."""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from cowblock import Pool, errors
from cowblock.attach import blockdev, nbdfuse
from cowblock.control import client
from cowblock.runtime import RuntimeDir
from test_oci import (UMOCI_MTIME, Layout, _docker_legacy, _multi, assert_same_tree, entry,
                      make_tar, features)  # noqa: F401 (features: test_oci's fixture, used by name)

COWBLOCK = shutil.which("cowblock")
BUSYBOX = shutil.which("busybox")
MISSING = blockdev.missing_capabilities() + nbdfuse.missing() + \
    [f"{t} is not installed (e2fsprogs)" for t in ("mkfs.ext4", "debugfs") if not shutil.which(t)]
if not COWBLOCK:
    MISSING.append("the cowblock command is not installed")


def _static(program):
    """Whether PROGRAM runs alone in an empty root (what the image needs)."""
    if not program or os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as root:
        shutil.copy(program, os.path.join(root, "busybox"))
        return subprocess.run(["chroot", root, "/busybox", "true"],
                              capture_output=True).returncode == 0


if not _static(BUSYBOX):
    MISSING.append("no static busybox runs in a chroot here (Debian package busybox-static)")
pytestmark = pytest.mark.skipif(bool(MISSING), reason="; ".join(MISSING))
SIZE = "128M"
MiB = 1 << 20


def cb(pool, *args, rc=0):
    r = subprocess.run([COWBLOCK, "--pool", str(pool), *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == rc, f"{args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def cbj(pool, *args):
    return json.loads(cb(pool, "--json", *args).stdout)


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool"
    with Pool.create(path, 2 << 30, 65536):
        pass
    yield path
    for line in open("/proc/mounts"):
        mnt = line.split()[1]
        if mnt.startswith(str(tmp_path)):
            subprocess.run([COWBLOCK, "--pool", str(path), "umount", "--force", mnt],
                           capture_output=True)
    if RuntimeDir(path).pid():
        subprocess.run([COWBLOCK, "--pool", str(path), "daemon", "stop", "--force"],
                       capture_output=True)


# ---- images made here ----
def _busybox_layer():
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    return make_tar(entry("bin", "dir"), entry("bin/busybox", data=busybox, mode=0o755),
                    entry("bin/sh", "sym", target="busybox"),
                    entry("bin/cat", "sym", target="/bin/busybox"),
                    entry("etc", "dir"),
                    entry("etc/os-release", data=b'NAME="cowblock test"\nID=cowblock\n'),
                    entry("etc/old", data=b"from layer 1\n"),
                    entry("big", data=os.urandom(3 * MiB)))


def _second_layer():
    return make_tar(entry("etc/.wh.old"), entry("etc/motd", data=b"layer two\n"),
                    entry("hard", "link", target="etc/os-release"),
                    entry("dev", "dir"), entry("dev/null", "chr", mode=0o666, dev=(1, 3)))


def _third_layer():
    return make_tar(entry("app", "dir"), entry("app/run.sh", data=b"echo app\n", mode=0o755))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Image A (busybox, 2 layers) as a docker-save tar and an OCI layout;
    image B (A's layers and one more) as an OCI layout tag."""
    work = tmp_path_factory.mktemp("images")
    layout = Layout(work / "layout")
    tars = [_busybox_layer(), _second_layer(), _third_layer()]
    layout.add(layout.image(tars[:2]), "a")
    layout.add(layout.image(tars), "b")
    docker = _docker_legacy(layout.path, "a", work / "a.tar", "example.com/test/a:1")
    return work, layout, docker


def _damaged_copy(layout, tmp_path, layer):
    """A copy of LAYOUT whose image "b" has its layer LAYER's blob changed."""
    copy = tmp_path / "damaged"
    shutil.copytree(layout.path, copy)
    index = json.loads((copy / "index.json").read_text())
    desc = next(d for d in index["manifests"]
                if d["annotations"]["org.opencontainers.image.ref.name"] == "b")
    manifest = json.loads((copy / "blobs/sha256" / desc["digest"][7:]).read_bytes())
    blob = copy / "blobs/sha256" / manifest["layers"][layer]["digest"][7:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    return copy


def _devices(pool):
    with client.connect(pool) as p:
        return sorted(d.name for d in p.list())


def _check(pool):
    with client.connect(pool) as p:
        return p.check().ok


# ---- the tests ----
@pytest.fixture
def daemon(pool):
    """A proxy to the pool's daemon, held for the test: the commands of the
    test go through this one daemon (and the test's own steps through the
    proxy: the API, without a command's start-up)."""
    proxy, _ = client.daemon(pool)
    yield proxy
    proxy.close()


def _load(proxy, location, ref=None):
    return proxy.image_load(str(location), ref=ref, size=128 * MiB, timeout=300)


@pytest.mark.skipif(not shutil.which("umoci"), reason="umoci is not installed (make deps)")
def test_docker_save_tar_loads_a_container_mounts_and_runs_sh(pool, daemon, made, tmp_path):
    work, layout, docker = made
    out = cbj(pool, "image", "load", docker, "--size", SIZE)
    assert out["loaded"] == ["example.com/test/a:1"]
    assert [la["reused"] for la in out["layers"]] == [False, False]
    assert out["form"] == "docker-save"

    assert "example.com/test/a:1" in cb(pool, "image", "ls").stdout
    assert [(i["ref"], len(i["layers"])) for i in daemon.oci_images()] == [
        ("example.com/test/a:1", 2)]
    inspected = cbj(pool, "image", "inspect", "example.com/test/a:1")
    assert inspected["config"]["rootfs"]["diff_ids"] == [la["diff_id"]
                                                        for la in inspected["layers"]]
    assert daemon.oci_image_info(inspected["id"][7:19])["ref"] == inspected["ref"]

    cb(pool, "container", "create", "example.com/test/a:1", "box")
    assert {c.name: c.image for c in daemon.list_containers()} == {"box": "example.com/test/a:1"}
    mnt = tmp_path / "mnt"
    cb(pool, "mount", "box", mnt)
    try:
        assert (mnt / "etc/os-release").read_text().startswith('NAME="cowblock test"')
        reference = tmp_path / "umoci"
        subprocess.run(["umoci", "unpack", "--image", f"{layout.path}:a", reference],
                       check=True, capture_output=True)
        assert_same_tree(mnt, reference / "rootfs")
        r = subprocess.run(["chroot", mnt, "/bin/sh", "-c",
                            "cat /etc/motd; echo written > /etc/new; ls /etc"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["layer", "two", "motd", "new", "os-release"]
    finally:
        daemon.umount(str(mnt))
    # the container wrote; its image's layers did not change
    assert daemon.oci_image_info("example.com/test/a:1")["layers"] == inspected["layers"]


def _data_used(pool):
    with client.connect(pool) as p:
        return p.stats().data_used * p.block_size


def _records(pool, prefix=b""):
    with client.connect(pool) as p:
        return {bytes(k): v for k, v in p.records(prefix)}


def test_a_second_image_reuses_the_shared_layers(pool, daemon, made):
    work, layout, _ = made
    first = _load(daemon, f"{layout.path}:a", "a")
    used = _data_used(pool)
    second = cbj(pool, "image", "load", f"{layout.path}:b", "--name", "b", "--size", SIZE)
    # the two lower layers are the first image's devices, found, not unpacked
    assert [la["reused"] for la in second["layers"]] == [True, True, False]
    assert [la["device"] for la in second["layers"][:2]] == \
        [la["device"] for la in first["layers"]]
    # ... so the second image took only its own small layer's blocks: far
    # less than the busybox and random data of the first layer
    grown = _data_used(pool) - used
    assert grown < 1 * MiB < 3 * MiB < first["layers"][0]["bytes"]
    listed = {i["ref"]: i for i in cbj(pool, "image", "ls") if i.get("kind") == "oci"}
    a, b = listed["docker.io/library/a:latest"], listed["docker.io/library/b:latest"]
    assert a["shared_bytes"] == a["bytes"] > 3 * MiB
    assert b["shared_bytes"] == a["bytes"] < b["bytes"]
    assert second["layers"][0]["shared_with"] == ["docker.io/library/a:latest"]
    # the same image under a second ref is one more record, no layer
    third = _load(daemon, f"{layout.path}:b", "b:2")
    assert all(la["reused"] for la in third["layers"]) and _data_used(pool) - used == grown

    # rm: the layers only b had go; a keeps its own
    daemon.image_rm(["b:2"])
    out = cbj(pool, "image", "rm", "b")
    assert out == {"untagged": ["docker.io/library/b:latest"],
                   "removed": [second["layers"][2]["device"]]}
    assert _devices(pool) == sorted([la["device"] for la in first["layers"]]
                                    + [_template(pool)])
    out = daemon.image_rm(["a"])
    assert sorted(out["removed"]) == sorted(la["device"] for la in first["layers"])
    assert _devices(pool) == [_template(pool)]
    assert _records(pool, b"images/") == {}


def _template(pool):
    (value,) = _records(pool, b"layers/template/").values()
    return json.loads(value)["device"]


def test_rm_is_refused_while_a_container_uses_the_image(pool, daemon, made):
    _, layout, docker = made
    _load(daemon, docker)
    daemon.create_container("example.com/test/a:1", "c1")
    r = cb(pool, "image", "rm", "example.com/test/a:1", rc=15)
    assert "container c1" in r.stderr and "--force" in r.stderr
    devices = _devices(pool)
    out = cbj(pool, "image", "rm", "--force", "example.com/test/a:1")
    # the container keeps the layer it is a snapshot of; the one under it goes
    assert len(out["removed"]) == 1 and set(_devices(pool)) == set(devices) - set(out["removed"])
    assert daemon.list_containers()[0].image is None
    daemon.remove_containers(["c1"])
    assert cbj(pool, "image", "prune")["removed"] and len(_devices(pool)) == 1   # the template
    cb(pool, "image", "rm", "example.com/test/a:1", rc=3)
    with pytest.raises(errors.DeviceNotFoundError, match="no device named"):
        daemon.create_container("example.com/test/a:1", "c2")


def test_a_bad_blob_leaves_nothing_in_the_pool(pool, made, tmp_path):
    _, layout, _ = made
    damaged = _damaged_copy(layout, tmp_path, 2)   # two layers and the template made first
    r = cb(pool, "image", "load", f"{damaged}:b", "--name", "b", "--size", SIZE, rc=5)
    assert "sha256" in r.stderr and "layer 3 of 3" in r.stderr
    assert "Traceback" not in r.stderr
    assert _devices(pool) == [] and _records(pool) == {}


def test_a_failed_load_takes_nothing_of_what_was_there(pool, daemon, made, tmp_path):
    _, layout, docker = made
    _load(daemon, docker)
    devices, records = _devices(pool), _records(pool)
    damaged = _damaged_copy(layout, tmp_path, 2)
    cb(pool, "image", "load", f"{damaged}:b", "--name", "b", "--size", SIZE, rc=5)
    assert _devices(pool) == devices and _records(pool) == records
    assert _check(pool)
    # a layer the pool has is not read again (as docker and containerd do):
    # a damaged blob of it does not matter
    damaged0 = _damaged_copy(layout, tmp_path / "0", 0)
    out = _load(daemon, f"{damaged0}:b", "b")
    assert [la["reused"] for la in out["layers"]] == [True, True, False]


def test_a_hostile_layer_is_refused_and_leaves_nothing(pool, tmp_path):
    layout = Layout(tmp_path / "hostile")
    layout.add(layout.image([make_tar(entry("etc", "dir")),
                             make_tar(entry("../escape", data=b"x"))]), "v1")
    r = cb(pool, "image", "load", f"{layout.path}:v1", "--name", "h", "--size", SIZE, rc=5)
    assert "layer 2 of 2" in r.stderr and "escape" in r.stderr
    assert _devices(pool) == [] and _records(pool) == {}
    assert not (tmp_path / "escape").exists()


@pytest.mark.slow   # (writes its filesystem full: seconds)
def test_a_full_layer_filesystem_is_a_clear_error_and_leaves_nothing(pool, tmp_path):
    layout = Layout(tmp_path / "full")
    layout.add(layout.image([make_tar(entry("etc", "dir")),
                             make_tar(entry("fill", data=b"\x01" * (72 * MiB)))],
                            compression="none"), "v1")
    r = cb(pool, "image", "load", f"{layout.path}:v1", "--name", "f", "--size", "64M", rc=6)
    assert "layer 2 of 2" in r.stderr and "fill" in r.stderr and "Traceback" not in r.stderr
    assert _devices(pool) == [] and _records(pool) == {}


def test_load_through_the_api_and_its_refusals(pool, made, tmp_path):
    _, layout, docker = made
    proxy, _ = client.daemon(pool)
    with proxy:
        out = proxy.image_load(str(_multi(tmp_path).path), platform="linux/arm64",
                               size=128 * MiB)
        assert out["loaded"] == ["docker.io/library/multi:1"]
        assert out["platform"] == "linux/arm64" and len(out["layers"]) == 1
        out = proxy.image_load(str(docker), ref="x.org/api:1", size=128 * MiB)
        assert out["loaded"] == ["x.org/api:1"]
        info = proxy.oci_image_info("x.org/api:1")
        assert info["id"] == out["id"] and len(info["config"]["rootfs"]["diff_ids"]) == 2
        with pytest.raises(Exception, match="absolute path"):
            proxy.image_load("relative.tar")
        with pytest.raises(Exception, match="not valid"):
            proxy.image_load(str(docker), ref="Not A Ref")
        with pytest.raises(Exception, match="reference"):
            proxy.image_load(f"{layout.path}:a", size=128 * MiB)   # an OCI tag names no repo
        with pytest.raises(Exception, match="64 MiB"):
            proxy.image_load(str(docker), size=1 << 20)


def test_a_daemon_killed_mid_load_leaves_a_chain_the_next_load_resumes(pool, made, tmp_path):
    layout = Layout(tmp_path / "slow")
    big = make_tar(entry("data", data=os.urandom(32 * MiB)))
    layout.add(layout.image([_busybox_layer(), big], compression="none"), "v1")
    load = subprocess.Popen([COWBLOCK, "--pool", str(pool), "image", "load", f"{layout.path}:v1",
                             "--name", "slow", "--size", SIZE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # the second layer is being applied: kill the daemon there
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and load.poll() is None:
            if RuntimeDir(pool).pid() and any(k.startswith(b"layers/layer/") for k in
                                              _records(pool, b"layers/")):
                if any(k.startswith(b"layers/building/") for k in _records(pool, b"layers/")):
                    break
            time.sleep(0.02)
        else:
            pytest.fail(f"never saw the second layer being built: {load.communicate()}")
        with client.connect(pool) as proxy:   # no stop while it loads, unless forced
            with pytest.raises(errors.BusyError, match=f"loading image {layout.path}:v1"):
                proxy.stop()
        os.kill(RuntimeDir(pool).pid(), signal.SIGKILL)
        _, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
    assert load.returncode == 14 and "ended during image_load" in err
    # no image was recorded; the finished layer and the half-built one are there
    assert [i for i in cbj(pool, "image", "ls") if i.get("kind") == "oci"] == []
    assert any(d.startswith("building-") for d in _devices(pool))
    out = cbj(pool, "image", "load", f"{layout.path}:v1", "--name", "slow", "--size", SIZE)
    assert [la["reused"] for la in out["layers"]] == [True, False]
    assert not any(d.startswith("building-") for d in _devices(pool))
    assert _check(pool)


def test_two_loads_sharing_layers_at_once_unpack_them_once(pool, made):
    _, layout, _ = made
    proxy, _ = client.daemon(pool)   # one daemon, up before both start
    loads = [subprocess.Popen([COWBLOCK, "--pool", str(pool), "--json", "image", "load",
                               f"{layout.path}:{tag}", "--name", tag, "--size", SIZE],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    outs = []
    for p in loads:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    proxy.close()
    a, b = outs
    for i in range(2):
        assert a["layers"][i]["device"] == b["layers"][i]["device"]
        assert sorted([a["layers"][i]["reused"], b["layers"][i]["reused"]]) == [False, True]
    assert _check(pool)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["docker-archive", "oci-archive"])
def test_the_feature_image_loads_as_umoci_unpacks_it(pool, features, form, tmp_path):
    """test_oci's image of every layer feature (whiteouts, opaque dirs, hard
    links across layers, devices, xattrs, sparse files, odd names), loaded
    layer by layer onto snapshots, against `umoci unpack` of it."""
    cbj(pool, "image", "load", features.forms[form], "--name", "f", "--size", "256M")
    cb(pool, "container", "create", "f", "box")
    mnt = tmp_path / "mnt"
    cb(pool, "mount", "box", mnt)
    try:
        assert_same_tree(mnt, features.reference, mtime_not_compared=UMOCI_MTIME)
    finally:
        cb(pool, "umount", mnt)
