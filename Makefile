# The two commands a new user runs: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   ?= demo_out
WORKERS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: demo lint test test-fast bench fuzz clean-demo help

help:
	@echo "make demo       set up .venv, build proposal shards from data/sample, train a few CPU steps, write a report and pictures"
	@echo "make lint       ruff format check and lint (prep shards train bench tests), mypy (shards prep train)"
	@echo "make test       set up .venv with the dev extras, run make lint, then the whole test suite"
	@echo "make test-fast  the suite without tests marked slow"
	@echo "make bench      run the CPU benchmarks (see docs/benchmarks.md)"
	@echo "make fuzz       fuzz the shard reader with mutated prep shards for FUZZ_MINUTES minutes (default 10)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps: reinstall only when pyproject.toml changes.
$(VENV)/.train: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.train

demo: $(VENV)/.train
	$(BIN)/prep coco data/sample/coco/images --annotations data/sample/coco/annotations/instances_sample.json \
		--out $(DEMO)/shards --shard-size 4 --workers $(WORKERS)
	$(BIN)/prep stats $(DEMO)/shards --plot $(DEMO)/stats.png
	$(BIN)/prep verify $(DEMO)/shards
	$(BIN)/prep show $(DEMO)/shards -n 8 -o $(DEMO)/proposals.png
	$(BIN)/prep report $(DEMO)/shards -o $(DEMO)/report.html --no-progress
	$(BIN)/prep export $(DEMO)/shards --format coco-results -o $(DEMO)/proposals.json
	$(BIN)/python -m train --preset tiny --data $(DEMO)/shards --out $(DEMO)/train --max-steps 40 --resume
	$(BIN)/python -m train.plot $(DEMO)/train/log.jsonl -o $(DEMO)/loss.png
	@echo "demo done: $(DEMO)/report.html $(DEMO)/proposals.png $(DEMO)/stats.png $(DEMO)/loss.png $(DEMO)/proposals.json"

LINT_PATHS := prep shards train bench tests
TYPED_PATHS := shards prep train

# Part of `make test`, so CI runs it: a format or lint finding or a type error fails the build like a test.
# All three run before it fails, so one run reports every finding.
lint: $(VENV)/.dev
	rc=0; \
	$(BIN)/ruff format --check $(LINT_PATHS) || rc=1; \
	$(BIN)/ruff check $(LINT_PATHS) || rc=1; \
	$(BIN)/mypy $(TYPED_PATHS) || rc=1; \
	exit $$rc

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: $(VENV)/.dev lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: $(VENV)/.dev
	$(MAKE) test PYTEST_ARGS="-m 'not slow'"

bench: $(VENV)/.dev
	PYTHONPATH=. $(BIN)/python bench/prep_bench.py
	PYTHONPATH=. $(BIN)/python bench/train_bench.py
	PYTHONPATH=. $(BIN)/python bench/step_bench.py
	PYTHONPATH=. $(BIN)/python bench/stream_bench.py
	PYTHONPATH=. $(BIN)/python bench/ray_bench.py
	PYTHONPATH=. $(BIN)/python bench/stats_bench.py
	PYTHONPATH=. $(BIN)/python bench/proposals_bench.py

# The reader under mutations of real prep shards (bench/fuzz.py), as long as asked; the suite runs a bounded campaign.
FUZZ_MINUTES ?= 10
FUZZ_SEED ?= 0
fuzz: $(VENV)/.dev
	PYTHONPATH=. $(BIN)/python bench/fuzz.py --minutes $(FUZZ_MINUTES) --seed $(FUZZ_SEED)

clean-demo:
	rm -rf $(DEMO)
