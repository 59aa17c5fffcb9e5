"""A private containerd and an image made offline, for the snapshotter's
end-to-end test (test_containerd_e2e.py) and benchmark
(benchmarks/containerd.py)."""
import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import time

IMAGE = "cowblock.test/busybox:v1"
APPLETS = ("sh", "cat", "echo", "find", "md5sum", "ls", "true", "sleep")


def sh(*args, check=True, timeout=120, **kw):
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode:
        raise AssertionError(f"{args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def wait_for(cond, seconds=20, what="a condition"):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def make_image(d, big=0):
    """A three-layer docker-archive: busybox and files; a whiteout; an opaque
    directory (and with big, a fourth: /big, that many random bytes).
    Returns (archive, umoci's unpacked rootfs)."""
    oci = f"{d}/oci:v1"
    sh("umoci", "init", "--layout", f"{d}/oci")
    sh("umoci", "new", "--image", oci)
    sh("umoci", "unpack", "--image", oci, f"{d}/b")
    root = f"{d}/b/rootfs"
    os.makedirs(f"{root}/bin")
    shutil.copy(shutil.which("busybox"), f"{root}/bin/busybox")
    for applet in APPLETS:
        os.symlink("busybox", f"{root}/bin/{applet}")
    for path, text in (("data/file", "one\n"), ("data/gone/x", "bye\n"),
                       ("data/keep/old", "old\n"), ("greeting", "hello from a layer\n")):
        os.makedirs(os.path.dirname(f"{root}/{path}"), exist_ok=True)
        with open(f"{root}/{path}", "w") as f:
            f.write(text)
    os.link(f"{root}/data/file", f"{root}/data/hardlink")
    sh("umoci", "repack", "--refresh-bundle", "--image", oci, f"{d}/b")
    shutil.rmtree(f"{root}/data/gone")                       # a whiteout
    with open(f"{root}/data/file2", "w") as f:
        f.write("two\n")
    sh("umoci", "repack", "--image", oci, f"{d}/b")
    layer = io.BytesIO()                                      # an opaque directory
    with tarfile.open(fileobj=layer, mode="w") as t:
        for name, data in (("data/keep/.wh..wh..opq", b""), ("data/keep/new", b"new\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with open(f"{d}/opaque.tar", "wb") as f:
        f.write(layer.getvalue())
    sh("umoci", "raw", "add-layer", "--image", oci, f"{d}/opaque.tar")
    if big:
        with tarfile.open(f"{d}/big.tar", "w") as t:
            info = tarfile.TarInfo("big")
            info.size = big
            with open("/dev/urandom", "rb") as f:
                t.addfile(info, f)
        sh("umoci", "raw", "add-layer", "--image", oci, f"{d}/big.tar")
        os.unlink(f"{d}/big.tar")
    sh("umoci", "config", "--image", oci, "--config.cmd", "/bin/sh")
    sh("umoci", "unpack", "--image", oci, f"{d}/ref")
    sh("skopeo", "copy", "-q", f"oci:{d}/oci:v1", f"docker-archive:{d}/img.tar:{IMAGE}")
    return f"{d}/img.tar", f"{d}/ref/rootfs"


def digests(root, *tops):
    """path -> md5 of every regular file in or under root/top, as busybox
    prints them."""
    out = {}
    for top in tops:
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            paths = [os.path.join(dirpath, name) for name in files]
            for p in paths if os.path.isdir(os.path.join(root, top)) else []:
                if os.path.isfile(p) and not os.path.islink(p):
                    out["/" + os.path.relpath(p, root)] = _md5(p)
        if os.path.isfile(os.path.join(root, top)):
            out["/" + top] = _md5(os.path.join(root, top))
    return out


def _md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


class Containerd:
    def __init__(self, d, snap_sock):
        self.d = d
        self.sock = f"{d}/containerd.sock"
        self.config = f"{d}/config.toml"
        with open(self.config, "w") as f:
            f.write(f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n'
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                    f'[grpc]\n  address = "{self.sock}"\n'
                    f'[proxy_plugins.cowblock]\n  type = "snapshot"\n  address = "{snap_sock}"\n')
        self.proc = None

    def start(self):
        self.log = open(f"{self.d}/containerd.log", "a")
        self.proc = subprocess.Popen(["containerd", "--config", self.config],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.ctr("version", check=False).returncode == 0 or
                 self.proc.poll() is not None, what="containerd")
        if self.proc.poll() is not None:
            raise AssertionError(f"containerd exited: {open(self.log.name).read()[-2000:]}")

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.log.close()

    def reap_shims(self):
        """SIGKILL the shims this containerd started that are still there:
        one whose task containerd had not recorded when it was killed
        outlives the task, and a restarted containerd does not end it."""
        mine = f"-address {self.sock}"
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "containerd-shim" in argv and mine in argv:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def ctr(self, *args, check=True, timeout=120):
        return sh("ctr", "--address", self.sock, *args, check=check, timeout=timeout)

    def retry(self, *args, seconds=15):
        """A ctr command, retried while the plugin's connection comes back
        (containerd's gRPC client backs off after a refused connection)."""
        end = time.monotonic() + seconds
        while True:
            r = self.ctr(*args, check=False)
            if r.returncode == 0 or time.monotonic() > end:
                assert r.returncode == 0, f"{args}: {r.stderr}"
                return r
            time.sleep(0.5)
