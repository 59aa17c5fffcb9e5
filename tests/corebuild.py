"""Build a variant of the C core (a mutant, or one with sanitizers) from a
copy of csrc/ into a directory, with the Python package beside it, so that a
subprocess run with PYTHONPATH set to that directory loads it in place of
the installed extension."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def build_core_copy(tmp, edit=None, env=None):
    """edit(src_dir) may change the copied sources before the build."""
    src = os.path.join(tmp, "csrc")
    shutil.copytree(os.path.join(ROOT, "csrc"), src)
    if edit:
        edit(src)
    shutil.copytree(os.path.join(ROOT, "cowblock"), os.path.join(tmp, "cowblock"),
                    ignore=shutil.ignore_patterns("_core*", "__pycache__"))
    build = (f"import sys; sys.path.insert(0, {src!r}); import build_ffi; "
             f"build_ffi.ffibuilder.compile(tmpdir={tmp!r})")
    subprocess.run([sys.executable, "-c", build], cwd=tmp, check=True, capture_output=True,
                   env=dict(os.environ, **(env or {})))


def loaded_core(tmp, env):
    """Which extension file a subprocess with env imports."""
    probe = subprocess.run([sys.executable, "-c", "import cowblock._core as c; print(c.__file__)"],
                           cwd=tmp, env=env, capture_output=True, text=True)
    return probe.stdout.strip()
