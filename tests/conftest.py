"""Suite-wide pytest settings."""

import pytest

# The longest tests start first, so that two xdist workers (`make test`) do not end with one of them
# alone on a long test collected last (test_trainer.py sorts after every other file). Measured on
# the 2-core CI machine; the rest keep their collection order.
LONGEST_FIRST = (
    "test_a_kill_mid_write_then_a_preemption_lose_nothing_and_the_requeued_job_matches",
    "test_two_steps_match_single_process_at_every_layout",
    "test_demo_held_out_reward_accuracy_rises",
    "test_from_hf_nine_heads_trains_at_tp3_with_no_shape_keys",
    "test_fp32_run_exported_and_reimported_with_default_flags_scores_like_the_trained_checkpoint",
    "test_reference_modes_agree_and_tp2_checkpoint_scores_equally_at_tp1",
    "test_hf_to_megatron_logits_match_transformers_at_tp1_and_tp2_and_round_trip",
    "test_benchmark_against_trl_on_the_same_data",
    "test_packed_training_equals_padded_training",
    "test_fused_chunked_output_layer_and_bf16_train_like_full_fp32_logits",
)


def pytest_collection_modifyitems(config, items):
    """Reorder: the LONGEST_FIRST tests in that order, then the others as collected."""
    def rank(item):
        name = item.originalname or item.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items[:] = sorted(items, key=rank)  # stable: ties keep collection order



def pytest_configure(config):
    """Refuse `--dist loadgroup` under pytest 9.2+ with pytest-xdist 3.8 or older, which lose the
    groups silently (xdist marks a group in the node id, which pytest 9.2 no longer lets it
    change): the many_ranks and cluster groups would then run on both workers at once, each
    growing a four-rank pool or launching torchrun, and the suite would take far longer."""
    from importlib.metadata import version

    if config.getoption("dist", default="no") != "loadgroup":
        return
    pytest_version = tuple(int(part) for part in version("pytest").split(".")[:2])
    xdist_version = tuple(int(part) for part in version("pytest-xdist").split(".")[:2])
    if pytest_version >= (9, 2) and xdist_version <= (3, 8):
        raise pytest.UsageError(f"pytest {version('pytest')} with pytest-xdist {version('pytest-xdist')} ignores "
                                "xdist_group under --dist loadgroup: install pyproject's test extra (pytest<9.2)")
