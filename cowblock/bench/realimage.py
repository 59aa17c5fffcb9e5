"""A real container image for the benchmarks, and its layers unpacked the
way overlayfs stores an image.

minbase_image() builds Debian's minbase (`mmdebstrap --variant=minbase`,
from the archive apt uses) as an OCI layout of three layers, made by umoci
the way an image build makes them, each the diff of a real change:

  1  the minbase rootfs                                 (about 170 MB)
  2  `mmdebstrap --include=ca-certificates,procps,less`: packages installed
     by apt/dpkg, so new files and the changed dpkg database, ld.so cache
     and logs of a real install
  3  the clean-up a slim image ends with: documentation, manual pages,
     info pages and translations deleted, /var/log/apt removed and made
     anew (`rm -rf DIR && mkdir DIR`); umoci writes a `.wh.` whiteout for
     each deleted entry (it writes no opaque directories)

Tags: "v1" (layers 1-3), "v2" (layers 1-2 and one small layer: a second
image sharing the two lower layers) and "prime" (one tiny layer; loading it
first makes the pool's empty filesystem, a once-per-pool cost).  The layout
is cached under /var/tmp (CACHE) so reruns do not rebuild it.

small_image() makes an image of the same shape from generated files, for
tests.  unpack_for_overlay() untars an image's layers into one directory
each, with OCI whiteouts turned into overlayfs' (a 0/0 character device for
`.wh.NAME`, the trusted.overlay.opaque xattr for `.wh..wh..opq`).
"""
import contextlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import urllib.request

CACHE = "/var/tmp/cowblock-bench-image"
RECIPE = "minbase-3layer-1"     # change it when the recipe changes: the cache is rebuilt
SUITE = "bookworm"
PACKAGES = ("ca-certificates", "procps", "less")
SLIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale")
TAGS = {"first": "v1", "second": "v2", "prime": "prime"}
# What a rootfs of the image holds (True) or no longer holds (False): the
# checks that the layers were applied, whiteouts included.
MINBASE_PROBES = {"bin/sh": True, "usr/bin/ps": True, "etc/ssl/certs/ca-certificates.crt": True,
                  "usr/share/doc/dpkg": False, "usr/share/man/man1": False,
                  "var/log/apt/history.log": False}
SMALL_PROBES = {"etc/os-release": True, "usr/bin/extra": True, "usr/share/doc/pkg": False,
                "var/log/apt/history.log": False}
WHITEOUT, WHITEOUT_META, OPAQUE = ".wh.", ".wh..wh.", ".wh..wh..opq"
TAR_OPTIONS = ("-p", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sparse")


class Unavailable(Exception):
    """The image cannot be made here; the message says why."""


def _run(*argv, cwd=None):
    try:
        subprocess.run([str(a) for a in argv], check=True, capture_output=True, cwd=cwd)
    except FileNotFoundError:
        raise Unavailable(f"{argv[0]} is not installed") from None
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise Unavailable(f"{' '.join(map(str, argv[:3]))} failed: {' / '.join(err)}") from None


class Image:
    """An OCI layout on disk and what was made into it."""

    def __init__(self, layout, info, probes):
        self.layout, self.info, self.probes = layout, info, probes

    def ref(self, which):
        return f"{self.layout}:{TAGS[which]}"

    def layers(self, which):
        """The layer blobs of tag WHICH, bottom first: (path, media type)."""
        return layer_blobs(self.layout, TAGS[which])


def layer_blobs(layout, tag):
    def blob(digest):
        return os.path.join(layout, "blobs", *digest.split(":", 1))
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    desc = next(d for d in index["manifests"]
                if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    with open(blob(desc["digest"])) as f:
        manifest = json.load(f)
    return [(blob(la["digest"]), la["mediaType"]) for la in manifest["layers"]]


def cached(cache=CACHE):
    """Whether minbase_image() is built already."""
    return _cached(cache) is not None


def why_not():
    """Why minbase_image() cannot build here (None when it can, or when the
    image is cached)."""
    if _cached(CACHE):
        return None
    for tool, package in (("mmdebstrap", "mmdebstrap"), ("umoci", "umoci")):
        if not shutil.which(tool):
            return f"{tool} is not installed (Debian package {package})"
    if os.geteuid() != 0:
        return "building the Debian image needs root (mmdebstrap, umoci unpack)"
    mirror = apt_mirror()
    try:
        with urllib.request.urlopen(f"{mirror}/dists/{SUITE}/InRelease", timeout=10) as r:
            r.read(1)
    except OSError as e:
        return f"the Debian archive apt uses ({mirror}) is not reachable: {e}"
    return None


def apt_mirror():
    """The first Debian archive of the host's apt sources (deb.debian.org if none)."""
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        with contextlib.suppress(OSError):
            with open(path) as f:
                for line in f:
                    words = line.split()
                    if words[:1] == ["URIs:"] and "security" not in words[1]:
                        return words[1].rstrip("/")
                    if words[:1] == ["deb"] and "security" not in line:
                        return next(w for w in words[1:] if "://" in w).rstrip("/")
    return "http://deb.debian.org/debian"


def _cached(cache):
    path = os.path.join(cache, RECIPE, "image.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return Image(os.path.join(cache, RECIPE, "layout"), json.load(f), MINBASE_PROBES)


def minbase_image(cache=CACHE, progress=lambda m: None):
    """The Debian minbase image (built once, then found in CACHE); raises
    Unavailable with the reason when it cannot be built here."""
    found = _cached(cache)
    if found:
        return found
    why = why_not()
    if why:
        raise Unavailable(why)
    os.makedirs(cache, exist_ok=True)
    work = tempfile.mkdtemp(prefix="building-", dir=cache)
    try:
        base, plus = os.path.join(work, "base"), os.path.join(work, "plus")
        progress(f"building the image: mmdebstrap --variant=minbase {SUITE}")
        _run("mmdebstrap", "--variant=minbase", "--quiet", SUITE, base)
        progress(f"building the image: mmdebstrap --include={','.join(PACKAGES)}")
        _run("mmdebstrap", "--variant=minbase", "--quiet", f"--include={','.join(PACKAGES)}",
             SUITE, plus)
        layout = os.path.join(work, "layout")
        progress("building the image: umoci layers")
        info = _make_layout(layout, work, [lambda rootfs: _replace_tree(rootfs, base),
                                           lambda rootfs: _replace_tree(rootfs, plus),
                                           _slim])
        info.update(recipe=RECIPE, source=f"mmdebstrap --variant=minbase {SUITE}",
                    packages=list(PACKAGES), slimmed=list(SLIM),
                    rootfs_bytes=_tree_bytes(plus))
        for tree in (base, plus):
            shutil.rmtree(tree)
        with open(os.path.join(work, "image.json"), "w") as f:
            json.dump(info, f, indent=2)
        final = os.path.join(cache, RECIPE)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(work, final)
        return _cached(cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def small_image(work):
    """An image of minbase_image()'s shape from generated files, in seconds:
    a base tree, a layer adding and changing files, a layer deleting some
    (whiteouts) and emptying a directory anew (an opaque one)."""
    def base(rootfs):
        for d in ("etc", "usr/share/doc/pkg", "usr/bin", "var/log/apt"):
            os.makedirs(os.path.join(rootfs, d), exist_ok=True)
        _write(rootfs, "etc/os-release", "ID=small\n")
        _write(rootfs, "usr/share/doc/pkg/README", "docs\n" * 100)
        _write(rootfs, "usr/bin/tool", "#!/bin/sh\necho tool\n", 0o755)
        _write(rootfs, "var/log/apt/history.log", "base\n")
        with open(os.path.join(rootfs, "usr/bin/blob"), "wb") as f:
            f.write(os.urandom(1 << 20))

    def install(rootfs):
        _write(rootfs, "usr/bin/extra", "#!/bin/sh\necho extra\n", 0o755)
        _write(rootfs, "var/log/apt/history.log", "base\ninstall\n")
        _write(rootfs, "etc/os-release", "ID=small\nVERSION=2\n")

    layout = os.path.join(work, "layout")
    return Image(layout, dict(_make_layout(layout, work, [base, install, _slim]),
                              source="generated"), SMALL_PROBES)


def _write(root, rel, text, mode=0o644):
    path = os.path.join(root, rel)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _make_layout(layout, work, changes):
    """An OCI layout whose tag v1 has one layer per change (each a function
    changing the rootfs, diffed by `umoci repack`), v2 the first two and a
    small one, prime one tiny layer."""
    bundle = os.path.join(work, "bundle")
    _run("umoci", "init", "--layout", layout)
    _run("umoci", "new", "--image", f"{layout}:empty")
    _run("umoci", "unpack", "--image", f"{layout}:empty", bundle)
    rootfs = os.path.join(bundle, "rootfs")
    for i, change in enumerate(changes, 1):
        change(rootfs)
        _run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:layer{i}", bundle)
    _run("umoci", "tag", "--image", f"{layout}:layer{len(changes)}", TAGS["first"])
    small = os.path.join(work, "small")
    os.makedirs(os.path.join(small, "etc"))
    _write(small, "etc/app.conf", "a second image\n")
    small_tar = os.path.join(work, "small.tar")
    _run("tar", "--numeric-owner", "--owner=0", "--group=0", "-C", small, "-cf", small_tar, ".")
    _run("umoci", "raw", "add-layer", "--image", f"{layout}:layer2", "--tag", TAGS["second"],
         small_tar)
    _run("umoci", "raw", "add-layer", "--image", f"{layout}:empty", "--tag", TAGS["prime"],
         small_tar)
    shutil.rmtree(bundle)
    blobs = layer_blobs(layout, TAGS["first"])
    return {"layers": [{"blob_bytes": os.path.getsize(p), "media_type": m} for p, m in blobs],
            "second_extra_blob_bytes": os.path.getsize(layer_blobs(layout, TAGS["second"])[-1][0])}


def _replace_tree(rootfs, tree):
    """Make ROOTFS hold what TREE holds (cp -a keeps owners, modes, times,
    xattrs and hard links), so umoci's diff is the change between them."""
    for name in os.listdir(rootfs):
        path = os.path.join(rootfs, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    _run("cp", "-a", f"{tree}/.", rootfs)


def _slim(rootfs):
    for rel in SLIM:
        path = os.path.join(rootfs, rel)
        if os.path.isdir(path):
            for name in os.listdir(path):
                sub = os.path.join(path, name)
                (shutil.rmtree if os.path.isdir(sub) and not os.path.islink(sub)
                 else os.unlink)(sub)
    logs = os.path.join(rootfs, "var", "log", "apt")
    if os.path.isdir(logs):
        st = os.stat(logs)
        shutil.rmtree(logs)
        os.mkdir(logs, st.st_mode & 0o7777)


def _tree_bytes(root):
    total = 0
    for d, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(d, f)).st_size
    return total


# ---- overlayfs' side ----
def untar_layer(blob, media_type, directory):
    """`tar -x` of one layer blob into DIRECTORY (made if missing), then its
    OCI whiteouts turned into overlayfs' whiteouts."""
    os.makedirs(directory, exist_ok=True)
    if media_type.endswith(("+gzip", ".tar.gzip")):      # OCI's, Docker's
        compress = ["-z"]
    elif media_type.endswith("+zstd"):
        compress = ["--zstd"]
    elif media_type.endswith(".tar"):
        compress = []
    else:
        raise ValueError(f"layer media type {media_type!r} is not a tar")
    subprocess.run(["tar", "-x", *compress, *TAR_OPTIONS, "-f", blob, "-C", directory],
                   check=True, capture_output=True)
    return overlay_whiteouts(directory)


def overlay_whiteouts(directory):
    """Turn the OCI whiteouts under DIRECTORY into overlayfs' own:
    `.wh.NAME` into a character device 0/0 named NAME, `.wh..wh..opq` into
    the trusted.overlay.opaque=y xattr of its directory.  Returns how many."""
    n = 0
    for root, dirs, files in os.walk(directory):
        for name in files:
            if not name.startswith(WHITEOUT):
                continue
            os.unlink(os.path.join(root, name))
            if name == OPAQUE:
                os.setxattr(root, "trusted.overlay.opaque", b"y")
            elif name.startswith(WHITEOUT_META):
                continue        # aufs' own (.wh..wh.plnk ...): nothing for overlayfs
            else:
                os.mknod(os.path.join(root, name[len(WHITEOUT):]), stat.S_IFCHR | 0o000,
                         os.makedev(0, 0))
            n += 1
    return n


def unpack_for_overlay(image, which, directory):
    """Every layer of tag WHICH untarred into DIRECTORY/0, /1, ... (bottom
    first, whiteouts made overlayfs'); returns those directories."""
    dirs = []
    for i, (blob, media_type) in enumerate(image.layers(which)):
        dirs.append(os.path.join(directory, str(i)))
        untar_layer(blob, media_type, dirs[-1])
    return dirs


def lowerdir_option(dirs):
    """overlayfs' lowerdir= value of layer directories given bottom first."""
    return ":".join(reversed(dirs))
