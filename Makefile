# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use. TORCH pins torch before anything else is resolved, so no
# dependency can pull a multi-GB CUDA build; on a GPU machine set TORCH to the CUDA build you use.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
NPROC ?= 2
BIN := $(VENV)/bin

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

demo: venv
	$(BIN)/torchrun --nproc-per-node $(NPROC) examples/train_mmpo.py --config-name train_demo

# Two pytest workers: many tests run one single-threaded rank, so one worker leaves a core idle.
# loadgroup: the tests marked xdist_group("many_ranks") (four gloo ranks, or torchrun with three)
# run one after another on one worker: only that worker's rank pool grows to four processes (each
# pays ~8 s of imports), and never two of them run at once on the two cores.
TEST_WORKERS ?= 2

test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

clean:
	rm -rf $(VENV) outputs
