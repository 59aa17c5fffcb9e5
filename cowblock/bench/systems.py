"""The systems `cowblock bench` compares, each behind one small interface.

A System builds an image from a directory tree, starts containers from it
(writable roots), mounts a container's filesystem, and reports the bytes it
allocated on the host (st_blocks, the same way for everyone).  Where a
system cannot run here, available() says why and the suite reports it as
skipped; nothing stands in for it.

- cowblock: the tree as an ext4 image (mkfs.ext4 -d) imported into a pool,
  read-only; containers are writable snapshots; mounted by the pool's
  daemon (its device file, a loop device), as `cowblock mount` does.
- overlayfs: the kernel's union: the tree is the lower directory, each
  container an upper and work directory (mounted with -o volatile when asked
  for no durability).
- fuse-overlayfs: the same union in FUSE, where installed.
- qcow2: the same ext4 image as a qcow2 base, containers as external overlays
  (backing files), mounted through qemu-nbd, nbdfuse and a loop device.

Each loads a real OCI image (cowblock.bench.realimage) its own way:
prepare_image() does what a system does once (cowblock: its empty
filesystem, by loading a one-file image; qcow2: an empty ext4 base), then
load_image() is the timed part, after which containers start from the
image; unload_image() takes it away again.
- cowblock: `image load` through the pool's daemon (one read-only ext4
  snapshot per layer).
- overlayfs, fuse-overlayfs: every layer untarred into a lower directory of
  its own, whiteouts made overlayfs', then syncfs.
- qcow2: one overlay per layer, each mounted and the layer applied by the
  OCI rules (cowblock.oci, the applier cowblock uses), synced and unmounted.
"""
import contextlib
import os
import shutil
import subprocess
import threading

from .. import oci
from ..attach import blockdev, nbdfuse
from ..control import client
from ..layers import MKFS_OPTIONS, syncfs
from ..pool import Pool
from ..transfer import import_file
from . import coldcache, realimage

IMAGE_FS_SIZE = 1 << 30     # the filesystem of the real image's layers (block systems)
IMAGE_REF = "cowblock-bench/image"


def missing_capabilities():
    return blockdev.missing_capabilities() + nbdfuse.missing()


def attach_export(uri, directory, fuse_dir):
    """Mount the filesystem of an NBD export (qemu-nbd's) on directory:
    nbdfuse, a loop device, mount.  Returns what detach_export() undoes."""
    os.makedirs(directory, exist_ok=True)
    f = nbdfuse.NbdfuseFile(uri, fuse_dir)
    try:
        loop = blockdev.loop_attach(f.path, False)
        try:
            blockdev.mount(loop, directory, blockdev.fs_type(loop), False)
        except BaseException:
            blockdev.loop_detach(loop)
            raise
    except BaseException:
        f.close()
        raise
    return f, loop


def detach_export(directory, f, loop):
    blockdev.umount(directory)
    blockdev.loop_detach(loop)
    f.close()

MiB = 1 << 20


def allocated(*paths):
    """Bytes allocated on the host under paths (st_blocks), files and trees."""
    total = 0
    for p in paths:
        if os.path.isfile(p):
            total += os.stat(p).st_blocks * 512
        elif os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                for f in files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def make_ext4_image(tree, path, size):
    """A raw ext4 image of size bytes holding the directory tree."""
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, path, str(size // 1024)], check=True,
                   capture_output=True)


def _can_overlay():
    if os.geteuid() != 0:
        return "mounting overlayfs needs root here"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "the kernel has no overlayfs"
    return None


class System:
    name = "?"
    cold_caveat = None   # why its "cold" reads may be warm on the host

    def __init__(self, root):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.mounted = []

    def available(self):
        return None

    def prepare_image(self, image):
        """What the system does once before it loads images (untimed)."""

    def flush(self, m):
        """Push what was written in mount m down to the system's storage."""
        os.sync()

    def page_out(self):
        """Before the page cache is dropped: make the system's server give back
        the pages it keeps mapped (coldcache.page_out).  Sets cold_caveat when
        it cannot."""

    def top_state(self):
        """What new containers start from (restore it with set_top_state)."""
        return getattr(self, "top", None)

    def set_top_state(self, state):
        self.top = state

    def close(self):
        for m in reversed(self.mounted):
            with contextlib.suppress(Exception):
                self.unmount(m)
        self.mounted = []


def _flush_block_mount(device_file):
    """sync the filesystem, then fsync the FUSE file under the loop device:
    FUSE's page cache is not flushed by sync alone."""
    os.sync()
    fd = os.open(device_file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Cowblock(System):
    name = "cowblock"

    def flush(self, m):
        _flush_block_mount(m["file"])

    def available(self):
        why = missing_capabilities()
        return "; ".join(why) if why else None

    def build_image(self, tree, image_raw, size):
        path = os.path.join(self.root, "pool")
        with Pool.create(path, 4 * size + 1024 * MiB, 65536) as pool:
            import_file(pool, "image", image_raw)
            pool.set_read_only("image", True)
        self.pool, _ = client.daemon(path)   # the pool's daemon, as `cowblock mount` uses it

    def page_out(self):
        if getattr(self, "pool", None) is None or self.cold_caveat:
            return
        pool_dir = os.path.join(self.root, "pool")
        why = coldcache.page_out(self.pool.status()["pid"],
                                 [os.path.join(pool_dir, "data"), os.path.join(pool_dir, "metadata")])
        if why:
            self.cold_caveat = f"the daemon's mapped pages stay cached ({why})"

    def mount(self, name, directory):
        m = self.pool.mount(name, os.path.abspath(directory))
        self.mounted.append(m)
        return m

    def unmount(self, m):
        self.pool.umount(m["dir"])
        self.mounted.remove(m)

    def remove_container(self, name):
        self.pool.delete(name)

    def layer_from_container(self, name, layer):
        self.pool.snapshot(name, layer, read_only=True)

    def add_layer(self, layer, scratch_offset):
        """A new top image layer holding 4 KiB of its own past the filesystem."""
        below = getattr(self, "top", None) or "image"
        dev = self.pool.snapshot(below, layer)
        dev.pwrite(os.urandom(4096), scratch_offset)
        self.pool.set_read_only(layer, True)
        self.top = layer

    def new_container(self, name):
        self.pool.snapshot(getattr(self, "top", None) or "image", name)

    def prepare_image(self, image):
        self.pool.image_load(image.ref("prime"), ref=IMAGE_REF + "-prime", size=IMAGE_FS_SIZE,
                             timeout=600)

    def load_image(self, image):
        out = self.pool.image_load(image.ref("first"), ref=IMAGE_REF, size=IMAGE_FS_SIZE,
                                   timeout=1800)
        self.top = out["top"]

    def unload_image(self):
        self.pool.image_rm([IMAGE_REF])
        self.top = None

    def space(self):
        # Blocks freed by removed containers keep their host space until a
        # trim (thin_trim's job); trim so st_blocks shows what is in use.
        self.pool.commit()
        self.pool.trim()
        return allocated(os.path.join(self.root, "pool"))

    def close(self):
        super().close()
        if getattr(self, "pool", None):
            self.pool.stop(force=True)
            self.pool.close()


class Overlay(System):
    name = "overlayfs"
    fuse = False

    def __init__(self, root, volatile=True):
        super().__init__(root)
        self.volatile = volatile

    def available(self):
        if self.fuse:
            if not shutil.which("fuse-overlayfs"):
                return "fuse-overlayfs is not installed (Debian package fuse-overlayfs)"
            return None if os.path.exists("/dev/fuse") else "/dev/fuse is missing"
        return _can_overlay()

    def build_image(self, tree, image_raw, size):
        self.lower = os.path.join(self.root, "lower")
        subprocess.run(["cp", "-a", tree, self.lower], check=True, capture_output=True)
        self.layers = [self.lower]

    def new_container(self, name):
        for d in ("upper", "work"):
            os.makedirs(os.path.join(self.root, name, d), exist_ok=True)

    def top_state(self):
        return list(self.layers)

    def set_top_state(self, state):
        self.layers = list(state)

    def mount(self, name, directory):
        os.makedirs(directory, exist_ok=True)
        # Paths relative to the system's root: mount options must fit a page,
        # and 128 absolute lowerdirs do not.
        rel = [os.path.relpath(p, self.root) for p in reversed(self.layers)]  # top layer first
        opts = f"lowerdir={':'.join(rel)},upperdir={name}/upper,workdir={name}/work"
        if self.fuse:
            argv = ["fuse-overlayfs", "-o", opts, os.path.abspath(directory)]
        else:
            argv = ["mount", "-t", "overlay", "overlay", "-o",
                    opts + (",volatile" if self.volatile else ""), os.path.abspath(directory)]
        subprocess.run(argv, check=True, capture_output=True, cwd=self.root)
        m = (directory,)
        self.mounted.append(m)
        return m

    def unmount(self, m):
        argv = ["fusermount3", "-u", m[0]] if self.fuse else ["umount", m[0]]
        subprocess.run(argv, check=True, capture_output=True)
        self.mounted.remove(m)

    def remove_container(self, name):
        shutil.rmtree(os.path.join(self.root, name))

    def layer_from_container(self, name, layer):
        # cp -a: an upper directory holds whiteouts (character devices) too
        dest = os.path.join(self.root, "layers", layer)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        subprocess.run(["cp", "-a", os.path.join(self.root, name, "upper"), dest], check=True,
                       capture_output=True)
        self.layers.append(dest)

    def load_image(self, image):
        where = os.path.join(self.root, "image-layers")
        self.layers = realimage.unpack_for_overlay(image, "first", where)
        syncfs(where)

    def unload_image(self):
        shutil.rmtree(os.path.join(self.root, "image-layers"))
        self.layers = []

    def add_layer(self, layer, scratch_offset):
        dest = os.path.join(self.root, "layers", layer)
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, f"{layer}.txt"), "w") as f:
            f.write(f"{layer}\n")
        self.layers.append(dest)

    def space(self):
        return allocated(self.root)


class FuseOverlay(Overlay):
    name = "fuse-overlayfs"
    fuse = True


class Qcow2(System):
    name = "qcow2"

    def flush(self, m):
        _flush_block_mount(m[2].path)

    def available(self):
        for tool in ("qemu-img", "qemu-nbd"):
            if not shutil.which(tool):
                return f"{tool} is not installed (Debian package qemu-utils)"
        why = missing_capabilities()
        return "; ".join(why) if why else None

    def build_image(self, tree, image_raw, size):
        self.base = os.path.join(self.root, "base.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", image_raw, self.base],
                       check=True, capture_output=True)
        self.top = self.base
        self.servers = {}

    def _overlay(self, name):
        return os.path.join(self.root, f"{name}.qcow2")

    def new_container(self, name):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.top, "-F", "qcow2",
                        self._overlay(name)], check=True, capture_output=True)

    def mount(self, name, directory):
        sock = os.path.join(self.root, f"{name}.sock")
        proc = subprocess.Popen(["qemu-nbd", "-t", "-k", sock, "-f", "qcow2", "--cache=writeback",
                                 "--aio=threads", self._overlay(name)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(400):
            if os.path.exists(sock):
                break
            threading.Event().wait(0.025)
        self.servers[name] = proc
        f, loop = attach_export(f"nbd+unix:///?socket={sock}", directory,
                                os.path.join(self.root, f"fuse-{name}"))
        m = (directory, loop, f, name)
        self.mounted.append(m)
        return m

    def unmount(self, m):
        detach_export(m[0], m[2], m[1])
        proc = self.servers.pop(m[3])
        proc.terminate()
        proc.wait()
        self.mounted.remove(m)

    def remove_container(self, name):
        os.unlink(self._overlay(name))

    def prepare_image(self, image):
        raw = os.path.join(self.root, "image-empty.raw")
        with open(raw, "wb") as f:
            f.truncate(IMAGE_FS_SIZE)
        subprocess.run(["mkfs.ext4", "-q", "-F", *MKFS_OPTIONS, raw], check=True,
                       capture_output=True)
        self.image_base = os.path.join(self.root, "image-empty.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, self.image_base],
                       check=True, capture_output=True)
        os.unlink(raw)

    def load_image(self, image):
        self.top, self.image_layers = self.image_base, []
        with oci.open_archive(image.ref("first")) as archive:
            for i, layer in enumerate(archive.image().layers):
                name = f"image-layer{i}"
                self.new_container(name)
                directory = os.path.join(self.root, f"mnt-{name}")
                m = self.mount(name, directory)
                try:
                    with layer.open() as stream:
                        oci.apply_layer(stream, directory, label=layer.label)
                    syncfs(directory)
                finally:
                    self.unmount(m)
                os.rmdir(directory)
                self.image_layers.append(self._overlay(name))
                self.top = self.image_layers[-1]
        fd = os.open(self.top, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def unload_image(self):
        for path in self.image_layers:
            os.unlink(path)
        self.top, self.image_layers = self.image_base, []

    def add_layer(self, layer, scratch_offset):
        self.new_container(layer)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {scratch_offset} 4k",
                        self._overlay(layer)], check=True, capture_output=True)
        self.top = self._overlay(layer)

    def layer_from_container(self, name, layer):
        dest = self._overlay(layer)  # a copy: the container goes on, as with the others
        shutil.copyfile(self._overlay(name), dest)
        self.top = dest

    def space(self):
        return allocated(self.root)


def all_systems(root, volatile=True):
    return [Cowblock(os.path.join(root, "cowblock")),
            Overlay(os.path.join(root, "overlayfs"), volatile=volatile),
            FuseOverlay(os.path.join(root, "fuse-overlayfs")),
            Qcow2(os.path.join(root, "qcow2"))]
