"""What installing and testing the package leaves behind: matplotlib is an
extra (`cowblock[bench]`) that the package works without, and a passing
test run leaves no temporary files."""
import os
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib", reason="needs Python 3.11 or later (tomllib)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    PYPROJECT = tomllib.load(_f)

# Run Python as if matplotlib were not installed.
WITHOUT_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None\n"


def test_matplotlib_is_the_bench_extra_and_the_tests_install_it():
    project = PYPROJECT["project"]
    assert not [d for d in project["dependencies"] if d.startswith("matplotlib")]
    extras = project["optional-dependencies"]
    assert [d for d in extras["bench"] if d.startswith("matplotlib")]
    assert "cowblock[bench]" in extras["test"]


def python(code):
    return subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB + code],
                          capture_output=True, text=True, cwd=ROOT)


def test_the_package_and_the_command_work_without_matplotlib():
    r = python("import cowblock, cowblock.bench, cowblock.bench.report\n"
               "from cowblock.cli.main import main\n"
               "sys.argv = ['cowblock', 'bench', '--help']\n"
               "main()")
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout


def test_plots_without_matplotlib_say_how_to_install_it(tmp_path):
    r = python("from cowblock.bench import report\n"
               "from cowblock.errors import MissingExtraError\n"
               "try:\n"
               f"    report.plots({{'workloads': {{}}}}, {str(tmp_path)!r})\n"
               "except MissingExtraError as e:\n"
               "    print(e)\n")
    assert r.returncode == 0, r.stderr
    assert "pip install 'cowblock[bench]'" in r.stdout


def test_a_passing_run_leaves_no_temporary_files(tmp_path):
    """The pytest settings keep the temporary directories of failed tests
    only (a full run used to leave 12 GB under /tmp/pytest-of-USER)."""
    assert PYPROJECT["tool"]["pytest"]["ini_options"]["tmp_path_retention_policy"] == "failed"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_big.py").write_text(
        "import pytest\n"
        "@pytest.fixture(scope='module')\n"
        "def shared(tmp_path_factory):\n"
        "    return tmp_path_factory.mktemp('shared')\n"
        "def test_big_file(tmp_path, shared):\n"
        "    for d in (tmp_path, shared):\n"
        "        with open(d / 'image', 'wb') as f:\n"
        "            f.truncate(1 << 30)\n"
        "            f.write(b'x' * (1 << 20))\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-c", os.path.join(ROOT, "pyproject.toml"), "--rootdir", str(tmp_path),
                        str(tests)], capture_output=True, text=True,
                       env=dict(os.environ, TMPDIR=str(scratch)))
    assert r.returncode == 0, r.stdout + r.stderr
    left = [os.path.join(top, name) for top, _, names in os.walk(scratch) for name in names]
    assert not left, left
