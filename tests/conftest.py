import os

import pytest

from cowblock import Pool

BLOCK_SIZES = [4096, 65536, 1 << 20]


@pytest.fixture
def pool_dir(tmp_path):
    return tmp_path / "pool"


@pytest.fixture(params=BLOCK_SIZES, ids=["4K", "64K", "1M"])
def block_size(request):
    return request.param


@pytest.fixture
def pool(pool_dir, block_size):
    """A pool of 256 blocks, no background commits; checked clean at the end."""
    p = Pool.create(pool_dir, 256 * block_size, block_size, commit_interval=0)
    yield p
    if p._h is not None:
        if not p.stats().read_only:
            report = p.check()
            assert report.ok, str(report)
        p.close()


@pytest.fixture(scope="session")
def ceph_cluster():
    """A single-node Ceph on 127.0.0.1 (1 mon, 1 mgr, 1 memstore OSD), once
    per session; skips with the reason when it cannot run."""
    from cephcluster import start
    cluster = start()
    if isinstance(cluster, str):
        pytest.skip(cluster)
    yield cluster
    cluster.stop()


@pytest.fixture
def ceph(ceph_cluster, tmp_path, monkeypatch, request):
    """The cluster as this process sees it: $CEPH_CONF, and a cache root of
    the test's own.  A cluster found full first has the objects that earlier
    tests left removed, and the tests that left them named in a warning, so
    that one test's leftovers do not fail the rest unexplained."""
    from cowblock._native import lib
    if not lib.cb_remote_available():
        pytest.skip("this cowblock was built without librados (apt-get install librados-dev, "
                    "then reinstall)")
    if ceph_cluster.full():
        free_a_full_cluster(ceph_cluster, request.node.nodeid)
    monkeypatch.setenv("CEPH_CONF", ceph_cluster.conf)
    monkeypatch.setenv("COWBLOCK_RADOS_CACHE", str(tmp_path / "cache"))
    return ceph_cluster


def free_a_full_cluster(cluster, nodeid):
    """Remove every object in the test pool (no test is running), or fail
    with what fills the cluster when that does not clear its full flags."""
    import warnings
    left = cluster.objects()
    report = f"{cluster.full()}\n{cluster.space_report(left)}"
    for ns, names in left.items():
        for i in range(0, len(names), 200):
            cluster.run("rados", "-p", cluster.pool, "-N", ns, "rm", "--force-full",
                        *names[i:i + 200])
    owners = sorted({cluster.namespaces.get(ns, f"namespace {ns!r}") for ns in left})
    if not cluster.wait_not_full(30):
        pytest.fail(f"the test Ceph cluster is full before {nodeid}, and removing every object "
                    f"in pool {cluster.pool} (left by {owners}) did not free it:\n{report}")
    warnings.warn(f"the test Ceph cluster was full before {nodeid}; removed the objects left by "
                  f"{owners}:\n{report}")


@pytest.fixture
def location(ceph, request):
    """A pool location of the test's own on the cluster, destroyed after
    (a destroy that fails is a warning naming the test)."""
    import uuid
    import warnings

    from cowblock import errors, rados
    name = f"t-{uuid.uuid4().hex[:12]}"
    ceph.namespaces[name] = request.node.nodeid
    loc = f"rados:{ceph.pool}/{name}"
    yield loc
    os.environ["CEPH_CONF"] = ceph.conf     # (the test may have unset it; the ceph fixture restores it)
    try:
        rados.destroy(loc)
    except errors.PoolNotFoundError:
        pass        # (the test removed it, or never made it)
    except errors.CowblockError as e:
        warnings.warn(f"{request.node.nodeid} left its RADOS pool {loc}: {e}")
