"""The C core under AddressSanitizer and UBSan, and a short run of each
libFuzzer harness.

The core is rebuilt with -fsanitize=address,undefined into a scratch
directory and the engine's own tests (API, hostile input, property,
corruption, damage, concurrency, power cuts, full pools, NBD) run against
it in a subprocess; every process they start, NBD servers included, inherits
the sanitizers and writes any report to a log that must stay empty.
COWBLOCK_SANITIZER_TESTS overrides the list of test files.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from corebuild import ROOT, TESTS, build_core_copy, loaded_core

pytestmark = pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")

TEST_FILES = os.environ.get(
    "COWBLOCK_SANITIZER_TESTS",
    "test_api.py test_hostile_api.py test_property.py test_corruption.py test_damage.py "
    "test_repair.py test_format.py test_check_records.py test_error_kinds.py "
    "test_concurrency.py test_crash.py test_full_pool.py test_nbd.py test_nbd_tls.py "
    "test_attach_fuse.py test_records.py test_atomic.py test_records_property.py "
    "test_records_crash.py").split()
# Long runs stay out, and so do the tests that drive outside clients (qemu,
# libnbd, fio): the sanitizer runtime, preloaded, would be loaded into them
# too, and qemu-io deadlocks in it at exit.  The NBD server is still tested
# under the sanitizers by the raw-client protocol tests, TLS included (and the
# build without GnuTLS, a build of its own, stays out too); the FUSE server by
# the tests of its files through system calls (the ext4 ones, which run mkfs,
# e2fsck and dd, and the build without libfuse3 stay out).
SKIP = ("not sigkill and not random_workloads and not qemu and not nbdinfo and not nbdcopy "
        "and not fio and not nbdsh and not without_gnutls and not ext4 "
        "and not without_libfuse3")
SHARES = max(1, min(4, os.cpu_count() or 1))   # test processes run side by side
FUZZ_RUNS = {"fuzz_nbd_transmit": 20000, "fuzz_metadata": 2000}


def libasan():
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                          text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def sanitizer_reports(log_dir):
    return "".join(open(p, errors="replace").read() for p in sorted(glob.glob(f"{log_dir}/*")))


def test_core_tests_pass_under_asan_and_ubsan(tmp_path):
    asan = libasan()
    if not asan:
        pytest.skip("gcc has no AddressSanitizer runtime")
    build = tmp_path / "build"
    build_core_copy(str(build), env={"COWBLOCK_SANITIZE": "address,undefined"})
    logs = tmp_path / "reports"
    logs.mkdir()
    env = dict(os.environ, PYTHONPATH=str(build), LD_PRELOAD=asan, COWBLOCK_EXAMPLES="25",
               # Python itself never frees some memory at exit: leaks are not the point.
               ASAN_OPTIONS=f"detect_leaks=0:log_path={logs}/asan",
               UBSAN_OPTIONS=f"print_stacktrace=1:log_path={logs}/ubsan")
    assert loaded_core(str(build), env).startswith(str(build))
    files = [os.path.join(TESTS, f) for f in TEST_FILES if os.path.exists(os.path.join(TESTS, f))]
    pytest_ = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", SKIP]
    collected = subprocess.run([*pytest_, "--collect-only", *files], cwd=str(build), env=env,
                               capture_output=True, text=True, timeout=300)
    tests = [os.path.join(ROOT, line) for line in collected.stdout.splitlines() if "::" in line]
    assert tests, collected.stdout[-4000:] + collected.stderr[-2000:]
    # The machine's cores each run a share (taken in turn, so the slow files
    # spread), each share with its own temporary directory.
    # (Short paths: the tests' Unix sockets must fit in 108 bytes.)
    shares = [tests[i::SHARES] for i in range(SHARES)]
    with tempfile.TemporaryDirectory(prefix="cb-san-") as short:
        runs = [subprocess.Popen([*pytest_, "-x", "--basetemp", f"{short}/{i}", *share],
                                 cwd=str(build), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
                for i, share in enumerate(shares)]
        outputs = [r.communicate(timeout=1200)[0] for r in runs]
    reports = sanitizer_reports(logs)
    assert not reports, f"sanitizer reports:\n{reports[:6000]}"
    for r, out in zip(runs, outputs):
        assert r.returncode == 0, out[-6000:]
    print(" / ".join(out.strip().splitlines()[-1] for out in outputs))


def libfuzzer_available():
    if not shutil.which("clang"):
        return "needs clang (Debian: clang, libclang-rt-14-dev)"
    probe = subprocess.run(["clang", "-fsanitize=fuzzer", "-x", "c", "-", "-o", os.devnull],
                           input="int LLVMFuzzerTestOneInput(const char *d, unsigned long n)"
                                 "{return 0;}", capture_output=True, text=True)
    return None if probe.returncode == 0 else "clang has no libFuzzer runtime (libclang-rt-14-dev)"


@pytest.fixture(scope="module")
def fuzzers(tmp_path_factory):
    why = libfuzzer_available()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("fuzzers")
    subprocess.run([os.path.join(ROOT, "fuzz", "libfuzzer", "build.sh")], check=True,
                   env=dict(os.environ, OUT=str(out)), capture_output=True)
    return out


@pytest.mark.parametrize("harness", sorted(FUZZ_RUNS))
def test_short_fuzz_run(fuzzers, harness, tmp_path):
    """A short libFuzzer run from the committed seed corpus: no crash, no
    sanitizer report, no hang (-timeout), no leak."""
    seeds = os.path.join(ROOT, "fuzz", "libfuzzer", "corpus", harness.removeprefix("fuzz_"))
    work = tmp_path / "corpus"
    work.mkdir()
    extra = ["-dict=" + os.path.join(ROOT, "fuzz", "libfuzzer", "nbd.dict")] \
        if harness == "fuzz_nbd_transmit" else []
    run = subprocess.run([str(fuzzers / harness), f"-runs={FUZZ_RUNS[harness]}", "-seed=1",
                          "-timeout=20", "-max_len=16384", f"-artifact_prefix={tmp_path}/",
                          *extra, str(work), seeds],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, COWBLOCK_FUZZ_TMP=str(tmp_path)))
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Done" in run.stderr
    assert not glob.glob(f"{tmp_path}/crash-*") and not glob.glob(f"{tmp_path}/timeout-*")
