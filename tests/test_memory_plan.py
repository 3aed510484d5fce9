"""The layout planner: parameter counts equal megatron's, predicted memory matches a measured
training step on CPU, and the plan answers the cluster questions it is for."""

import dataclasses
from pathlib import Path

import pytest

from mmpo_megatron.config import ModelConfig
from mmpo_megatron.model.memory_plan import Layout, Workload, candidate_layouts, estimate, plan

REPO = Path(__file__).resolve().parents[1]

import plan_layout  # noqa: E402


def test_predicted_memory_matches_a_measured_step_at_tp2_with_sequence_parallelism_and_under_block_recompute():
    """Validation, not calibration: the TP=2 x SP layout is not one the working-set terms were fitted
    on; full recompute of 2 of 4 layers by the block method keeps the other two layers' activations;
    LoRA (dropout 0.1) at TP=2 x SP: adapter parameters counted exactly, the optimizer holding only them."""
    lora = dataclasses.replace(plan_layout.CHECK_WORK, lora_rank=16, lora_dropout=0.1)
    rows = plan_layout.check(
        layouts=[
            (2, Layout(2, 1, 1), "local"),
            (1, Layout(recompute="full", recompute_method="block", recompute_num_layers=2), "local"),
            (2, Layout(2, 1, 1), "local", lora),
        ]
    )
    assert rows[0]["parameters_predicted"] == rows[0]["parameters_measured"]  # exact, per TP rank
    assert rows[2]["parameters_predicted"] == rows[2]["parameters_measured"]  # base + adapters, exact
    model = ModelConfig(**plan_layout.CHECK_MODEL)
    adapters = (
        estimate(model, Layout(2, 1, 1), lora, vocab_size=plan_layout.CHECK_VOCAB).parameters
        - rows[0]["parameters_predicted"]
    )
    assert rows[2]["optimizer_parameters"] == adapters > 0  # the optimizer holds the adapters only
    for row in rows:  # tools/plan_layout.py --check: within 8.2% at twelve layouts
        assert abs(row["error"]) < 0.10, row


def test_recompute_settings_change_the_estimate_as_megatron_runs_them():
    model = ModelConfig(num_layers=8, hidden_size=512, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=1376,
                        vocab_size=1000, layer_spec="local_sdpa")
    work = Workload(micro_batch_size=1, max_length=1024)

    def acts(**layout):
        return estimate(model, Layout(**layout), work).activations

    # A flash-style kernel keeps no probabilities: selective recompute drops only its small saved
    # output; linear_proj still keeps the attention output (its input).
    none, selective = estimate(model, Layout(), work), estimate(model, Layout(recompute="selective"), work)
    assert selective.parts["attention output"] == none.parts["attention output"] > 0
    assert none.activations - selective.activations == pytest.approx(none.parts["attention kernel output"])
    # Full recompute: the method and the layer count matter.
    uniform = [acts(recompute="full", recompute_num_layers=n) for n in (1, 2, 4)]
    block = [acts(recompute="full", recompute_method="block", recompute_num_layers=n) for n in (2, 4, 8)]
    assert uniform[0] < uniform[1] < uniform[2] < none.activations
    assert block[0] > block[1] > block[2] == pytest.approx(uniform[0])  # block of every layer: uniform 1
    assert plan_layout.parse_args([]).max_length == Workload().max_length == 2312  # the training default
    # Interleaved: recompute_num_layers counts per model chunk (2 chunks of 2 layers a stage here).
    interleaved = dict(tensor_parallel=1, pipeline_parallel=2, virtual_pipeline=2, recompute="full",
                       recompute_method="block", recompute_num_layers=2)
    assert estimate(model, Layout(**interleaved), work).parts["other layers"] == 0


@pytest.mark.parametrize("pp", [1, 2, 4])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_stage_parameters_add_up_to_the_model_at_every_split(tp, pp):
    from mmpo_megatron.model.memory_plan import layer_parameters, stage_parameters

    model = ModelConfig(num_layers=8, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=688,
                        vocab_size=1000, make_vocab_size_divisible_by=128)
    whole = estimate(model, Layout(), Workload()).parameters
    stages = stage_parameters(model, tp, pp, 1000)
    replicated = 8 * (2 * 256) + 256  # norms sit whole on every TP rank
    assert sum(stages) * tp - (tp - 1) * replicated == whole
    assert layer_parameters(model, 2) < layer_parameters(model, 1)


def test_the_plan_answers_will_it_fit():
    llama70b = plan_layout.load_model("llama3_70b")
    work = Workload(micro_batch_size=1, max_length=2312)
    rows = plan(llama70b, 32, 80, work)
    assert rows[0].fits and rows[0].estimate.total < 0.9 * 80 * 2**30
    assert all(r.layout.gpus == 32 for r in rows)
    # Adam alone needs 70.6B x 16 bytes = 1.1 TB: eight 80 GB GPUs cannot hold it at any layout.
    assert not any(r.fits for r in plan(llama70b, 8, 80, work))
    # A resident reference costs one more copy of the stage's weights.
    resident = Workload(micro_batch_size=1, max_length=2312, reference="resident")
    layout = Layout(8, 4, 1, recompute="selective")
    assert estimate(llama70b, layout, resident).total - estimate(llama70b, layout, work).total == pytest.approx(
        estimate(llama70b, layout, work).weights)
    # Recompute and sequence parallelism lower activations, in that order of strength.
    acts = {
        rc: estimate(llama70b, Layout(8, 4, 1, recompute=rc), work).activations for rc in ("none", "selective", "full")
    }
    assert acts["none"] > acts["selective"] > acts["full"]
    assert estimate(llama70b, Layout(8, 4, 1, sequence_parallel=False), work).activations > acts["none"]
    assert all(llama70b.num_attention_heads % layout.tensor_parallel == 0 for layout in candidate_layouts(llama70b, 32))


def test_the_tool_prints_a_table_and_refuses_an_unknown_model(capsys, tmp_path):
    assert plan_layout.main(["--model", "llama3_8b", "--gpus", "16", "--max-length", "2312", "--top", "3",
                             "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "| TP x PP x DP |" in out and out.count("\n| ") >= 4
    assert plan_layout.main(["--model", str(tmp_path / "nothing")]) == 2
    assert "--model" in capsys.readouterr().err
