"""Pools on Ceph RADOS, against a throw-away single-node cluster
(tools/ceph-cluster.sh, started once per session: about 15 s)."""
import subprocess


def test_cluster_serves_objects(ceph_cluster, tmp_path):
    src = tmp_path / "in"
    src.write_bytes(b"cowblock" * 512)
    env = {"CEPH_CONF": ceph_cluster.conf, "PATH": "/usr/bin:/bin"}
    run = lambda *a: subprocess.run(["timeout", "30", "rados", "-p", ceph_cluster.pool, *a],  # noqa: E731
                                    env=env, check=True, capture_output=True)
    run("put", "probe", str(src))
    run("get", "probe", str(tmp_path / "out"))
    run("rm", "probe")
    assert (tmp_path / "out").read_bytes() == src.read_bytes()
