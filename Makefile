# Two commands on a fresh machine:  `make demo` (main job)  and  `make test` (the tests).
VENV   ?= .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed
export SSL_CERT_FILE ?= /etc/ssl/certs/ca-certificates.crt

.PHONY: setup demo test test-quick lint-imports bench clean

setup: $(STAMP)

# torch first (the CPU wheel on disk), then everything else under the same pin.
$(STAMP): pyproject.toml constraints.txt excludes.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(UV) pip install --python $(PY) -q -c constraints.txt --find-links /opt/wheels torch==2.13.0
	$(UV) pip install --python $(PY) -q -c constraints.txt --excludes excludes.txt \
	    --find-links /opt/wheels -e '.[full,dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m ray_calib.testing.demo

test: setup lint-imports
	$(PY) -m pytest -q

test-quick: setup lint-imports
	$(PY) -m pytest -q -m "not slow"

# The layer contracts of pyproject.toml [tool.importlinter] (stages import only downward; nothing imports testing).
lint-imports: setup
	$(VENV)/bin/lint-imports

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
