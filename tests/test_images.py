"""cowblock.images: image layers and containers kept in device labels;
at 4 KiB, 64 KiB and 1 MiB blocks."""
import io
import random

import pytest

from cowblock import (DeviceExistsError, DeviceNotFoundError, InvalidArgumentError,
                      NoSpaceError, Pool, ReadOnlyError, images, transfer)
from helpers import write_file

MiB = 1 << 20


@pytest.fixture(params=[4096, 65536, MiB], ids=["4K", "64K", "1M"])
def pool(tmp_path, request):
    """A 64 MiB pool, no background commits; checked clean at the end."""
    p = Pool.create(tmp_path / "pool", 64 * MiB, request.param, commit_interval=0)
    yield p
    if p._h is not None:
        report = p.check()
        assert report.ok, str(report)
        p.close()




def base_content(size=3 * MiB + 1000, seed=1):
    rnd = random.Random(seed)
    content = bytearray(rnd.randbytes(size))
    content[MiB:MiB + 300_000] = bytes(300_000)                # zeroes
    content[2 * MiB:2 * MiB + 512 * 1024] = bytes(512 * 1024)  # a hole in the file
    return content


def blocks_differing(a, b, bs):
    size = max(len(a), len(b))
    a, b = bytes(a).ljust(size, b"\0"), bytes(b).ljust(size, b"\0")
    return [off // bs for off in range(0, size, bs) if a[off:off + bs] != b[off:off + bs]]


def exported(pool, name, tmp_path):
    out = tmp_path / f"{name}.out"
    transfer.export_file(pool, name, out, overwrite=True)
    return out.read_bytes()


def make_three_layers(pool, tmp_path):
    bs = pool.block_size
    c0 = base_content()
    write_file(tmp_path / "l0.raw", c0, holes=[(2 * MiB, 512 * 1024)])
    c1 = bytearray(c0)
    c1[5000:5010] = b"layer one!"                       # a few bytes in one block
    c1[0:4096] = bytes(4096)                            # zeroes where the base had data
    c1[1500 * 1024:1500 * 1024 + 2 * bs] = bytes(2 * bs)
    write_file(tmp_path / "l1.raw", c1)
    c2 = bytearray(c1) + random.Random(9).randbytes(MiB)  # grows by 1 MiB
    c2[2 * MiB + 10:2 * MiB + 20] = b"into hole!"
    write_file(tmp_path / "l2.raw", c2, holes=[])
    images.import_image(pool, "base", tmp_path / "l0.raw")
    images.add_layer(pool, "base", "l1", tmp_path / "l1.raw")
    images.add_layer(pool, "l1", "l2", tmp_path / "l2.raw")
    return bytes(c0), bytes(c1), bytes(c2)


def test_three_layers(pool, tmp_path):
    bs = pool.block_size
    before = pool.stats().data_used
    c0, c1, c2 = make_three_layers(pool, tmp_path)
    listed = {i.name: i for i in images.list_images(pool)}
    assert listed["base"].layers == ["base"] and listed["base"].parent is None
    assert listed["l1"].layers == ["base", "l1"] and listed["l1"].parent == "base"
    assert listed["l2"].layers == ["base", "l1", "l2"] and listed["l2"].parent == "l1"
    for name, content in (("base", c0), ("l1", c1), ("l2", c2)):
        info = pool.info(name)
        assert info.read_only
        assert info.labels["cowblock.kind"] == "image"
        assert listed[name].length == len(content)
        assert info.size == -(-len(content) // 4096) * 4096
        assert exported(pool, name, tmp_path) == content
    # each layer maps new blocks only where its bytes differ from the layer below
    diffs = list(pool.diff("base", "l1"))
    changed = {blk for r in diffs for blk in range(r.begin, r.begin + r.length)}
    assert changed == set(blocks_differing(c0, c1, bs))
    assert all(r.kind != "right_only" for r in diffs)
    # blocks all zero in l1 where base had data are unmapped, not kept
    dev = pool.device("l1")
    zeroed = [b for b in blocks_differing(c0, c1, bs) if not any(c1[b * bs:(b + 1) * bs])]
    assert zeroed or bs == MiB
    for b in zeroed:
        assert [e.mapped for e in dev.block_status(b * bs, min(bs, dev.size - b * bs))] == [False]
    assert pool.stats().data_used - before == sum(
        1 for b in range(0, len(c0), bs) if any(c0[b:b + bs])) + sum(
        1 for b in blocks_differing(c0, c1, bs) if any(c1[b * bs:(b + 1) * bs])) + sum(
        1 for b in blocks_differing(c1, c2, bs) if any(c2[b * bs:(b + 1) * bs]))


def test_whole_zero_block_over_parent_data_is_discarded(pool, tmp_path):
    bs = pool.block_size
    c0 = random.Random(2).randbytes(4 * bs)
    write_file(tmp_path / "a", c0)
    c1 = bytearray(c0)
    c1[bs:2 * bs] = bytes(bs)
    write_file(tmp_path / "b", c1, holes=[(bs, bs)])
    images.import_image(pool, "a", tmp_path / "a")
    images.add_layer(pool, "a", "b", tmp_path / "b")
    dev = pool.device("b")
    assert [e.mapped for e in dev.block_status(bs, bs)] == [False]
    assert dev.pread(4 * bs, 0) == bytes(c1)
    assert pool.usage("b").exclusive_blocks == 0


def test_smaller_file_shrinks_the_layer_and_zeroes_the_tail(pool, tmp_path):
    c0 = random.Random(3).randbytes(2 * MiB)
    write_file(tmp_path / "a", c0)
    c1 = c0[:MiB + 5000]                      # ends inside a block, shorter than its parent
    write_file(tmp_path / "b", c1)
    images.import_image(pool, "a", tmp_path / "a")
    image = images.add_layer(pool, "a", "b", tmp_path / "b")
    assert image.size == MiB + 8192 and image.length == len(c1)
    dev = pool.device("b")
    assert dev.pread(8192 - 5000, MiB + 5000) == bytes(8192 - 5000)  # not the parent's bytes
    assert exported(pool, "b", tmp_path) == c1
    assert "cowblock.length" not in pool.info("a").labels
    # growing it again later shows zeroes, never the parent's bytes
    pool.set_read_only("b", False, force=True)   # an image: only when forced
    dev.resize(2 * MiB)
    assert dev.pread(MiB - 8192, MiB + 8192) == bytes(MiB - 8192)


def test_partial_zero_block_at_the_end_of_a_stream(pool, tmp_path):
    """A stream ends inside a block where the parent has data: the part of
    that block up to the end is zeroed, the rest is cut off."""
    c0 = random.Random(4).randbytes(2 * MiB)
    write_file(tmp_path / "a", c0)
    images.import_image(pool, "a", tmp_path / "a")
    c1 = c0[:MiB] + bytes(4096)              # zeroes over parent data, then the end
    images.add_layer(pool, "a", "b", io.BytesIO(c1))
    dev = pool.device("b")
    assert dev.size == len(c1)
    assert dev.pread(len(c1), 0) == c1
    assert pool.info("b").labels == {"cowblock.kind": "image"}


def test_larger_file_grows_the_layer(pool, tmp_path):
    c0 = random.Random(5).randbytes(MiB)
    write_file(tmp_path / "a", c0)
    c1 = c0 + random.Random(6).randbytes(MiB + 3)
    write_file(tmp_path / "b", c1)
    images.import_image(pool, "a", tmp_path / "a")
    image = images.add_layer(pool, "a", "b", tmp_path / "b")
    assert image.length == len(c1) and image.size == 2 * MiB + 4096
    assert exported(pool, "b", tmp_path) == c1
    stream = images.add_layer(pool, "b", "c", io.BytesIO(c1 + b"more"))
    assert exported(pool, "c", tmp_path) == c1 + b"more"
    assert stream.layers == ["a", "b", "c"]


def test_identical_file_adds_no_block(pool, tmp_path):
    c0 = base_content(MiB)
    write_file(tmp_path / "a", c0)
    images.import_image(pool, "a", tmp_path / "a")
    used = pool.stats().data_used
    images.add_layer(pool, "a", "same", tmp_path / "a")
    assert pool.stats().data_used == used
    assert list(pool.diff("a", "same")) == []


def test_containers_and_commit(pool, tmp_path):
    c0, c1, c2 = make_three_layers(pool, tmp_path)
    box1 = images.create_container(pool, "l2", "box1")
    box2 = images.create_container(pool, "l2", "box2")
    assert box1.image == "l2" and box2.image == "l2" and not box1.read_only
    length = transfer.length_labels({}, len(c2))   # l2's exact length, kept by its snapshots
    assert pool.info("box1").labels == {"cowblock.kind": "container", "cowblock.image": "l2",
                                        **length}
    pool.device("box1").pwrite(b"container one", 12345)
    pool.device("box2").pwrite(b"container two", 3 * MiB)
    committed = images.commit_container(pool, "box1", "l3")
    assert committed.layers == ["base", "l1", "l2", "l3"] and committed.parent == "l2"
    assert pool.info("l3").read_only
    assert pool.info("l3").labels == {"cowblock.kind": "image", "cowblock.parent": "l2",
                                      **length}
    pool.device("box1").pwrite(b"after commit", 0)   # the container goes on
    expect = bytearray(c2)
    expect[12345:12345 + 13] = b"container one"
    got = pool.device("l3").pread(len(expect), 0)
    assert got == bytes(expect)
    assert [r.kind for r in pool.diff("l2", "l3")] == ["different"]
    assert {c.name: c.image for c in images.list_containers(pool)} == {"box1": "l2",
                                                                       "box2": "l2"}
    assert {i.name: i.containers for i in images.list_images(pool)}["l2"] == ["box1", "box2"]
    # a container of the committed image, then the first container removed:
    # the chain still holds through the label
    images.create_container(pool, "l3", "box3")
    images.remove_container(pool, "box1")
    assert images.image_info(pool, "l3").layers == ["base", "l1", "l2", "l3"]
    assert [c.name for c in images.list_containers(pool)] == ["box2", "box3"]
    assert "box1" not in pool


def test_rename_of_an_image_is_followed(pool, tmp_path):
    make_three_layers(pool, tmp_path)
    images.create_container(pool, "l2", "box")
    pool.rename("l1", "middle")
    assert images.image_info(pool, "l2").layers == ["base", "middle", "l2"]
    pool.rename("l2", "top")
    assert images.container_info(pool, "box").image == "top"


def test_kinds_are_checked(pool, tmp_path):
    write_file(tmp_path / "a", b"x" * 4096)
    images.import_image(pool, "img", tmp_path / "a")
    pool.create_thin("plain", MiB)
    images.create_container(pool, "img", "box")
    with pytest.raises(InvalidArgumentError, match="'plain': it is a plain device, not an image"):
        images.create_container(pool, "plain", "x")
    with pytest.raises(InvalidArgumentError, match="'box': it is a container, not an image"):
        images.create_container(pool, "box", "x")
    with pytest.raises(InvalidArgumentError, match="not an image"):
        images.add_layer(pool, "box", "x", tmp_path / "a")
    with pytest.raises(InvalidArgumentError, match="'img': it is an image, not a container"):
        images.commit_container(pool, "img", "x")
    with pytest.raises(InvalidArgumentError, match="not a container"):
        images.remove_container(pool, "img")
    with pytest.raises(InvalidArgumentError, match="not a container"):
        images.remove_containers(pool, ["box", "plain"])
    assert "box" in pool   # nothing removed when one name is wrong
    with pytest.raises(DeviceNotFoundError):
        images.create_container(pool, "nope", "x")
    with pytest.raises(DeviceExistsError):
        images.create_container(pool, "img", "box")
    with pytest.raises(DeviceExistsError):
        images.import_image(pool, "img", tmp_path / "a")
    with pytest.raises(DeviceExistsError):
        images.add_layer(pool, "img", "box", tmp_path / "a")
    with pytest.raises(ReadOnlyError):
        pool.device("img").pwrite(b"x", 0)
    assert [i.name for i in images.list_images(pool)] == ["img"]
    assert [c.name for c in images.list_containers(pool)] == ["box"]


def test_remove_containers_deferred(pool, tmp_path):
    write_file(tmp_path / "a", b"x" * 8192)
    images.import_image(pool, "img", tmp_path / "a")
    used = pool.stats().data_used
    for n in ("b1", "b2"):
        images.create_container(pool, "img", n)
        pool.device(n).pwrite(b"y" * 100, 0)
    assert images.remove_containers(pool, ["b1", "b2", "b1"], deferred=True) == ["b1", "b2"]
    assert pool.wait_reclaimed(30)
    pool.commit()
    assert images.list_containers(pool) == []
    assert pool.stats().data_used == used


def test_failed_layer_leaves_nothing(tmp_path):
    with Pool.create(tmp_path / "small", 24 * 65536, 65536, commit_interval=0) as pool:
        c0 = random.Random(1).randbytes(MiB)
        write_file(tmp_path / "a", c0)
        images.import_image(pool, "a", tmp_path / "a")
        write_file(tmp_path / "b", random.Random(2).randbytes(MiB))
        with pytest.raises(NoSpaceError):
            images.add_layer(pool, "a", "b", tmp_path / "b")
        assert "b" not in pool
        assert pool.device("a").pread(MiB, 0) == c0
        assert [i.name for i in images.list_images(pool)] == ["a"]
        assert pool.check().ok


def test_incomplete_build_is_not_an_image(pool, tmp_path):
    """What a crash during a build leaves behind is labelled incomplete."""
    write_file(tmp_path / "a", b"x" * 4096)
    transfer.import_file(pool, "half", tmp_path / "a", labels={"cowblock.kind": "incomplete"})
    assert images.list_images(pool) == []
    with pytest.raises(InvalidArgumentError, match="an incomplete image, not an image"):
        images.create_container(pool, "half", "x")


def test_to_dict(pool, tmp_path):
    write_file(tmp_path / "a", b"x" * 5000)
    image = images.import_image(pool, "img", tmp_path / "a")
    d = image.to_dict()
    assert d["name"] == "img" and d["length"] == 5000 and d["size"] == 8192
    assert d["layers"] == ["img"] and isinstance(d["created"], str)
    box = images.create_container(pool, "img", "box").to_dict()
    assert box["image"] == "img" and box["read_only"] is False
