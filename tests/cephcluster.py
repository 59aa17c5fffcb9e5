"""A throw-away single-node Ceph for the tests (tools/ceph-cluster.sh),
started once per session by the `ceph_cluster` fixture (conftest.py) and
stopped at its end; a test that needs it skips with the reason when the Ceph
packages are missing or the cluster does not start.  It runs with cephx
(client.admin's keyring named in its conf), so that tests/test_rados_cephx.py
can try the documented caps on it: no second cluster to start."""
import collections
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "tools" / "ceph-cluster.sh"
NEEDED = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "monmaptool", "uuidgen")
POOL = "cowblock"   # the Ceph pool the script creates
# The health checks under which writes to POOL fail with ENOSPC or EDQUOT.
FULL_CHECKS = ("OSD_FULL", "OSD_FAILSAFE_FULL", "POOL_FULL")


class Cluster:
    def __init__(self, path, owned=True):
        self.path = path
        self.owned = owned
        self.conf = os.path.join(path, "ceph.conf")
        self.pool = POOL
        self.namespaces = {}    # the tests' pools in POOL: namespace -> test

    @property
    def cephx(self):
        """Whether the cluster requires cephx of its clients (one given by
        $COWBLOCK_TEST_CEPH may not)."""
        with open(self.conf) as f:
            return re.search(r"^auth[_ ]client[_ ]required\s*=\s*cephx", f.read(), re.M) is not None

    def run(self, tool, *args):
        """The output of a Ceph CLI tool (ceph, rados) run on this cluster."""
        return subprocess.run(["timeout", "60", tool, *args], check=True, capture_output=True,
                              text=True, env=dict(os.environ, CEPH_CONF=self.conf)).stdout

    def full(self):
        """The health checks saying why writes to POOL fail for want of
        space ({} when none does): a full OSD, or POOL over its quota (a
        test's own quota pool being full is not)."""
        checks = json.loads(self.run("ceph", "health", "detail", "-f", "json")).get("checks", {})
        found = {}
        for name in FULL_CHECKS:
            if name not in checks:
                continue
            details = [d["message"] for d in checks[name].get("detail", [])]
            if name == "POOL_FULL" and not any(f"'{self.pool}'" in d for d in details):
                continue
            found[name] = details or [checks[name]["summary"]["message"]]
        return found

    def objects(self):
        """{namespace: [object names]} in POOL."""
        out = collections.defaultdict(list)
        for o in json.loads(self.run("rados", "-p", self.pool, "ls", "--all", "-f", "json")):
            out[o["namespace"]].append(o["name"])
        return dict(out)

    def space_report(self, objects):
        """What fills the cluster: `ceph df detail` and the objects per
        namespace (objects()), for a failure's message."""
        df = self.run("ceph", "df", "detail")
        counts = sorted(((len(names), ns) for ns, names in objects.items()), reverse=True)[:20]
        lines = [f"  {ns or '(default)'}: {n} objects" for n, ns in counts]
        return df + f"objects in pool {self.pool}, by namespace:\n" + "\n".join(lines or ["  none"])

    def wait_not_full(self, seconds):
        """Whether the full flags clear within seconds (the monitor sees the
        OSD's statistics a second or two late)."""
        deadline = time.monotonic() + seconds
        while self.full():
            if time.monotonic() > deadline:
                return False
            time.sleep(1)
        return True

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
