# cowblock developer targets.  `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: deps install test demo walkthrough bench bench-micro torture fuzz clean

# The real clients and peers the tests drive (python3-libnbd is nbdsh;
# gnutls-bin has psktool and certtool; umoci and skopeo make OCI images),
# containerd, runc and busybox-static for the snapshotter's end-to-end test,
# clang for the fuzz harnesses, and GnuTLS's headers for TLS on NBD,
# libfuse3's for FUSE attach, a single-node Ceph (tools/ceph-cluster.sh) and
# librados's headers for pools on RADOS (Debian packages); as root.
DEBS = qemu-utils libnbd-bin python3-libnbd nbdkit fio fuse3 libfuse3-dev fuse-overlayfs \
       thin-provisioning-tools e2fsprogs clang libclang-rt-14-dev libgnutls28-dev gnutls-bin \
       pkg-config umoci skopeo tar containerd runc busybox-static \
       ceph-mon ceph-mgr ceph-osd ceph-common python3-rados librados-dev uuid-runtime
deps:               ## Debian packages the tests use (skipped when not root)
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "not root: tests needing $$missing will skip"; fi; \
	fi

install:            ## build the C core (cffi) and install the package, editable
	$(PIP) -e '.[test]'

test: deps install  ## the test suite (a few minutes)
	$(PYTHON) -m pytest -q

demo: deps          ## install and run a short tour
	$(PIP) .
	cd /tmp && $(PYTHON) $(CURDIR)/examples/demo.py

walkthrough: install ## images and containers on the default pool, from the CLI
	bash examples/walkthrough.sh

bench: deps install ## engine targets side by side with their peers (~10 min)
	$(PYTHON) benchmarks/compare.py --runs 5 --json benchmarks/results/engine.json

bench-micro: install ## pytest-benchmark of the hot paths
	$(PYTHON) -m pytest benchmarks/ -q -p no:randomly --benchmark-only -o addopts=""

torture: install    ## long crash, power-cut and property runs: thousands of SIGKILLs
	COWBLOCK_CRASH_ITERATIONS=5000 COWBLOCK_NBD_CRASH_ITERATIONS=5000 COWBLOCK_POWER_WORKLOADS=100 \
		COWBLOCK_EXAMPLES=2000 COWBLOCK_CTRD_KILLS=1000 COWBLOCK_CTRD_E2E_KILLS=50 \
		$(PYTHON) -m pytest -q -s tests/test_crash.py tests/test_crash_nbd.py tests/test_property.py \
		tests/test_containerd.py tests/test_containerd_e2e.py

FUZZ_RUNS ?= 1000000
FUZZ_WORK ?= /var/tmp/cowblock-fuzz
fuzz: deps install  ## a million executions of each fuzz harness (FUZZ_RUNS), corpora in FUZZ_WORK
	fuzz/libfuzzer/build.sh
	mkdir -p $(FUZZ_WORK)/nbd_transmit $(FUZZ_WORK)/metadata $(FUZZ_WORK)/handshake $(FUZZ_WORK)/control
	fuzz/libfuzzer/out/fuzz_nbd_transmit -runs=$(FUZZ_RUNS) -timeout=30 -max_len=16384 \
		-dict=fuzz/libfuzzer/nbd.dict -artifact_prefix=$(FUZZ_WORK)/ \
		$(FUZZ_WORK)/nbd_transmit fuzz/libfuzzer/corpus/nbd_transmit
	fuzz/libfuzzer/out/fuzz_metadata -runs=$(FUZZ_RUNS) -timeout=30 -max_len=4096 \
		-artifact_prefix=$(FUZZ_WORK)/ $(FUZZ_WORK)/metadata fuzz/libfuzzer/corpus/metadata
	$(PYTHON) fuzz/atheris/fuzz_handshake.py -runs=$(FUZZ_RUNS) -timeout=30 \
		-artifact_prefix=$(FUZZ_WORK)/ $(FUZZ_WORK)/handshake
	$(PYTHON) fuzz/atheris/fuzz_control.py -runs=$(FUZZ_RUNS) -timeout=60 \
		-artifact_prefix=$(FUZZ_WORK)/ $(FUZZ_WORK)/control

clean:
	rm -rf build *.egg-info cowblock/_core*.so .pytest_cache .hypothesis
