"""A throw-away single-node Ceph for the tests (tools/ceph-cluster.sh),
started once per session by the `ceph_cluster` fixture (conftest.py) and
stopped at its end; a test that needs it skips with the reason when the Ceph
packages are missing or the cluster does not start.  It runs with cephx
(client.admin's keyring named in its conf), so that tests/test_rados_cephx.py
can try the documented caps on it: no second cluster to start."""
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "tools" / "ceph-cluster.sh"
NEEDED = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "monmaptool", "uuidgen")
POOL = "cowblock"   # the Ceph pool the script creates


class Cluster:
    def __init__(self, path, owned=True):
        self.path = path
        self.owned = owned
        self.conf = os.path.join(path, "ceph.conf")
        self.pool = POOL

    @property
    def cephx(self):
        """Whether the cluster requires cephx of its clients (one given by
        $COWBLOCK_TEST_CEPH may not)."""
        with open(self.conf) as f:
            return re.search(r"^auth[_ ]client[_ ]required\s*=\s*cephx", f.read(), re.M) is not None

    def stop(self):
        if not self.owned:
            return
        subprocess.run(["bash", str(SCRIPT), "destroy", self.path], capture_output=True,
                       timeout=120)


def start():
    """A running Cluster, or the reason there is none (a str).
    $COWBLOCK_TEST_CEPH (a cluster directory made by the script) uses that
    cluster instead: the monitor's ports are fixed, so one runs at a time."""
    if os.environ.get("COWBLOCK_TEST_CEPH"):
        return Cluster(os.environ["COWBLOCK_TEST_CEPH"], owned=False)
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        return (f"Ceph is not installed (no {', '.join(missing)}): apt-get install ceph-mon "
                "ceph-mgr ceph-osd ceph-common")
    path = tempfile.mkdtemp(prefix="cowblock-ceph-")
    try:
        out = subprocess.run(["bash", str(SCRIPT), "start", path], capture_output=True, text=True,
                             timeout=180, env=dict(os.environ, CEPH_AUTH="cephx"))
    except subprocess.TimeoutExpired:
        Cluster(path).stop()
        return "the test Ceph cluster did not start in 180 s"
    if out.returncode != 0:
        Cluster(path).stop()
        return f"the test Ceph cluster did not start: {out.stderr.strip()[-400:]}"
    return Cluster(path)
