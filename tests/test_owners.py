"""cowblock.owners: what depends on what, who owns what, and the rules they
put on delete, rename, rollback, labels and the read-only flag, in the
library itself (the CLI and the daemon go through it)."""
import pytest

from cowblock import (DeviceNotFoundError, InvalidArgumentError, Pool, ProtectedError,
                      ReadOnlyError, images, owners, transfer)
from cowblock.control import client
from cowblock.runtime import RuntimeDir

MiB = 1 << 20
ODD = 10_000_003   # bytes: not a whole number of 4 KiB pages


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(tmp_path / "pool", 64 * MiB, 65536, commit_interval=0)
    yield p
    if p._h is not None:
        assert p.check().ok
        p.close()


def image(pool, tmp_path, name="img", data=b"x" * 5000):
    (tmp_path / f"{name}.raw").write_bytes(data)
    return images.import_image(pool, name, tmp_path / f"{name}.raw")


def test_an_image_with_containers_or_layers_is_not_removed(pool, tmp_path):
    image(pool, tmp_path)
    images.add_layer(pool, "img", "top", tmp_path / "img.raw")
    images.create_container(pool, "img", "box")
    with pytest.raises(ProtectedError, match=r"cannot remove image 'img': layer 'top' and "
                                             r"container 'box' depend on it.*--force"):
        pool.delete("img")
    with pytest.raises(ProtectedError, match="container 'box' depends on it"):
        pool.delete("img", "top")          # the layer goes with it; the container does not
    assert {"img", "top", "box"} <= set(i.name for i in pool.list())
    pool.delete("box", "top", "img")       # all of them at once: nothing is left behind
    assert pool.list() == []


def test_a_forced_removal_leaves_no_reference_to_what_is_gone(pool, tmp_path):
    image(pool, tmp_path)
    images.create_container(pool, "img", "box")
    pool.device("box").pwrite(b"mine", 0)
    images.commit_container(pool, "box", "committed")   # its parent is img, by label
    pool.delete("img", force=True)
    assert images.container_info(pool, "box").image is None
    assert owners.IMAGE_LABEL not in pool.info("box").labels
    assert owners.PARENT_LABEL not in pool.info("committed").labels
    assert images.image_info(pool, "committed").layers == ["committed"]
    # a new image of the old name is not taken for theirs
    image(pool, tmp_path)
    assert images.container_info(pool, "box").image is None
    assert images.image_info(pool, "img").containers == []
    assert pool.device("box").pread(5, 0) == b"minex"   # their data is all there


def test_a_container_names_only_an_image_that_exists(pool, tmp_path):
    """Even a label written by something else never makes a dangling image."""
    image(pool, tmp_path)
    images.create_container(pool, "img", "box")
    pool.set_labels("box", {owners.KIND_LABEL: "container", owners.IMAGE_LABEL: "gone"},
                    _internal=True)
    pool.rename("img", "img2")   # the origin (by id) still says which image it is
    assert images.container_info(pool, "box").image == "img2"
    pool.delete("img2", force=True)
    assert [c.image for c in images.list_containers(pool)] == [None]


def test_renames_carry_the_references(pool, tmp_path):
    image(pool, tmp_path)
    images.create_container(pool, "img", "box")
    images.commit_container(pool, "box", "layer")
    pool.delete("box")             # the layer's parent is now known by its label only
    pool.rename("img", "base")
    assert pool.info("layer").labels[owners.PARENT_LABEL] == "base"
    assert images.image_info(pool, "layer").layers == ["base", "layer"]
    with pytest.raises(ProtectedError, match="layer 'layer' depends on it"):
        pool.delete("base")


def test_owned_devices_are_their_owners(pool):
    pool.create_thin("snap", MiB, labels={owners.OWNER_LABEL: "containerd"}, _internal=True)
    pool.snapshot("snap", "child")
    for call in (lambda: pool.delete("snap"), lambda: pool.rename("snap", "x"),
                 lambda: pool.rollback("snap", "child"),
                 lambda: pool.delete("snap", owner="oci")):
        with pytest.raises(ProtectedError, match=r"cannot .*'snap': it belongs to containerd "
                                                 r"\(cowblock.owner=containerd\).*--force"):
            call()
    assert "cowblock.owner" not in pool.info("child").labels   # a snapshot is its maker's
    pool.rollback("snap", "child", owner="containerd")
    pool.rename("snap", "snap2", owner="containerd")
    pool.rename("snap2", "snap3", force=True)
    pool.delete("snap3", owner="containerd")
    assert [i.name for i in pool.list()] == ["child"]


def test_rollback_only_within_the_lineage(pool):
    pool.create_thin("vm", 4 * MiB).pwrite(b"one", 0)
    pool.snapshot("vm", "before")
    pool.snapshot("before", "before-2")                  # a snapshot of a snapshot of it
    pool.create_thin("other", 8 * MiB).pwrite(b"xyz", 0)  # unrelated, another size
    pool.snapshot("vm", "sibling-of-before")
    pool.device("vm").pwrite(b"two", 0)
    for snap in ("other", "sibling-of-before"):
        pool.snapshot(snap, f"{snap}-child")
    with pytest.raises(ProtectedError, match=r"'other' is not a snapshot of 'vm', nor one of "
                                             r"its origins.*--force"):
        pool.rollback("vm", "other")
    with pytest.raises(ProtectedError):
        pool.rollback("before", "sibling-of-before")
    assert pool.device("vm").pread(3, 0) == b"two" and pool.info("vm").size == 4 * MiB
    assert pool.rollback("vm", "before-2").size == 4 * MiB          # a descendant
    assert pool.device("vm").pread(3, 0) == b"one"
    pool.rollback("sibling-of-before-child", "vm")                   # an ancestor
    assert pool.rollback("vm", "other", force=True).size == 8 * MiB  # forced: anything
    assert pool.device("vm").pread(3, 0) == b"xyz"
    with pytest.raises(InvalidArgumentError):
        pool.rollback("vm", "vm")


def test_reserved_labels_are_cowblocks(pool, tmp_path):
    img = image(pool, tmp_path)
    for call in (lambda: pool.set_labels("img", {"cowblock.kind": "container"}),
                 lambda: pool.update("img", labels={"cowblock.kind": None}),
                 lambda: pool.update("img", labels={"cowblock.length": "1"}),
                 lambda: pool.create_thin("x", MiB, labels={"cowblock.owner": "me"}),
                 lambda: pool.create_thin("x", MiB, labels=[("cowblock.owner", "me")]),
                 lambda: pool.snapshot("img", "x", labels={"cowblock.image": "img"})):
        with pytest.raises(InvalidArgumentError, match="is a reserved label"):
            call()
    assert "x" not in pool
    pool.set_labels("img", {"team": "web"})   # replaces the user's labels, keeps cowblock's
    pool.update("img", labels={"tier": "front", "cowblock.owner": None})   # no change to it
    pool.set_labels("img", {**pool.info("img").labels, "team": "web"})     # given back as is
    assert pool.info("img").labels == {"cowblock.kind": "image", "cowblock.length": "5000",
                                       "team": "web", "tier": "front"}
    assert images.image_info(pool, "img").length == img.length == 5000


def test_an_image_is_made_writable_only_when_forced(pool, tmp_path):
    image(pool, tmp_path)
    for call in (lambda: pool.set_read_only("img", False),
                 lambda: pool.update("img", read_only=False)):
        with pytest.raises(ProtectedError, match="cannot make image 'img' writable.*--force"):
            call()
    assert pool.info("img").read_only
    pool.update("img", read_only=True)        # no change: fine
    pool.update("img", read_only=False, force=True)
    assert not pool.info("img").read_only


def test_the_original_length_survives_containers_commits_and_snapshots(pool, tmp_path):
    data = bytes(range(256)) * (ODD // 256) + b"x" * (ODD % 256)
    image(pool, tmp_path, "odd", data)
    images.create_container(pool, "odd", "box")
    pool.device("box").pwrite(b"changed", 100)
    images.commit_container(pool, "box", "odd-v2")
    pool.snapshot("odd-v2", "snap", read_only=True)
    want = data[:100] + b"changed" + data[107:]
    for name, content in (("odd", data), ("box", want), ("odd-v2", want), ("snap", want)):
        out = tmp_path / f"{name}.out"
        assert transfer.export_file(pool, name, out).length == ODD, name
        assert out.read_bytes() == content, name
    assert images.image_info(pool, "odd-v2").length == ODD


def test_errors_name_devices_not_ids(pool, tmp_path):
    image(pool, tmp_path)
    pool.create_thin("a", MiB)
    with pytest.raises(ReadOnlyError, match=r"^device 'img' is read-only$"):
        pool.device("img").pwrite(b"x", 0)
    with pytest.raises(InvalidArgumentError, match=r"cannot roll device 'a' back to itself"):
        pool.rollback("a", "a")
    with pytest.raises(DeviceNotFoundError, match="no device named 'nope'"):
        pool.delete("nope")


def test_the_rules_hold_through_the_daemon(tmp_path):
    path = tmp_path / "pool"
    with Pool.create(path, 64 * MiB, 65536) as p:
        (tmp_path / "a.raw").write_bytes(b"a" * 5000)
        images.import_image(p, "img", tmp_path / "a.raw")
        images.create_container(p, "img", "box")
        p.create_thin("other", MiB)
    proxy, started = client.daemon(path)
    assert started
    try:
        with pytest.raises(ProtectedError, match="container 'box' depends on it"):
            proxy.delete("img")
        with pytest.raises(ProtectedError, match="writable"):
            proxy.update("img", read_only=False)
        with pytest.raises(InvalidArgumentError, match="reserved label"):
            proxy.set_labels("box", {"cowblock.image": "other"})
        with pytest.raises(ProtectedError, match="not a snapshot of 'box'"):
            proxy.rollback("box", "other")
        with pytest.raises(ReadOnlyError, match="device 'img' is read-only"):
            proxy.device("img").pwrite(b"x", 0)
        assert proxy.resize_device("box", by=4096).size == 8192 + 4096
        proxy.delete("img", force=True)
        assert client.run(proxy, images.list_containers)[0].image is None
    finally:
        proxy.stop(force=True)
        proxy.close()
    assert RuntimeDir(path).pid() is None


def test_reserved_labels_survive_a_thin_xml_round_trip(tmp_path):
    from cowblock.interop import thinxml
    with Pool.create(tmp_path / "pool", 16 * MiB, 65536) as pool:
        image(pool, tmp_path, data=b"x" * 65536)
        images.create_container(pool, "img", "box")
        labels = {i.name: i.labels for i in pool.list()}
        with open(tmp_path / "pool.xml", "w") as xml, \
                open(tmp_path / "names.json", "w") as names:
            thinxml.dump(pool, xml, names)
    thinxml.restore(tmp_path / "pool.xml", tmp_path / "pool" / "data", tmp_path / "restored",
                    names_path=tmp_path / "names.json")
    with Pool.open(tmp_path / "restored") as restored:
        assert {i.name: i.labels for i in restored.list()} == labels
        assert images.container_info(restored, "box").image == "img"
