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
def ceph(ceph_cluster, tmp_path, monkeypatch):
    """The cluster as this process sees it: $CEPH_CONF, and a cache root of
    the test's own."""
    from cowblock._native import lib
    if not lib.cb_remote_available():
        pytest.skip("this cowblock was built without librados (apt-get install librados-dev, "
                    "then reinstall)")
    monkeypatch.setenv("CEPH_CONF", ceph_cluster.conf)
    monkeypatch.setenv("COWBLOCK_RADOS_CACHE", str(tmp_path / "cache"))
    return ceph_cluster


@pytest.fixture
def location(ceph):
    """A pool location of the test's own on the cluster, destroyed after."""
    import uuid

    from cowblock import errors, rados
    loc = f"rados:{ceph.pool}/t-{uuid.uuid4().hex[:12]}"
    yield loc
    try:
        rados.destroy(loc)
    except errors.CowblockError:
        pass
