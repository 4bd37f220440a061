# Two entry points that set themselves up on a fresh machine: `make pretrain` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUTPUT_DIR ?= outputs/msn-digits
# Training time of `make pretrain`: with start-up, export and evaluation it stays under 5 minutes on any machine.
PRETRAIN_TIME ?= 4m

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test pretrain lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Two pytest workers, each taking whole test files: run one after the other, the tests keep one of two cores busy.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile

pretrain: $(STAMP)
	$(PY) examples/pretrain_msn.py --max_train_time $(PRETRAIN_TIME) --output_dir $(OUTPUT_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache
