# cowblock developer targets.  `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: install test demo peers bench bench-micro torture clean

install:            ## build the C core (cffi) and install the package, editable
	$(PIP) -e '.[test]'

test: install       ## the test suite (a few minutes)
	$(PYTHON) -m pytest -q

demo:               ## install and run a short tour
	$(PIP) .
	cd /tmp && $(PYTHON) $(CURDIR)/examples/demo.py

peers:              ## Debian packages the peer benchmarks drive (qemu-img)
	command -v qemu-img >/dev/null || (apt-get update -qq && apt-get install -y -qq qemu-utils)

bench: install peers ## engine targets side by side with their peers (~10 min)
	$(PYTHON) benchmarks/compare.py --runs 5 --json benchmarks/results/engine.json

bench-micro: install ## pytest-benchmark of the hot paths
	$(PYTHON) -m pytest benchmarks/ -q -p no:randomly --benchmark-only -o addopts=""

torture: install    ## long crash and property runs: thousands of SIGKILLs
	COWBLOCK_CRASH_ITERATIONS=5000 COWBLOCK_EXAMPLES=2000 $(PYTHON) -m pytest -q \
		tests/test_crash.py tests/test_property.py

clean:
	rm -rf build *.egg-info cowblock/_core*.so .pytest_cache .hypothesis
