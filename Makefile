# cowblock developer targets.  `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: deps install test demo walkthrough bench bench-micro torture clean

# The real clients and peers the tests drive (Debian packages); as root.
DEBS = qemu-utils libnbd-bin nbdkit fio fuse3 fuse-overlayfs thin-provisioning-tools e2fsprogs \
       clang libclang-rt-14-dev
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

torture: install    ## long crash and property runs: thousands of SIGKILLs
	COWBLOCK_CRASH_ITERATIONS=5000 COWBLOCK_NBD_CRASH_ITERATIONS=5000 COWBLOCK_EXAMPLES=2000 \
		$(PYTHON) -m pytest -q -s tests/test_crash.py tests/test_crash_nbd.py tests/test_property.py

clean:
	rm -rf build *.egg-info cowblock/_core*.so .pytest_cache .hypothesis
