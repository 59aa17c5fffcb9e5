"""The `cowblock bench` harness at a tiny scale: every workload runs on every
system or the system is skipped with a reason; the JSON, the plots and the
report are written.  Timings are not asserted."""
import json
import os
import shutil
import subprocess

import pytest

from cowblock import bench
from cowblock.bench import report

WORKLOADS = ["first_write", "depth", "fan_out", "churn", "realistic_mix"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return bench.run(scale=0.01, runs=1, root=str(tmp_path_factory.mktemp("bench")),
                     progress=lambda m: None)


def test_every_system_is_measured_or_skipped_with_a_reason(results):
    assert set(results["systems"]) == {"cowblock", "overlayfs", "fuse-overlayfs", "qcow2"}
    for name, s in results["systems"].items():
        assert not s.get("error"), f"{name}: {s['error']}"
        for w in WORKLOADS:
            r = results["workloads"][w][name]
            assert "error" not in r, (name, w, r.get("error"))
            if s["available"]:
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
