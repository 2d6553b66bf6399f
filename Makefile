# Two commands on a fresh machine:  `make demo` (main job)  and  `make test` (the tests).
VENV   ?= .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed
export SSL_CERT_FILE ?= /etc/ssl/certs/ca-certificates.crt

.PHONY: setup demo lint lint-imports typecheck test test-extended test-quick bench clean

setup: $(STAMP)

# torch first (the CPU wheel on disk), then everything else under the same pin. Bytecode is compiled once here:
# where PYTHONDONTWRITEBYTECODE is set, every process (each stage, engine core and rank) would otherwise compile
# torch and vLLM from source again (~7 s of CPU each).
$(STAMP): pyproject.toml constraints.txt excludes.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(UV) pip install --python $(PY) -q -c constraints.txt --find-links /opt/wheels --compile-bytecode torch==2.13.0
	$(UV) pip install --python $(PY) -q -c constraints.txt --excludes excludes.txt --compile-bytecode \
	    --find-links /opt/wheels -e '.[full,dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m ray_calib.testing.demo

# ruff: pyflakes, pycodestyle, import order, bugbear, pyupgrade, imports at the top of a module except the heavy
# libraries (inside functions), and the formatter's layout (pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check ray_calib tests benchmarks
	$(VENV)/bin/ruff format --check ray_calib tests benchmarks

# mypy over the package (config in pyproject.toml [tool.mypy]; vLLM, Ray, torch, ... are typed as Any)
typecheck: setup
	$(VENV)/bin/mypy ray_calib

# every behaviour: the layer contracts, lint, types, then the tests (vLLM, Ray and sshd really started) on two
# pytest workers (the tests of one measure run, or of the demo, share a worker: tests/conftest.py)
PYTEST_PAR := -n 2 --dist loadgroup
test: lint-imports lint typecheck
	$(PY) -m pytest -q $(PYTEST_PAR) -m "not extended"

# the extended tier: TP4, every re-shard invariant, INC on CPU, the demo (~16 min here)
test-extended: setup
	$(PY) -m pytest -q $(PYTEST_PAR) -m extended

# without vLLM, Ray or sshd (a few minutes): for editing
test-quick: lint-imports lint typecheck
	$(PY) -m pytest -q $(PYTEST_PAR) -m "not slow and not cluster"

# The layer contracts of pyproject.toml [tool.importlinter] (stages import only downward; nothing imports testing).
lint-imports: setup
	$(VENV)/bin/lint-imports

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
