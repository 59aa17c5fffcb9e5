"""cowblock.oci: image archives in their four forms, and layers applied by
the OCI rules, compared entry by entry with `umoci unpack` of the same
image (an unpacker no one here wrote).

Images are made here: with umoci (repack of generated trees, and `umoci
raw add-layer` for hand-made layers), converted with skopeo to
docker-archive and oci-archive, and by hand into both `docker save`
layouts.  Edge cases and damage use small layouts written by this file.
"""
import errno
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import struct
import subprocess
import tarfile
from types import SimpleNamespace

import pytest

from cowblock import oci
from cowblock.oci import apply as apply_mod
from cowblock.oci import archive as archive_mod
from cowblock.oci import platforms, refs, resolve

zstandard = pytest.importorskip("zstandard")

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="applying layers sets owners and makes "
                                "device nodes: needs root")
HAVE_TOOLS = all(shutil.which(t) for t in ("umoci", "skopeo"))
needs_tools = pytest.mark.skipif(not (IS_ROOT and HAVE_TOOLS),
                                 reason="needs root, umoci and skopeo (make deps)")

CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)   # cap_net_raw+ep, v2


def run(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kw)


@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch):
    """Both ways of resolving paths in the root (resolve.py)."""
    if request.param == "openat2" and not resolve.openat2_works():
        pytest.skip("openat2 does not work on this kernel")
    monkeypatch.setattr(resolve, "USE_OPENAT2", request.param == "openat2")
    return request.param


# ---- tars and layouts made here ----
def entry(name, kind="file", data=b"", mode=None, uid=0, gid=0, target="", mtime=1_700_000_000,
          xattrs=None, dev=(0, 0)):
    info = tarfile.TarInfo(name)
    info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
                 "link": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE,
                 "blk": tarfile.BLKTYPE}[kind]
    info.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    info.uid, info.gid, info.mtime, info.linkname = uid, gid, mtime, target
    info.devmajor, info.devminor = dev
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                            for k, v in xattrs.items()}
    info.size = len(data) if kind == "file" else 0
    return info, data


def make_tar(*entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as t:
        for info, data in entries:
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data, how):
    if how == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


LAYER_TYPE = {"none": "application/vnd.oci.image.layer.v1.tar",
              "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
              "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


class Layout:
    """A small OCI image layout written by hand."""

    def __init__(self, path):
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.index = []

    def blob(self, data):
        digest = sha(data)
        (self.path / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return digest

    def blob_path(self, digest):
        return self.path / "blobs" / "sha256" / digest[7:]

    def image(self, tars, compression="gzip", arch="amd64", media_types=None, diff_ids=None,
              variant=None):
        layers = []
        for i, t in enumerate(tars):
            how = compression if isinstance(compression, str) else compression[i]
            blob = compress(t, how)
            layers.append({"mediaType": (media_types or {}).get(i, LAYER_TYPE[how]),
                           "digest": self.blob(blob), "size": len(blob)})
        config = {"architecture": arch, "os": "linux",
                  "rootfs": {"type": "layers",
                             "diff_ids": diff_ids or [sha(t) for t in tars]}}
        if variant:
            config["variant"] = variant
        config_bytes = json.dumps(config).encode()
        manifest = {"schemaVersion": 2, "mediaType": archive_mod.OCI_MANIFEST,
                    "config": {"mediaType": archive_mod.OCI_CONFIG,
                               "digest": self.blob(config_bytes), "size": len(config_bytes)},
                    "layers": layers}
        data = json.dumps(manifest).encode()
        return {"mediaType": archive_mod.OCI_MANIFEST, "digest": self.blob(data),
                "size": len(data)}

    def index_of(self, descriptors):
        data = json.dumps({"schemaVersion": 2, "mediaType": archive_mod.OCI_INDEX,
                           "manifests": descriptors}).encode()
        return {"mediaType": archive_mod.OCI_INDEX, "digest": self.blob(data),
                "size": len(data)}

    def add(self, descriptor, name=None, **annotations):
        d = dict(descriptor)
        if name:
            annotations[archive_mod.REF_NAME] = name
        if annotations:
            d["annotations"] = annotations
        self.index.append(d)
        (self.path / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": self.index}))
        return d


def tar_dir(src, out):
    """A tar of directory SRC's contents (names relative to it)."""
    with tarfile.open(out, "w") as t:
        for name in sorted(os.listdir(src)):
            t.add(os.path.join(src, name), arcname=name)
    return out


def open_image(location, **kw):
    archive = oci.open_archive(location)
    return archive, archive.image(**kw)


def apply_all(image, root, **kw):
    stats = []
    for layer in image.layers:
        with layer.open() as stream:
            stats.append(oci.apply_layer(stream, root, **kw))
    return stats


# ---- comparing trees ----
def snapshot(root, skip=("lost+found",)):
    """Every entry under ROOT: type, mode, owner, size, content hash, link
    target, device numbers, xattrs, mtime; and the hard-link groups."""
    entries, inodes = {}, {}

    def record(path, rel):
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        rec = {"type": kind, "mode": oct(stat.S_IMODE(st.st_mode)), "owner": (st.st_uid, st.st_gid),
               "xattrs": {n: os.getxattr(path, n, follow_symlinks=False)
                          for n in sorted(os.listxattr(path, follow_symlinks=False))
                          if n != "security.selinux"}}
        if rel != ".":
            rec["mtime"] = st.st_mtime_ns
        if kind == stat.S_IFREG:
            with open(path, "rb") as f:
                rec["sha"] = hashlib.file_digest(f, "sha256").hexdigest()
            rec["size"] = st.st_size
            if st.st_nlink > 1:
                inodes.setdefault(st.st_ino, set()).add(rel)
        elif kind == stat.S_IFLNK:
            rec["target"] = os.readlink(path)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        entries[rel] = rec

    record(root, ".")
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            record(os.path.join(dirpath, name), rel)
    groups = {frozenset(g) for g in inodes.values() if len(g) > 1}
    return entries, groups


def assert_same_tree(ours, reference, skip=("lost+found",), mtime_not_compared=()):
    (a, ga), (b, gb) = snapshot(ours, skip), snapshot(reference, skip)
    for p in mtime_not_compared:
        a.get(p, {}).pop("mtime", None)
        b.get(p, {}).pop("mtime", None)
    problems = [f"only in ours: {p}" for p in sorted(a.keys() - b.keys())]
    problems += [f"only in umoci's: {p}" for p in sorted(b.keys() - a.keys())]
    for p in sorted(a.keys() & b.keys()):
        for k in sorted(a[p].keys() | b[p].keys()):
            if a[p].get(k) != b[p].get(k):
                problems.append(f"{p}: {k} ours {a[p].get(k)!r}, umoci's {b[p].get(k)!r}")
    if ga != gb:
        problems.append(f"hard-link groups differ: ours {sorted(map(sorted, ga))}, "
                        f"umoci's {sorted(map(sorted, gb))}")
    assert not problems, "\n".join(problems[:40])
    return a


# ---- the feature image, made with umoci ----
def _layer1(r):
    (r / "etc").mkdir()
    (r / "etc" / "hostname").write_text("cowblock\n")
    (r / "etc" / "motd").write_text("layer one\n")
    (r / "dir with space").mkdir()
    (r / "dir with space" / "файл ü é.txt").write_text("non-ascii\n")
    (r / "big").mkdir()
    (r / "big" / "file-1000003").write_bytes(random.Random(1).randbytes(1_000_003))
    (r / "sparse").mkdir()
    with open(r / "sparse" / "file-50M", "wb") as f:
        f.truncate(50_000_000)
        f.seek(40 << 20)
        f.write(random.Random(2).randbytes(5000))
    (r / "links").mkdir()
    os.symlink("../etc/hostname", r / "links" / "rel")
    os.symlink("/etc/hostname", r / "links" / "abs")
    os.symlink("/no/such/thing", r / "links" / "dangling")
    os.symlink("../etc", r / "links" / "dir")
    (r / "dev").mkdir()
    os.mkfifo(r / "dev" / "fifo", 0o620)
    os.mknod(r / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(r / "dev" / "loop7", stat.S_IFBLK | 0o660, os.makedev(7, 200))
    (r / "bin").mkdir()
    for name, mode in (("suid", 0o4755), ("sgid", 0o2711), ("ping", 0o755)):
        (r / "bin" / name).write_bytes(b"\x7fELF" + name.encode())
        os.chmod(r / "bin" / name, mode)
    os.setxattr(r / "bin" / "ping", "security.capability", CAPABILITY)
    (r / "tmp").mkdir()
    os.chmod(r / "tmp", 0o1777)
    (r / "shared").mkdir()
    os.chmod(r / "shared", 0o2775)
    (r / "owned").mkdir()
    (r / "owned" / "file").write_text("theirs\n")
    os.chown(r / "owned" / "file", 1234, 5678)
    (r / "owned" / "dir").mkdir()
    os.chown(r / "owned" / "dir", 4321, 8765)
    os.symlink("file", r / "owned" / "link")
    os.lchown(r / "owned" / "link", 1111, 2222)
    (r / "xattr").mkdir()
    (r / "xattr" / "file").write_text("with xattrs\n")
    os.setxattr(r / "xattr" / "file", "user.comment", b"hello \x00\xff")
    os.setxattr(r / "xattr" / "file", "trusted.cowblock", b"t")
    os.setxattr(r / "xattr", "user.dir", b"d")
    (r / "hl").mkdir()
    (r / "hl" / "a").write_text("linked\n")
    os.link(r / "hl" / "a", r / "hl" / "b")
    os.link(r / "hl" / "a", r / "hl" / "c")
    (r / "gone").mkdir()
    (r / "gone" / "file").write_text("deleted in layer 2\n")
    (r / "gone-dir" / "sub").mkdir(parents=True)
    (r / "gone-dir" / "sub" / "f").write_text("deleted in layer 2\n")
    (r / "opq" / "sub").mkdir(parents=True)
    (r / "opq" / "lower-a").write_text("hidden by layer 3\n")
    (r / "opq" / "sub" / "lower-b").write_text("hidden by layer 3\n")
    (r / "type-change" / "dir-to-link").mkdir(parents=True)
    (r / "type-change" / "dir-to-link" / "child").write_text("x\n")
    (r / "type-change" / "file-to-dir").write_text("a file in layer 1\n")
    (r / "meta").mkdir()
    (r / "meta" / "chmod-me").write_text("same content\n")


def _layer2(r):
    (r / "etc" / "motd").write_text("layer two\n")
    (r / "etc" / "layer2").write_text("new in layer 2\n")
    os.unlink(r / "gone" / "file")
    shutil.rmtree(r / "gone-dir")
    os.unlink(r / "type-change" / "file-to-dir")
    (r / "type-change" / "file-to-dir").mkdir()
    (r / "type-change" / "file-to-dir" / "child").write_text("now a dir\n")
    shutil.rmtree(r / "type-change" / "dir-to-link")
    os.symlink("../etc", r / "type-change" / "dir-to-link")
    os.chmod(r / "meta" / "chmod-me", 0o600)
    os.chown(r / "meta" / "chmod-me", 42, 43)


def _layer3_tar():
    """Hand-made: an opaque directory (marker after its new entries),
    hard links to lower layers' files, a same-layer whiteout that must not
    hide its own entry, a whiteout of nothing, odd names."""
    return make_tar(
        entry("opq", "dir"),
        entry("opq/new-file", data=b"layer 3\n"),
        entry("opq/sub", "dir", mode=0o700),
        entry("opq/sub/new-b", data=b"layer 3 b\n"),
        entry("opq/.wh..wh..opq"),
        entry("hl/cross", "link", target="big/file-1000003"),
        entry("hl/d", "link", target="hl/a"),
        entry("fresh", data=b"made and whited out in one layer\n"),
        entry(".wh.fresh"),
        entry(".wh.never-was"),
        entry("/abs-named", data=b"leading slash\n"),
        entry("./dot-named", data=b"leading dot\n"),
        entry("norm", "dir"),
        entry("norm//x", "dir"),
        entry("norm/x/./y", data=b"cleaned\n"),
        entry("xattr/hand", data=b"pax xattrs\n", xattrs={"user.bin": b"\x00\x01\xfe\xff"}),
        entry("dev/hand-chr", "chr", mode=0o600, dev=(10, 229), uid=7, gid=8),
        entry("owned/hand", data=b"owned\n", uid=65534, gid=65533, mode=0o4750),
    )


def _layer4_tar(work):
    """GNU tar of a tree, as mmdebstrap writes them: `./` names, a root
    entry, a GNU sparse member (PAX 1.0: umoci 0.4.7 refuses old-GNU 'S'
    members, which test_old_gnu_sparse_members_as_gnu_tar_extracts covers)."""
    src = work / "layer4-src"
    (src / "etc").mkdir(parents=True)
    os.chmod(src, 0o755)
    (src / "etc" / "added").write_text("from gnu tar\n")
    with open(src / "gnu-sparse", "wb") as f:
        f.truncate(20 << 20)
        f.seek(10 << 20)
        f.write(b"middle" * 1000)
        f.seek((20 << 20) - 6)
        f.write(b"ending")
    out = work / "layer4.tar"
    run("tar", "--sparse", "--format=posix", "--numeric-owner", "-C", src, "-cf", out, ".")
    return out


def _docker_legacy(layout, tag, out, repo_tag):
    """A `docker save` tar of Docker 20.10 from the image TAG of LAYOUT."""
    index = json.loads((layout / "index.json").read_text())
    desc = next(d for d in index["manifests"]
                if d.get("annotations", {}).get(archive_mod.REF_NAME) == tag)
    blob = lambda d: (layout / "blobs" / "sha256" / d[7:]).read_bytes()  # noqa: E731
    manifest = json.loads(blob(desc["digest"]))
    config = blob(manifest["config"]["digest"])
    files, layer_paths, parent = {}, [], ""
    for d in manifest["layers"]:
        data = blob(d["digest"])
        if d["mediaType"].endswith("gzip"):
            data = gzip.decompress(data)
        layer_id = hashlib.sha256((parent + sha(data)).encode()).hexdigest()
        files[f"{layer_id}/layer.tar"] = data
        files[f"{layer_id}/VERSION"] = b"1.0"
        files[f"{layer_id}/json"] = json.dumps({"id": layer_id, "parent": parent}).encode()
        layer_paths.append(f"{layer_id}/layer.tar")
        parent = layer_id
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    files[config_name] = config
    files["manifest.json"] = json.dumps([{"Config": config_name, "RepoTags": [repo_tag],
                                          "Layers": layer_paths}]).encode()
    name, _, version = repo_tag.rpartition(":")
    files["repositories"] = json.dumps({name: {version: parent}}).encode()
    _write_tar(out, files)
    return out


def _docker_oci(layout, tag, out, repo_tag):
    """A `docker save` tar of Docker 25: an OCI layout plus manifest.json."""
    index = json.loads((layout / "index.json").read_text())
    desc = dict(next(d for d in index["manifests"]
                     if d.get("annotations", {}).get(archive_mod.REF_NAME) == tag))
    manifest = json.loads((layout / "blobs" / "sha256" / desc["digest"][7:]).read_bytes())
    desc["annotations"] = {archive_mod.CONTAINERD_NAME: refs.normalize(repo_tag),
                           archive_mod.REF_NAME: repo_tag.rpartition(":")[2]}
    files = {f"blobs/sha256/{p.name}": p.read_bytes()
             for p in (layout / "blobs" / "sha256").iterdir()}
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [desc]}).encode()
    files["manifest.json"] = json.dumps([{
        "Config": "blobs/sha256/" + manifest["config"]["digest"][7:], "RepoTags": [repo_tag],
        "Layers": ["blobs/sha256/" + d["digest"][7:] for d in manifest["layers"]]}]).encode()
    _write_tar(out, files)
    return out


def _write_tar(out, files):
    with tarfile.open(out, "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    if not (IS_ROOT and HAVE_TOOLS):
        pytest.skip("needs root, umoci and skopeo (make deps)")
    work = tmp_path_factory.mktemp("oci-features")
    layout, bundle = work / "layout", work / "bundle"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:base")
    run("umoci", "unpack", "--image", f"{layout}:base", bundle)
    rootfs = bundle / "rootfs"
    _layer1(rootfs)
    run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:v1", bundle)
    _layer2(rootfs)
    run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:v2", bundle)
    layer3 = work / "layer3.tar"
    layer3.write_bytes(_layer3_tar())
    run("umoci", "raw", "add-layer", "--image", f"{layout}:v2", "--tag", "v3", layer3)
    run("umoci", "raw", "add-layer", "--image", f"{layout}:v3", "--tag", "v4",
        _layer4_tar(work))
    reference = work / "reference"
    run("umoci", "unpack", "--image", f"{layout}:v4", reference)
    repo = "example.com/cowblock/features:v4"
    forms = {
        "oci-layout": f"{layout}:v4",
        "oci-archive": work / "oci-archive.tar",
        "docker-archive": work / "docker-archive.tar",
        "docker-save": _docker_legacy(layout, "v4", work / "docker-legacy.tar", repo),
        "docker-save-oci": _docker_oci(layout, "v4", work / "docker-oci.tar", repo),
    }
    run("skopeo", "copy", f"oci:{layout}:v4", f"oci-archive:{forms['oci-archive']}:v4")
    run("skopeo", "copy", f"oci:{layout}:v4", f"docker-archive:{forms['docker-archive']}:{repo}")
    return SimpleNamespace(work=work, layout=layout, reference=reference / "rootfs",
                           forms=forms, repo=repo)


# umoci removes what an opaque marker hides when it meets the marker, and
# puts back the times of the marker's own directory only: opq/sub, whose
# lower child it removed after the layer had set its time, keeps the time
# of the removal.  Ours has the layer's time (checked apart).
UMOCI_MTIME = ("opq/sub",)


# ---- the feature image, every form, against umoci ----
FORM_NAMES = {"oci-layout": "oci-layout", "oci-archive": "oci-archive",
              "docker-archive": "docker-save", "docker-save": "docker-save",
              "docker-save-oci": "docker-save-oci"}


@needs_tools
@pytest.mark.parametrize("form", list(FORM_NAMES))
def test_every_form_applies_as_umoci_unpacks(features, form, tmp_path):
    archive, image = open_image(features.forms[form])
    with archive:
        assert archive.form == FORM_NAMES[form]
        assert len(image.layers) == 4
        assert image.platform == oci.Platform("linux", "amd64")
        if form.startswith("docker"):
            assert image.refs == (refs.normalize(features.repo),)
        root = tmp_path / "root"
        root.mkdir()
        stats = apply_all(image, root)
    assert_same_tree(root, features.reference, mtime_not_compared=UMOCI_MTIME)
    assert os.lstat(root / "opq" / "sub").st_mtime == 1_700_000_000
    # the sparse file is sparse; whiteouts were seen and applied
    st = os.stat(root / "sparse" / "file-50M")
    assert st.st_size == 50_000_000 and st.st_blocks * 512 < 1 << 20
    gnu = os.stat(root / "gnu-sparse")
    assert gnu.st_size == 20 << 20 and gnu.st_blocks * 512 < 1 << 20
    assert sum(s.whiteouts for s in stats) >= 5
    assert not (root / "gone-dir").exists() and not (root / "opq" / "lower-a").exists()
    assert (root / "fresh").read_bytes() == b"made and whited out in one layer\n"
    assert os.getxattr(root / "bin" / "ping", "security.capability") == CAPABILITY
    assert os.stat(root / "hl" / "cross").st_ino == os.stat(root / "big" / "file-1000003").st_ino


@needs_tools
def test_all_forms_agree_on_the_image(features):
    seen = set()
    for form, location in features.forms.items():
        with oci.open_archive(location) as archive:
            image = archive.image()
            seen.add((image.config_digest, image.diff_ids, image.chain_ids))
    assert len(seen) == 1
    (_, diff_ids, chains), = seen
    assert chains == tuple(oci.chain_ids(diff_ids)) and chains[0] == diff_ids[0]


@needs_tools
def test_applies_onto_a_real_ext4_as_umoci_unpacks(features, ext4, resolver):
    mnt = ext4(256 << 20)
    with oci.open_archive(features.forms["oci-archive"]) as archive:
        apply_all(archive.image(), mnt)
    assert_same_tree(mnt, features.reference, mtime_not_compared=UMOCI_MTIME)


@needs_tools
def test_layers_apply_one_by_one_as_umoci_unpacks_each_tag(features, tmp_path, resolver):
    """After each layer the tree is umoci's unpack of the image ending there."""
    root = tmp_path / "root"
    root.mkdir()
    with oci.open_archive(f"{features.layout}:v4") as archive:
        layers = archive.image().layers
        for tag, layer in zip(("v1", "v2", "v3", "v4"), layers):
            with layer.open() as stream:
                oci.apply_layer(stream, root)
            reference = tmp_path / f"ref-{tag}"
            run("umoci", "unpack", "--image", f"{features.layout}:{tag}", reference)
            assert_same_tree(root, reference / "rootfs", mtime_not_compared=UMOCI_MTIME)


# ---- ext4 ----
@pytest.fixture
def ext4(tmp_path):
    """ext4(size, inodes=None) -> a loop-mounted fresh ext4 directory."""
    if not IS_ROOT or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root and mkfs.ext4 for a loop-mounted ext4")
    mounts = []

    def make(size, inodes=None):
        image = tmp_path / f"fs{len(mounts)}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        run("mkfs.ext4", "-q", "-F", *(["-N", inodes] if inodes else []), image)
        mnt = tmp_path / f"mnt{len(mounts)}"
        mnt.mkdir()
        try:
            run("mount", "-o", "loop", image, mnt)
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot loop-mount: {e.stderr.decode().strip()}")
        mounts.append(mnt)
        return mnt

    yield make
    for mnt in mounts:
        subprocess.run(["umount", str(mnt)], check=False)


@needs_root
def test_enospc_names_the_layer_and_the_entry(ext4):
    mnt = ext4(8 << 20)
    layer = make_tar(entry("small", data=b"x"), entry("big", data=random.randbytes(16 << 20)))
    with pytest.raises(oci.LayerSpaceError) as e:
        oci.apply_layer(io.BytesIO(layer), mnt, label="layer 1 of 1 (sha256:test)")
    assert e.value.errno == errno.ENOSPC
    assert "layer 1 of 1 (sha256:test)" in str(e.value) and "'big'" in str(e.value)
    assert "no free blocks" in str(e.value)


@needs_root
def test_inode_exhaustion_names_the_layer_and_the_entry(ext4):
    mnt = ext4(16 << 20, inodes=32)
    layer = make_tar(*(entry(f"f{i}") for i in range(200)))
    with pytest.raises(oci.LayerSpaceError) as e:
        oci.apply_layer(io.BytesIO(layer), mnt, label="layer X")
    assert "layer X" in str(e.value) and "no free inodes" in str(e.value)


@needs_root
def test_decompression_bomb_refused_by_the_default_limit(ext4):
    mnt = ext4(32 << 20)       # the default limit: 4 x 32 MiB, at least 256 MiB
    zeros = _zero_file_tar("bomb", 300 << 20)
    with pytest.raises(oci.LayerLimitError, match="decompression bomb"):
        oci.apply_layer(zeros, mnt)


def _zero_file_tar(name, size):
    """A stream of a tar holding one SIZE-byte file of zeros, never held whole."""
    info = tarfile.TarInfo(name)
    info.size = size
    header = info.tobuf(format=tarfile.PAX_FORMAT)

    class Zeros(io.RawIOBase):
        def __init__(self):
            self.left = len(header) + size + 1024
            self.pos = 0

        def readable(self):
            return True

        def read(self, n=-1):
            n = min(self.left, n if n >= 0 else self.left)
            if self.pos < len(header):
                out = header[self.pos:self.pos + n]
            else:
                out = bytes(n)
            self.pos += len(out)
            self.left -= len(out)
            return out

    return Zeros()


# ---- hostile layers ----
@pytest.fixture
def jail(tmp_path):
    """A root to apply into and canaries beside it, checked untouched."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "canary.txt").write_text("untouched\n")
    (outside / "dir").mkdir()
    before = snapshot(outside), sorted(os.listdir(tmp_path))
    yield SimpleNamespace(root=root, outside=outside)
    assert (snapshot(outside), sorted(os.listdir(tmp_path))) == before, \
        "something outside the root changed"


def _hostile(outside):
    o = str(outside)
    return {
        "dotdot name": [entry("../outside/pwned", data=b"x")],
        "dotdot inside name": [entry("a", "dir"), entry("a/../../outside/pwned", data=b"x")],
        "dotdot dir": [entry("../outside/newdir", "dir")],
        "relative symlink escape": [entry("esc", "sym", target="../outside"),
                                    entry("esc/pwned", data=b"x")],
        "deep relative symlink escape": [entry("d", "dir"),
                                         entry("d/esc", "sym", target="../../outside"),
                                         entry("d/esc/pwned", data=b"x")],
        "absolute symlink escape": [entry("esc", "sym", target=o), entry("esc/pwned", data=b"x")],
        "symlink chain escape": [entry("a", "sym", target="b"),
                                 entry("b", "sym", target="../outside"),
                                 entry("a/pwned", data=b"x")],
        "magic link": [entry("p", "sym", target="/proc/self/cwd"), entry("p/pwned", data=b"x")],
        "symlink escape, then a dir": [entry("esc", "sym", target=o),
                                       entry("esc/newdir", "dir")],
        "hard link to outside": [entry("hl", "link", target="../outside/canary.txt")],
        "hard link through a symlink": [entry("esc", "sym", target=o),
                                        entry("hl", "link", target="esc/canary.txt")],
        "whiteout of ..": [entry("sub", "dir"), entry("sub/.wh..."),
                           entry("sub/x", data=b"x")],
        "whiteout of .. at the top": [entry(".wh...")],
        "whiteout of .": [entry(".wh..")],
        "whiteout through a symlink": [entry("esc", "sym", target=o),
                                       entry("esc/.wh.canary.txt")],
        "opaque through a symlink": [entry("esc", "sym", target=o),
                                     entry("esc/.wh..wh..opq")],
        "root turned into a symlink": [entry(".", "sym", target=o),
                                       entry("pwned", data=b"x")],
        "hard link of the root": [entry("hl", "link", target="./")],
    }


HOSTILE = list(_hostile("/x"))


@needs_root
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_layer_refused_nothing_outside_touched(case, jail, resolver):
    layer = make_tar(*_hostile(jail.outside)[case])
    with pytest.raises(oci.UnsafeLayerError) as e:
        oci.apply_layer(io.BytesIO(layer), jail.root, label="layer 9 of 9 (sha256:evil)")
    assert "layer 9 of 9 (sha256:evil)" in str(e.value) and "refused" in str(e.value)


@needs_root
def test_replacing_an_escaping_symlink_never_follows_it(jail, resolver):
    """A file or hard link at a symlink's own path replaces the symlink."""
    o = str(jail.outside / "canary.txt")
    layer = make_tar(entry("esc", "sym", target=o), entry("esc", data=b"replaced"),
                     entry("esc2", "sym", target=o), entry("hl", "link", target="esc2"),
                     entry("esc3", "sym", target=str(jail.outside)), entry("esc3", "dir"),
                     entry("esc3/inside", data=b"in"))
    oci.apply_layer(io.BytesIO(layer), jail.root)
    assert (jail.root / "esc").read_bytes() == b"replaced"
    assert os.readlink(jail.root / "hl") == o         # a hard link to the symlink itself
    assert (jail.root / "esc3" / "inside").read_bytes() == b"in"


@needs_root
def test_symlinks_inside_the_root_are_followed_for_parents(tmp_path, resolver):
    root = tmp_path / "root"
    root.mkdir()
    oci.apply_layer(io.BytesIO(make_tar(entry("usr", "dir"), entry("usr/bin", "dir"),
                                        entry("bin", "sym", target="usr/bin"),
                                        entry("up", "dir"),
                                        entry("up/ring", "sym", target="../usr"))), root)
    stats = oci.apply_layer(io.BytesIO(make_tar(entry("bin/tool", data=b"t"),
                                                entry("up/ring/bin/tool2", data=b"u"),
                                                entry("bin/.wh.gone"))), root)
    assert (root / "usr" / "bin" / "tool").read_bytes() == b"t"
    assert (root / "usr" / "bin" / "tool2").read_bytes() == b"u"
    assert stats.files == 2


@needs_root
def test_too_many_entries_refused(tmp_path):
    layer = make_tar(*(entry(f"f{i}") for i in range(50)))
    with pytest.raises(oci.LayerLimitError, match="more than 20 entries"):
        oci.apply_layer(io.BytesIO(layer), tmp_path, max_entries=20)


@needs_root
def test_decompression_bomb_refused(tmp_path):
    with pytest.raises(oci.LayerLimitError, match="decompression bomb"):
        oci.apply_layer(_zero_file_tar("bomb", 200 << 20), tmp_path, max_bytes=16 << 20)


@needs_root
def test_a_bomb_after_the_end_of_the_tar_refused(tmp_path):
    stream = io.BytesIO(make_tar(entry("ok", data=b"x")) + bytes(40 << 20))
    with pytest.raises(oci.LayerLimitError):
        oci.apply_layer(stream, tmp_path, max_bytes=8 << 20)


@needs_root
def test_damaged_tar_refused(tmp_path):
    layer = bytearray(make_tar(entry("a", data=b"x" * 600), entry("b", data=b"y")))
    second = layer.index(b"b\x00", 1024)        # the second member's header
    layer[second + 148:second + 156] = b"0000000\x00"    # a wrong checksum
    with pytest.raises(oci.LayerError, match="damaged"):
        oci.apply_layer(io.BytesIO(bytes(layer)), tmp_path)
    with pytest.raises(oci.LayerError, match="not a tar"):
        oci.apply_layer(io.BytesIO(b"definitely not a tar archive" * 40), tmp_path)
    truncated = make_tar(entry("big", data=b"z" * 100_000))[:50_000]
    with pytest.raises(oci.LayerError, match="ends inside"):
        oci.apply_layer(io.BytesIO(truncated), tmp_path)


# ---- whiteout semantics ----
@needs_root
def test_whiteouts_hide_lower_layers_only_whatever_the_order(tmp_path, resolver):
    root = tmp_path / "root"
    root.mkdir()
    lower = make_tar(entry("a", "dir"), entry("a/b", "dir"), entry("a/b/c", "dir"),
                     entry("a/b/c/bar", data=b"lower"), entry("a/x", data=b"lower"),
                     entry("d", "dir"), entry("d/z", data=b"lower"),
                     entry("keep", data=b"lower"), entry("f", data=b"lower"))
    oci.apply_layer(io.BytesIO(lower), root)
    # the image-spec's example, with the opaque marker last; a whiteout of
    # a directory this layer also makes; of a file it replaces; of nothing
    upper = make_tar(entry("a", "dir"), entry("a/b", "dir"), entry("a/b/c", "dir"),
                     entry("a/b/c/foo", data=b"upper"), entry("a/.wh..wh..opq"),
                     entry("d", "dir"), entry("d/new", data=b"upper"), entry(".wh.d"),
                     entry("f", data=b"upper"), entry(".wh.f"), entry(".wh.nothing"),
                     entry("nothing-dir/.wh.x"))
    stats = oci.apply_layer(io.BytesIO(upper), root)
    tree = {os.path.relpath(os.path.join(d, n), root)
            for d, ds, fs in os.walk(root) for n in ds + fs}
    assert tree == {"a", "a/b", "a/b/c", "a/b/c/foo", "d", "d/new", "keep", "f"}
    assert (root / "f").read_bytes() == b"upper"
    assert stats.whiteouts == 5


@needs_root
def test_lower_directories_keep_their_times(tmp_path, resolver):
    """A layer that adds to or prunes a lower directory without an entry
    for it leaves its times as they were (as umoci does)."""
    root = tmp_path / "root"
    root.mkdir()
    old = 1_500_000_000
    oci.apply_layer(io.BytesIO(make_tar(
        entry("a", "dir", mtime=old), entry("a/b", "dir", mtime=old),
        entry("a/b/c", "dir", mtime=old), entry("a/b/c/d", "dir", mtime=old),
        entry("a/b/x", mtime=old), entry("f", "dir", mtime=old))), root)
    oci.apply_layer(io.BytesIO(make_tar(entry("a/b/c/d/new"), entry(".wh.a"),
                                        entry("f/new"))), root)
    assert not (root / "a" / "b" / "x").exists() and (root / "a/b/c/d/new").exists()
    for d in ("a", "a/b", "a/b/c", "a/b/c/d", "f"):
        assert os.stat(root / d).st_mtime == old, d


@needs_root
def test_old_gnu_sparse_members_as_gnu_tar_extracts(tmp_path, resolver):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(30 << 20)
        for off in (0, 7 << 20, (30 << 20) - 3):
            f.seek(off)
            f.write(b"abc")
    layer = tmp_path / "layer.tar"
    run("tar", "--sparse", "--format=gnu", "-C", src, "-cf", layer, "sparse")
    ours, gnu = tmp_path / "ours", tmp_path / "gnu"
    ours.mkdir()
    gnu.mkdir()
    with open(layer, "rb") as f:
        oci.apply_layer(f, ours)
    run("tar", "--sparse", "-xpf", layer, "-C", gnu)
    assert_same_tree(ours, gnu)
    assert os.stat(ours / "sparse").st_blocks * 512 <= 64 << 10


def test_clean_name():
    assert oci.clean_name("./etc/passwd") == "etc/passwd"
    assert oci.clean_name("/etc//x/./y/") == "etc/x/y"
    assert oci.clean_name("a/../b") == "b"
    assert oci.clean_name("./") == "" and oci.clean_name("a/..") == ""
    for bad in ("..", "../x", "a/../../x", "/../x"):
        with pytest.raises(oci.UnsafeLayerError):
            oci.clean_name(bad)


# ---- archives: checks and refusals ----
@pytest.fixture
def small(tmp_path):
    """A layout with one image of two small layers, gzip then none."""
    layout = Layout(tmp_path / "layout")
    tars = [make_tar(entry("etc", "dir"), entry("etc/a", data=b"a" * 3000)),
            make_tar(entry("etc/b", data=b"b"), entry("etc/.wh.a"))]
    desc = layout.add(layout.image(tars, compression=["gzip", "none"]), "v1")
    return SimpleNamespace(layout=layout, tars=tars, desc=desc, root=tmp_path / "root")


def _apply_image(location, root, **kw):
    root.mkdir(exist_ok=True)
    with oci.open_archive(location) as archive:
        return apply_all(archive.image(**kw), root)


@needs_root
def test_small_layout_applies(small):
    _apply_image(small.layout.path, small.root)
    assert sorted(os.listdir(small.root / "etc")) == ["b"]


@needs_root
@pytest.mark.parametrize("layer", [0, 1])
def test_a_damaged_blob_is_refused_at_the_end_of_its_stream(small, layer):
    with oci.open_archive(small.layout.path) as archive:
        blob = small.layout.blob_path(archive.image().layers[layer].digest)
    data = bytearray(blob.read_bytes())
    data[-1 - 1030 if layer else len(data) // 2] ^= 0x01       # in a member's data
    blob.write_bytes(bytes(data))
    with pytest.raises(oci.BlobError) as e:
        _apply_image(small.layout.path, small.root)
    assert f"layer {layer + 1} of 2" in str(e.value)


def test_a_truncated_blob_is_refused_before_anything_is_applied(small):
    with oci.open_archive(small.layout.path) as archive:
        blob = small.layout.blob_path(archive.image().layers[1].digest)
    blob.write_bytes(blob.read_bytes()[:-100])
    with pytest.raises(oci.BlobError, match="truncated"):
        oci.open_archive(small.layout.path).image()


def test_a_truncated_archive_tar_is_refused(small, tmp_path):
    full = tar_dir(small.layout.path, tmp_path / "whole.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[:full.stat().st_size // 2])
    with pytest.raises(oci.ImageError):
        with oci.open_archive(cut) as archive:
            image = archive.image()
            for layer in image.layers:
                with layer.open() as stream:
                    while stream.read(1 << 16):
                        pass


@needs_root
def test_a_wrong_diff_id_is_refused(tmp_path):
    layout = Layout(tmp_path / "layout")
    tar = make_tar(entry("f", data=b"x"))
    layout.add(layout.image([tar], diff_ids=[sha(b"something else")]), "v1")
    with pytest.raises(oci.BlobError, match="diff_id"):
        _apply_image(layout.path, tmp_path / "root")


def test_an_unknown_media_type_is_refused(tmp_path):
    layout = Layout(tmp_path / "layout")
    layout.add(layout.image([make_tar(entry("f"))], media_types={
        0: "application/vnd.oci.image.layer.v1.tar+bzip2"}), "v1")
    with pytest.raises(oci.MediaTypeError, match="bzip2"):
        oci.open_archive(layout.path).image()


def test_a_damaged_manifest_or_config_is_refused(small):
    manifest = small.layout.blob_path(small.desc["digest"])
    config_digest = json.loads(manifest.read_bytes())["config"]["digest"]
    config = small.layout.blob_path(config_digest)
    config.write_bytes(config.read_bytes().replace(b"amd64", b"AMD64"))
    with pytest.raises(oci.BlobError, match="config"):
        oci.open_archive(small.layout.path).image()
    manifest.write_bytes(manifest.read_bytes() + b" ")
    with pytest.raises(oci.BlobError, match="manifest"):
        oci.open_archive(small.layout.path).image()


@needs_root
def test_zstd_and_uncompressed_layers(tmp_path):
    layout = Layout(tmp_path / "layout")
    tars = [make_tar(entry("z", data=b"zstd " * 1000)), make_tar(entry("n", data=b"none"))]
    layout.add(layout.image(tars, compression=["zstd", "none"]), "v1")
    _apply_image(layout.path, tmp_path / "root")
    assert (tmp_path / "root" / "z").read_bytes() == b"zstd " * 1000


def test_zstd_damage_is_a_blob_error(tmp_path):
    layout = Layout(tmp_path / "layout")
    tar = make_tar(entry("z", data=random.randbytes(100_000)))
    layout.add(layout.image([tar], compression="zstd"), "v1")
    with oci.open_archive(layout.path) as archive:
        layer = archive.image().layers[0]
        blob = layout.blob_path(layer.digest)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        with pytest.raises(oci.BlobError), layer.open() as stream:
            while stream.read(1 << 16):
                pass


def _multi(tmp_path):
    layout = Layout(tmp_path / "layout")
    amd = layout.image([make_tar(entry("amd64"))], arch="amd64")
    arm = layout.image([make_tar(entry("arm64"))], arch="arm64")
    armv7 = layout.image([make_tar(entry("armv7"))], arch="arm", variant="v7")
    attestation = layout.image([make_tar(entry("att"))], arch="unknown")
    plats = [{"os": "linux", "architecture": "arm64", "variant": "v8"},
             {"os": "linux", "architecture": "arm", "variant": "v7"},
             {"os": "linux", "architecture": "amd64"},
             {"os": "unknown", "architecture": "unknown"}]
    children = []
    for d, p in zip((arm, armv7, amd, attestation), plats):
        children.append(dict(d, platform=p))
    children[-1]["annotations"] = {archive_mod.REFERENCE_TYPE: "attestation-manifest"}
    children.append({"mediaType": "application/vnd.example.unknown+json",
                     "digest": layout.blob(b"{}"), "size": 2})
    inner = layout.index_of(children)
    layout.add(layout.index_of([inner]), "multi",
               **{archive_mod.CONTAINERD_NAME: "docker.io/library/multi:1"})
    return layout


def _only_file(image):
    with image.layers[0].open() as stream:
        with tarfile.open(fileobj=stream, mode="r|") as t:
            names = [m.name for m in t]
        while stream.read(1 << 16):
            pass
    return names


def test_platforms_from_nested_indexes(tmp_path, monkeypatch):
    layout = _multi(tmp_path)
    monkeypatch.setattr(platforms, "host", lambda: oci.Platform("linux", "amd64"))
    with oci.open_archive(layout.path) as archive:
        assert _only_file(archive.image()) == ["amd64"]
        image = archive.image("multi:1", platform="linux/arm64")
        assert _only_file(image) == ["arm64"]
        assert image.refs == ("docker.io/library/multi:1",) and image.tags == ("multi",)
        assert _only_file(archive.image(platform="linux/arm64/v8")) == ["arm64"]
        assert _only_file(archive.image(platform="linux/arm")) == ["armv7"]
        with pytest.raises(oci.ImageError, match="linux/s390x.*offers"):
            archive.image(platform="linux/s390x")
        entry_, = archive.entries()
        assert {str(p) for p in entry_.platforms} == {"linux/arm64/v8", "linux/arm/v7",
                                                      "linux/amd64"}
    monkeypatch.setattr(platforms, "host", lambda: oci.Platform("linux", "arm64"))
    with oci.open_archive(layout.path) as archive:
        assert _only_file(archive.image()) == ["arm64"]


def test_index_json_listing_one_manifest_per_platform(tmp_path, monkeypatch):
    layout = Layout(tmp_path / "layout")
    for arch in ("arm64", "amd64"):
        d = layout.image([make_tar(entry(arch))], arch=arch)
        layout.add(dict(d, platform={"os": "linux", "architecture": arch}), "v1")
    monkeypatch.setattr(platforms, "host", lambda: oci.Platform("linux", "amd64"))
    with oci.open_archive(f"{layout.path}:v1") as archive:
        assert _only_file(archive.image()) == ["amd64"]
        assert _only_file(archive.image(platform="linux/arm64")) == ["arm64"]


def test_several_images_need_a_choice(tmp_path):
    layout = Layout(tmp_path / "layout")
    for tag in ("v1", "v2"):
        layout.add(layout.image([make_tar(entry(tag))]), tag)
    layout.add(layout.index[0], None, **{archive_mod.CONTAINERD_NAME: "ghcr.io/x/y:first"})
    with oci.open_archive(layout.path) as archive:
        with pytest.raises(oci.ImageError, match="holds 2 images: .*v1.*v2"):
            archive.image()
        assert _only_file(archive.image("v2")) == ["v2"]
        image = archive.image("ghcr.io/x/y:first")
        assert _only_file(image) == ["v1"]
        assert image.refs == ("ghcr.io/x/y:first",) and image.tags == ("v1",)
        with pytest.raises(oci.ImageError, match="no image 'v3'"):
            archive.image("v3")
        digest = layout.index[1]["digest"]
        assert _only_file(archive.image(digest)) == ["v2"]
    with oci.open_archive(f"{layout.path}:v1") as archive:
        assert _only_file(archive.image()) == ["v1"]
    with oci.open_archive(f"oci:{layout.path}:v2") as archive:
        assert _only_file(archive.image()) == ["v2"]


def test_legacy_docker_save_checks(tmp_path):
    layout = Layout(tmp_path / "layout")
    layout.add(layout.image([make_tar(entry("f", data=b"legacy"))]), "v1")
    good = _docker_legacy(layout.path, "v1", tmp_path / "good.tar", "debian:12")
    with oci.open_archive(good) as archive:
        assert archive.form == "docker-save"
        image = archive.image("debian:12")
        assert image.refs == ("docker.io/library/debian:12",)
        assert image.manifest_digest is None and image.layers[0].digest is None
        assert archive.image("docker.io/library/debian:12") == image
    # a config whose sha256 is not its name; a layer.tar that is not its diff_id
    for damage, match in (("config", "config's sha256"), ("layer", "diff_id")):
        bad = tmp_path / f"bad-{damage}.tar"
        with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
            for m in src.getmembers():
                data = src.extractfile(m).read()
                if damage == "config" and m.name.endswith(".json") and len(m.name) == 69:
                    data = data.replace(b"amd64", b"AMD64")
                if damage == "layer" and m.name.endswith("layer.tar"):
                    data = data.replace(b"legacy", b"LEGACY")
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
        with pytest.raises(oci.BlobError, match=match):
            with oci.open_archive(bad) as archive:
                for layer in archive.image().layers:
                    with layer.open() as stream:
                        while stream.read(1 << 16):
                            pass


def test_legacy_layer_tar_may_be_a_symlink_member(tmp_path):
    """docker save (and skopeo) store a layer once and link the others."""
    layer = make_tar(entry("f", data=b"shared"))
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [sha(layer), sha(layer)]}}).encode()
    name = sha(config)[7:] + ".json"
    files = {"aaa/layer.tar": layer, name: config, "manifest.json": json.dumps(
        [{"Config": name, "RepoTags": ["x:1"], "Layers": ["aaa/layer.tar", "bbb/layer.tar"]}]
    ).encode()}
    out = tmp_path / "save.tar"
    _write_tar(out, files)
    with tarfile.open(out, "a") as t:
        link = tarfile.TarInfo("bbb/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../aaa/layer.tar"
        t.addfile(link)
    with oci.open_archive(out) as archive:
        image = archive.image()
        assert [l.size for l in image.layers] == [len(layer)] * 2
        for l in image.layers:
            with l.open() as stream:
                assert stream.read(1 << 20) == layer and stream.read(10) == b""


@pytest.mark.parametrize("where", ["index", "manifest", "config"])
def test_malformed_json_is_an_image_error(tmp_path, where):
    """Every wrong shape of index.json, a manifest or a config gets an
    ImageError, never another exception."""
    bad_values = [None, 1, "x", [], {}, [1], {"a": 1}, True, -1, [None], {"": []}]
    count = 0
    for key_path in {"index": [("manifests",), ("manifests", 0), ("manifests", 0, "digest"),
                               ("manifests", 0, "size"), ("manifests", 0, "annotations")],
                     "manifest": [("config",), ("layers",), ("layers", 0),
                                  ("layers", 0, "mediaType"), ("config", "digest"),
                                  ("config", "size"), ("mediaType",)],
                     "config": [("rootfs",), ("rootfs", "diff_ids"), ("rootfs", "type"),
                                ("rootfs", "diff_ids", 0), ("os",), ("architecture",)]}[where]:
        for value in bad_values:
            count += 1
            layout = Layout(tmp_path / f"l{count}")
            desc = layout.image([make_tar(entry("f"))])
            manifest = json.loads(layout.blob_path(desc["digest"]).read_bytes())
            config = json.loads(layout.blob_path(manifest["config"]["digest"]).read_bytes())
            index = {"schemaVersion": 2, "manifests": [dict(desc)]}
            doc = {"index": index, "manifest": manifest, "config": config}[where]
            obj = doc
            for k in key_path[:-1]:
                obj = obj[k]
            obj[key_path[-1]] = value
            if where == "config":
                data = json.dumps(config).encode()
                manifest["config"].update(digest=layout.blob(data), size=len(data))
            if where in ("config", "manifest"):
                data = json.dumps(manifest).encode()
                index["manifests"][0].update(digest=layout.blob(data), size=len(data))
            (layout.path / "index.json").write_text(json.dumps(index))
            try:
                with oci.open_archive(layout.path) as archive:
                    archive.entries()
                    archive.image(platform="linux/amd64")
            except oci.ImageError:
                pass


@needs_root
def test_damaged_layers_never_escape_as_other_errors(tmp_path):
    """Random bytes flipped in a layer tar: refused with a cowblock error or
    applied, never a traceback of another kind."""
    from cowblock.errors import CowblockError
    base = make_tar(entry("d", "dir"), entry("d/f", data=b"x" * 700, xattrs={"user.a": b"1"}),
                    entry("d/l", "sym", target="f"), entry("d/h", "link", target="d/f"),
                    entry("d/n", "chr", dev=(1, 3)), entry("d/.wh.gone"),
                    entry("long/" + "n" * 150 + "/x", data=b"y"))
    rnd = random.Random(7)
    for i in range(150):
        data = bytearray(base)
        for _ in range(rnd.randrange(1, 6)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        root = tmp_path / f"r{i}"
        root.mkdir()
        try:
            oci.apply_layer(io.BytesIO(bytes(data)), root, max_bytes=1 << 20)
        except CowblockError:
            pass


def test_not_an_archive(tmp_path):
    with pytest.raises(oci.ImageError, match="no such file"):
        oci.open_archive(tmp_path / "missing.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(oci.ImageError, match="not an OCI image layout"):
        oci.open_archive(tmp_path / "empty")
    plain = tmp_path / "plain.tar"
    _write_tar(plain, {"hello.txt": b"hi"})
    with pytest.raises(oci.ImageError, match="not an image archive"):
        oci.open_archive(plain)
    gz = tmp_path / "image.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(oci.ImageError, match="gunzip"):
        oci.open_archive(gz)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x01" * 5000)
    with pytest.raises(oci.ImageError, match="not a tar"):
        oci.open_archive(junk)


def test_hostile_archive_members_are_refused(tmp_path):
    """A manifest.json naming a path outside, a member linking outside."""
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        data = json.dumps([{"Config": "../../etc/passwd", "RepoTags": ["x:1"],
                            "Layers": ["l/layer.tar"]}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("l/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        t.addfile(link)
    with pytest.raises(oci.ImageError, match="missing"):
        oci.open_archive(evil).image()
    layout = Layout(tmp_path / "layout")
    layout.add({"mediaType": archive_mod.OCI_MANIFEST, "digest": "sha256:../../etc/passwd",
                "size": 10}, "v1")
    with pytest.raises(oci.ImageError, match="not sha256"):
        oci.open_archive(layout.path).image()


# ---- references and names ----
@pytest.mark.parametrize("text, normal", [
    ("debian", "docker.io/library/debian:latest"),
    ("debian:12", "docker.io/library/debian:12"),
    ("library/debian", "docker.io/library/debian:latest"),
    ("user/app", "docker.io/user/app:latest"),
    ("index.docker.io/user/app:1", "docker.io/user/app:1"),
    ("ghcr.io/x/y:tag", "ghcr.io/x/y:tag"),
    ("localhost/img", "localhost/img:latest"),
    ("localhost:5000/a/b:c", "localhost:5000/a/b:c"),
    ("Registry/x", "Registry/x:latest"),
    ("debian@sha256:" + "a" * 64, "docker.io/library/debian@sha256:" + "a" * 64),
    ("debian:12@sha256:" + "b" * 64, "docker.io/library/debian:12@sha256:" + "b" * 64),
    ("abc__d-e/f.g", "docker.io/abc__d-e/f.g:latest"),
])
def test_references_normalise_as_docker_does(text, normal):
    assert refs.normalize(text) == normal
    assert refs.normalize(refs.parse(text).familiar()) == normal


@pytest.mark.parametrize("bad", ["", "Debian", "debian:", "a//b", "-a", "a:b:c",
                                 "debian@sha256:short", "a" * 64, "x/" + "y" * 260,
                                 "debian:-tag", "ghcr.io/x/Y"])
def test_bad_references_refused(bad):
    with pytest.raises(oci.ImageError, match="not valid"):
        refs.parse(bad)


def test_device_stems_are_valid_stable_and_distinct():
    from cowblock.catalog import NAME_RE
    texts = ["debian", "debian:12", "docker.io/library/debian:12", "user/debian:12",
             "ghcr.io/user/debian:12", "localhost:5000/debian:12",
             "debian@sha256:" + "c" * 64, "debian:12@sha256:" + "c" * 64,
             "r.example.com/" + "/".join(["long-component"] * 10) + ":v1",
             "r.example.com/" + "/".join(["long-component"] * 10) + ":v2"]
    stems = {}
    for t in texts:
        stem = oci.device_stem(t)
        assert NAME_RE.match(stem), stem
        assert stem == oci.device_stem(refs.normalize(t))
        stems.setdefault(stem, set()).add(refs.normalize(t))
    assert all(len(v) == 1 for v in stems.values())
    assert len(stems) == len({refs.normalize(t) for t in texts})
    assert oci.device_stem("debian") == "debian:latest"
    assert oci.device_stem("ghcr.io/x/y:tag") == "ghcr.io+x+y:tag"
    assert len(oci.device_stem(texts[-1])) == 100
    assert NAME_RE.match(oci.device_stem(texts[-1], max_length=128))


def test_platform_names():
    assert platforms.parse("linux/arm64/v8").normalized() == oci.Platform("linux", "arm64")
    assert platforms.parse("arm").normalized() == oci.Platform("linux", "arm", "v7")
    assert oci.Platform("linux", "x86_64").normalized() == oci.Platform("linux", "amd64")
    assert platforms.parse("linux/arm64").matches(oci.Platform("linux", "arm64", "v8"))
    assert not platforms.parse("linux/arm/v6").matches(oci.Platform("linux", "arm", "v7"))
    host = platforms.host()
    assert host.os == "linux" and host.architecture in ("amd64", "arm64", "arm", "386",
                                                        "ppc64le", "s390x", "riscv64")
    for bad in ("", "linux/", "a/b/c/d"):
        with pytest.raises(oci.ImageError):
            platforms.parse(bad)


def test_the_resolver_probe_and_walk_agree(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    os.symlink("a/b", tmp_path / "ln")
    os.symlink("/etc", tmp_path / "abs")
    results = []
    for use in ([True] if resolve.openat2_works() else []) + [False]:
        resolve.USE_OPENAT2 = use
        try:
            root = resolve.Root(tmp_path)
            fd, canonical = root.open_dir("ln")
            os.close(fd)
            with pytest.raises(resolve.Escape):
                root.open_dir("abs")
            with pytest.raises(OSError) as e:
                root.open_dir("ln", follow=False)
            assert e.value.errno == errno.ELOOP
            root.close()
            results.append(canonical)
        finally:
            resolve.USE_OPENAT2 = None
    assert set(results) == {"a/b"}


def test_apply_module_defaults(tmp_path):
    max_bytes, max_entries = apply_mod.default_limits(tmp_path)
    assert max_bytes >= apply_mod.MIN_MAX_BYTES and max_entries == apply_mod.DEFAULT_MAX_ENTRIES
