# The README names two commands: `make demo` (the main job) and `make test` (all tests).
# Each one installs what it needs into .venv by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint docs clean reproduce-capfilt

# torch first, from the CPU wheel: anything unpinned would pull a multi-GB CUDA build.
$(STAMP): setup.py requirements/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c requirements/ci.txt -e ".[dev,app,demo]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) training_scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_generation.py
	$(PY) benchmarks/bench_retrieval_eval.py --images 200 --texts 1000
	$(PY) benchmarks/bench_capfilt.py --images 4
	$(PY) benchmarks/bench_caption_cli.py
	$(PY) benchmarks/bench_pretraining.py --steps 1

# CapFilt's ablation (the paper's table 1) in miniature; started again, it skips every finished step.
reproduce-capfilt: $(STAMP)
	$(PY) training_scripts/reproduce_capfilt.py --output-dir outputs/capfilt_ablation

lint: $(STAMP)
	$(VENV)/bin/ruff check src training_scripts tests benchmarks
	$(VENV)/bin/ruff format --check src training_scripts tests benchmarks

clean:
	rm -rf $(VENV) outputs build dist src/*.egg-info
