"""The `cowblock bench` harness at a tiny scale: every workload runs on every
system or the system is skipped with a reason; the JSON, the plots and the
report are written.  The real-image workloads run on a small generated
3-layer OCI image (made with umoci; not mmdebstrap's, which takes minutes):
each system loads it and a container of it is checked.  Timings are not
asserted."""
import json
import os
import shutil
import stat
import subprocess

import pytest

from cowblock import bench
from cowblock.bench import realimage, report

WORKLOADS = ["first_write", "depth", "fan_out", "churn", "realistic_mix", *bench.IMAGE_WORKLOADS]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    image, why = None, "umoci is not installed (Debian package umoci)"
    if os.geteuid() != 0:
        why = "making the OCI image needs root here (umoci unpack)"
    elif shutil.which("umoci"):
        try:
            image = realimage.small_image(str(tmp_path_factory.mktemp("oci")))
        except realimage.Unavailable as e:
            why = str(e)
    return bench.run(scale=0.01, runs=1, root=str(tmp_path_factory.mktemp("bench")),
                     progress=lambda m: None, oci_image=image, oci_skipped=why)


def test_every_system_is_measured_or_skipped_with_a_reason(results):
    assert set(results["systems"]) == {"cowblock", "overlayfs", "fuse-overlayfs", "qcow2"}
    for name, s in results["systems"].items():
        assert not s.get("error"), f"{name}: {s['error']}"
        for w in WORKLOADS:
            r = results["workloads"][w][name]
            assert "error" not in r, (name, w, r.get("error"))
            if s["available"] and not (w in bench.IMAGE_WORKLOADS
                                       and "skipped" in results["oci_image"]):
                assert "skipped" not in r, (name, w)
            else:
                assert r["skipped"] and s["skipped"], (name, w)


def test_figures_are_there(results):
    for name, r in results["workloads"]["first_write"].items():
        if "skipped" in r:
            continue
        assert r["first_write_s"]["median"] > 0 and r["second_write_s"]["median"] > 0
    overlay = results["workloads"]["first_write"].get("overlayfs", {})
    if "space_bytes" in overlay:  # a whole-file copy-up
        assert overlay["space_bytes"]["median"] >= results["parameters"]["big_file_bytes"]
    cow = results["workloads"]["first_write"].get("cowblock", {})
    if "space_bytes" in cow:      # a few blocks
        assert cow["space_bytes"]["median"] < results["parameters"]["big_file_bytes"]
    for name, r in results["workloads"]["fan_out"].items():
        if "skipped" not in r:
            assert r["containers"] >= 5 and len(r["space_curve"]) >= 1


def test_the_real_image_loads_on_every_system(results):
    """Each available system loaded the 3-layer image (image_load checks a
    container of it: what its layers add is there, what its last layer
    deletes is gone) and ran the rootfs workloads on it."""
    if "skipped" in results["oci_image"]:
        pytest.skip(results["oci_image"]["skipped"])
    assert len(results["oci_image"]["layers"]) == 3
    loads = results["workloads"]["image_load"]
    for name, s in results["systems"].items():
        if not s["available"]:
            continue
        load = loads[name]
        assert load["layers"] == 3 and load["load_s"]["median"] > 0, (name, load)
        assert load["largest_file"] == "usr/bin/blob", (name, load)
        write = results["workloads"]["image_first_write"][name]
        assert write["file_bytes"] == 1 << 20 and write["first_write_s"]["median"] > 0
        assert results["workloads"]["image_read_all"][name]["bytes"] >= 1 << 20
    if "space_bytes" in results["workloads"]["image_first_write"].get("overlayfs", {}):
        # a copy-up of the whole file
        assert results["workloads"]["image_first_write"]["overlayfs"]["space_bytes"]["median"] \
            >= 1 << 20


def test_overlay_whiteouts(tmp_path):
    """OCI whiteouts become overlayfs' own: a 0/0 character device, the
    opaque xattr."""
    if os.geteuid() != 0:
        pytest.skip("making overlayfs whiteouts (device nodes, trusted xattrs) needs root")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".wh..wh..opq").write_bytes(b"")
    (tmp_path / "d" / "kept").write_text("x")
    (tmp_path / ".wh.gone").write_bytes(b"")
    assert realimage.overlay_whiteouts(str(tmp_path)) == 2
    st = os.lstat(tmp_path / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(tmp_path / "d", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(tmp_path / "d")) == ["kept"]
    assert not (tmp_path / ".wh.gone").exists()


def test_json_plots_and_report_are_written(results, tmp_path):
    report.write_json(results, tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text())["machine"]["cpus"] >= 1
    images = report.plots(results, str(tmp_path))
    assert len(images) == 4 and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in images)
    report.markdown(results, str(tmp_path / "report.md"), "cowblock bench --scale 0.01", images)
    text = (tmp_path / "report.md").read_text()
    assert "Fairness rules" in text and "| workload | system |" in text


def test_cli_help():
    cowblock = shutil.which("cowblock")
    if not cowblock:
        pytest.skip("the cowblock command is not installed")
    out = subprocess.run([cowblock, "bench", "--help"], capture_output=True, text=True).stdout
    assert "--quick" in out and "Example:" in out


def test_the_bench_cold_caches_reach_pages_a_server_keeps_mapped(results, tmp_path):
    """drop_caches leaves the pages a process maps (the pool daemon reads its
    data file through a mapping); coldcache.drop_caches pages them out first,
    so a cold read is cold on the host for cowblock as for the others."""
    if os.geteuid() != 0:
        pytest.skip("dropping the page cache needs root")
    assert not results["systems"]["cowblock"].get("cold_caveat")
    import ctypes
    import mmap
    from cowblock.bench import coldcache

    path = tmp_path / "mapped"
    path.write_bytes(os.urandom(4 << 20))
    holder = subprocess.Popen(
        ["python3", "-c", "import mmap,sys; f=open(sys.argv[1],'rb'); "
         "m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ); sum(m[::4096]); "
         "print('mapped', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "mapped\n"
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        pages = (4 << 20) // mmap.PAGESIZE

        def resident():
            with open(path, "rb") as f:
                addr = libc.mmap(None, 4 << 20, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
                vec = (ctypes.c_ubyte * pages)()
                assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(4 << 20), vec) == 0
                libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(4 << 20))
            return sum(v & 1 for v in vec)

        coldcache.drop_caches()
        assert resident() == pages   # what plain drop_caches leaves
        assert coldcache.page_out(holder.pid, [str(path)]) is None
        coldcache.drop_caches()
        assert resident() < pages // 8
    finally:
        holder.kill()
        holder.wait()
