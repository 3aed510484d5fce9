# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use. TORCH pins torch before anything else is resolved, so no
# dependency can pull a multi-GB CUDA build; on a GPU machine set TORCH to the CUDA build you use.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
NPROC ?= 2
BIN := $(VENV)/bin

.PHONY: venv demo test lint test-compat gpu-kit-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[test,lint]"
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

# pycodestyle (E501 at 120), pyflakes and import order, as [tool.ruff] in pyproject.toml sets them.
lint: venv
	$(BIN)/ruff check .

# The newest megatron-core we support, on the Python 3.12 of GPU clusters and NGC images: a fast,
# representative part of the suite. PyPI's only cp312 torch is its CUDA build (~4.7 GB with its
# CUDA wheels; it runs on CPU), so the venv is kept outside the clone and made once per versions.
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12.*/bin/python) python3.12)
COMPAT_TORCH ?= torch==2.13.0
COMPAT_MCORE ?= megatron-core==0.19.2
COMPAT_VENV ?= $(HOME)/.cache/mmpo-megatron/py312-$(subst ==,-,$(COMPAT_MCORE))-$(subst ==,-,$(COMPAT_TORCH))
COMPAT_TESTS ?= tests/test_losses.py tests/test_logprobs.py tests/test_batch_stats.py tests/test_parallel_runtime.py \
	tests/test_preference_model.py tests/test_convert.py tests/test_memory_plan.py tests/test_lora.py \
	"tests/test_trainer.py::test_resume_reproduces_the_uninterrupted_run_exactly" \
	"tests/test_trainer.py::test_nonfinite_step_is_skipped_exactly_then_abort" \
	"tests/test_trainer.py::test_packed_training_equals_padded_training" \
	"tests/test_trainer.py::test_demo_held_out_reward_accuracy_rises" \
	"tests/test_cluster.py::test_background_checkpoints_and_a_sigterm_on_one_rank_resume_exactly" \
	"tests/test_cluster.py::test_an_error_during_a_background_write_kills_the_writer_and_leaves_the_folder_unmarked"

$(COMPAT_VENV)/.installed:
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install -q "$(COMPAT_TORCH)" "$(COMPAT_MCORE)"
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pip install -q -e ".[test]" "$(COMPAT_TORCH)" "$(COMPAT_MCORE)"
	$(COMPAT_VENV)/bin/python -c "import megatron.core, sys; print('python', sys.version.split()[0], '| megatron-core', megatron.core.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(COMPAT_TESTS)

# The wheel kit of tools/gpu_report.sh, checked the way the GPU machine (no registry) installs it.
gpu-kit-check: venv
	$(BIN)/python tools/gpu_kit.py wheels
	$(BIN)/python tools/gpu_kit.py check

clean:
	rm -rf $(VENV) outputs
