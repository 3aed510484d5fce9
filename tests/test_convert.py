"""HF <-> Megatron conversion for the Llama family, checked against transformers' own forward
on tiny random models built here from transformers configs."""

import json
from pathlib import Path

import pytest
import torch

from mmpo_megatron.parallel.local_ranks import run_on_ranks
from tool_runs import tool_main

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300  # >= the embedded tokenizer's 263, so score_pairs can tokenise with it
SEQ = 12

ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def family_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    return {
        "llama3": LlamaConfig(**common, rope_parameters=ROPE_LLAMA3),
        "smollm2": LlamaConfig(
            **common, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}
        ),
        "mistral": MistralConfig(**common, sliding_window=None),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=False),
        "qwen3": Qwen3Config(**common, head_dim=16, tie_word_embeddings=False),
    }


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Save each tiny HF model (fp32, random) with the embedded tokenizer; logits on fixed tokens."""
    from transformers import AutoModelForCausalLM

    from mmpo_megatron.data.tokenizer import build_byte_tokenizer

    root = tmp_path_factory.mktemp("hf")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    out = {"root": root, "tokens": tokens, "logits": {}}
    # Seeded in a forked RNG: later tests' "fresh" random inputs must not replay this module's seed.
    with torch.random.fork_rng():
        for name, config in family_configs().items():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
            with torch.no_grad():
                for p in model.parameters():  # norms away from 1 so a mis-mapped norm shows
                    p.add_(torch.randn_like(p) * 0.02)
                out["logits"][name] = model(tokens).logits
            model.save_pretrained(root / name)
            build_byte_tokenizer().save_pretrained(root / name)
    return out


def test_the_mapping_table_names_every_hf_tensor_once():
    """Each family's table, expanded for a model, names exactly the HF model's own tensors."""
    from transformers import AutoModelForCausalLM

    from mmpo_megatron.convert.llama import mapping, model_config_from_hf

    for name, config in family_configs().items():
        model = model_config_from_hf(config.to_dict())
        hf_names = [h for _, names, _ in mapping(model) for h in names]
        with torch.device("meta"):
            expected = set(AutoModelForCausalLM.from_config(config).state_dict())
        if config.tie_word_embeddings:
            expected.discard("lm_head.weight")  # the same tensor as the embedding
        assert len(hf_names) == len(set(hf_names)), name
        assert set(hf_names) == expected, (name, set(hf_names) ^ expected)


def convert_and_forward(root, names, tokens):
    """HF -> megatron for each family (TP=1 logits), plus the round trip back to HF."""
    from mmpo_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf

    root = Path(root)
    for name in names:
        convert_hf_to_megatron(root / name, root / f"{name}_mcore", dtype="fp32")
        convert_megatron_to_hf(root / f"{name}_mcore", root / f"{name}_roundtrip", dtype="fp32")
    return megatron_logits(root, names, tokens)


def megatron_logits(root, names, tokens):
    """Full-vocab logits of each converted checkpoint under the current TP (gathered)."""
    from dataclasses import replace

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mmpo_megatron.config import ParallelConfig, PrecisionConfig
    from mmpo_megatron.convert.checkpoints import read_hf_config
    from mmpo_megatron.convert.llama import model_config_from_hf
    from mmpo_megatron.model.builder import build_model_chunks
    from mmpo_megatron.model.checkpoint import load_weights
    from mmpo_megatron.parallel import initialize_parallel

    if not ps.model_parallel_is_initialized():
        initialize_parallel(tensor_parallel=dist.get_world_size() if dist.is_initialized() else 1, device="cpu")
    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for name in names:
        # Logits, not log-probs: megatron's own output layer (the fused head returns hidden states).
        model = replace(model_config_from_hf(read_hf_config(Path(root) / f"{name}_mcore")), fused_logprob_chunk=0)
        chunks = build_model_chunks(
            model,
            ParallelConfig(tensor_parallel=tp, device="cpu"),
            PrecisionConfig(dtype="fp32"),
            vocab_size=VOCAB,
            device="cpu",
        )
        load_weights(Path(root) / f"{name}_mcore", chunks)
        positions = torch.arange(SEQ).unsqueeze(0).expand(tokens.shape[0], -1)
        with torch.no_grad():
            shard = chunks[0](tokens, positions, None)
        parts = [torch.empty_like(shard) for _ in range(tp)]
        dist.all_gather(parts, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
        out[name] = torch.cat(parts, dim=-1)[..., :VOCAB]
    return out


@pytest.mark.start_early(7)
def test_hf_to_megatron_logits_match_transformers_at_tp1_and_tp2_and_round_trip(hf_models):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, tokens = hf_models["root"], hf_models["tokens"]
    names = list(hf_models["logits"])
    tp1 = run_on_ranks(convert_and_forward, 1, str(root), names, tokens)[0]
    tp2 = run_on_ranks(megatron_logits, 2, str(root), names, tokens)
    for name in names:
        expected = hf_models["logits"][name]
        for label, got in (("tp1", tp1[name]), ("tp2 rank0", tp2[0][name]), ("tp2 rank1", tp2[1][name])):
            diff = (got - expected).abs().max().item()
            assert diff <= 1e-4, f"{name} {label}: max |megatron - transformers| logit difference {diff:.2e}"
        # Round trip: bit-identical tensors, and transformers loads the exported folder.
        original = load_file(str(root / name / "model.safetensors"))
        exported = load_file(str(root / f"{name}_roundtrip" / "model.safetensors"))
        assert original.keys() == exported.keys(), name
        for key in original:
            assert torch.equal(original[key], exported[key]), f"{name}: {key} changed in the round trip"
        reloaded = AutoModelForCausalLM.from_pretrained(root / f"{name}_roundtrip", torch_dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(tokens).logits, expected, rtol=0, atol=0)


def score_and_train(root):
    """score_pairs on the converted llama3 checkpoint at PP=2; then 2 training steps at TP=2 from it."""
    import argparse

    from score_pairs import score_pairs

    from mmpo_megatron.config import (
        CheckpointConfig,
        DataConfig,
        DataSourceConfig,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        ParallelConfig,
        TrainConfig,
        TrainerConfig,
    )
    from mmpo_megatron.train.trainer import run_training

    root = Path(root)
    score_pairs(argparse.Namespace(checkpoint=str(root / "llama3_mcore"), reference=None, data="embedded",
                                   split="test[:6]", format="auto", tokenizer=None, max_length=24, max_prompt_length=12,
                                   output=str(root / "scores_pp2.jsonl"), tp=1, pp=2, micro_batch_size=2, device="cpu"))
    cfg = TrainConfig(
        device="cpu",
        model=ModelConfig(from_hf=str(root / "llama3_mcore"), layer_spec="local", make_vocab_size_divisible_by=16),
        data=DataConfig(train=[DataSourceConfig(split="train[:16]")], eval=[DataSourceConfig(split="test[:4]")],
                        tokenizer=str(root / "llama3_mcore" / "tokenizer"), max_length=24, max_prompt_length=12,
                        pad_to_multiple=8),
        parallel=ParallelConfig(tensor_parallel=2),
        optim=OptimConfig(lr=1e-2, warmup_ratio=0.0),
        train=TrainerConfig(global_batch_size=4, micro_batch_size=2, max_steps=2, eval_interval=0,
                            output_dir=str(root / "trained")),
        checkpoint=CheckpointConfig(load_weights=str(root / "llama3_mcore")),
        logging=LoggingConfig(tensorboard=False, progress_bar=False),
    )
    run_training(cfg)
    return None


def export_and_compare(root, tokens):
    from mmpo_megatron.convert import convert_megatron_to_hf

    root = Path(root)
    convert_megatron_to_hf(root / "trained", root / "trained_hf", dtype="fp32")
    # Megatron's own logits of the trained checkpoint, at TP=1 (it was saved at TP=2).
    import shutil

    shutil.copytree(root / "trained" / "checkpoints" / "step_0000002", root / "trained_mcore")
    shutil.copy2(root / "llama3_mcore" / "hf_config.json", root / "trained_mcore" / "hf_config.json")
    return megatron_logits(root, ["trained"], tokens)["trained"]


def test_score_pairs_and_trained_checkpoint_export_match_transformers(hf_models):
    from transformers import AutoModelForCausalLM

    from mmpo_megatron.data.tokenizer import build_byte_tokenizer

    root, tokens = hf_models["root"], hf_models["tokens"]
    if not (root / "llama3_mcore").exists():
        run_on_ranks(convert_and_forward, 1, str(root), ["llama3"], tokens)
    run_on_ranks(score_and_train, 2, str(root))

    # score_pairs (PP=2) vs a plain transformers forward of the original HF model on the same tokens.
    tok = build_byte_tokenizer()
    hf = AutoModelForCausalLM.from_pretrained(root / "llama3", torch_dtype=torch.float32).eval()
    rows = [
        json.loads(line) for line in (REPO / "mmpo_megatron/data/demo/arith_test.jsonl").read_text().splitlines()[:6]
    ]
    scores = [json.loads(line) for line in (root / "scores_pp2.jsonl").read_text().splitlines()]
    assert [s["index"] for s in scores] == list(range(6))
    for row, score in zip(rows, scores):
        prompt = tok(row["prompt"])["input_ids"]
        for side in ("chosen", "rejected"):
            completion = tok(row[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
            expected = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion))
            assert score[f"{side}_logps"] == pytest.approx(expected, abs=1e-3), (row, side)

    # A trainer checkpoint (2 steps at TP=2) exports to HF, and its logits match megatron's.
    megatron = run_on_ranks(export_and_compare, 1, str(root), tokens)[0]
    exported = AutoModelForCausalLM.from_pretrained(root / "trained_hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = exported(tokens).logits
    assert (got - megatron).abs().max().item() <= 1e-4
    assert (got - hf_models["logits"]["llama3"]).abs().max().item() > 1e-3  # training changed the model


def test_bad_inputs_fail_clearly_and_leave_no_output(hf_models, tmp_path):
    from transformers import GPT2Config

    root = hf_models["root"]
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps(GPT2Config(n_layer=1, n_embd=16, n_head=2).to_dict()))
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((root / "llama3" / "config.json").read_text())
    data = (root / "llama3" / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases = [
        (["--hf-model", str(gpt2)], "model_type 'gpt2' is not supported"),
        (["--hf-model", str(truncated)], "truncated or corrupt"),
        (
            ["--hf-model", str(root / "llama3"), "--tp", "3"],
            "parallel.tensor_parallel: 3 must divide model.num_attention_heads=4",
        ),
    ]
    # Through the tool's own entry point (argument parser, exit code, stderr), on one pooled rank.
    argvs = [[*args, "--output", str(tmp_path / f"out{i}")] for i, (args, _) in enumerate(cases)]
    results = run_on_ranks(tool_main, 1, str(REPO / "tools/convert_hf_to_megatron.py"), argvs)[0]
    for i, ((code, _, stderr), (_, message)) in enumerate(zip(results, cases)):
        assert code == 2, stderr[-2000:]
        assert message in stderr, stderr[-2000:]
        assert not any(p.name.startswith(f"out{i}") for p in tmp_path.iterdir())


def sharded_export(root):
    from mmpo_megatron.convert import convert_megatron_to_hf

    convert_megatron_to_hf(Path(root) / "llama3_mcore", Path(root) / "llama3_sharded", dtype="fp32", shard_bytes=20_000)


def test_export_in_several_shards_loads_in_transformers(hf_models):
    from transformers import AutoModelForCausalLM

    root = hf_models["root"]
    if not (root / "llama3_mcore").exists():
        run_on_ranks(convert_and_forward, 1, str(root), ["llama3"], hf_models["tokens"])
    run_on_ranks(sharded_export, 1, str(root))
    index = json.loads((root / "llama3_sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((root / "llama3_sharded" / f).exists() for f in files)
    model = AutoModelForCausalLM.from_pretrained(root / "llama3_sharded", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(hf_models["tokens"]).logits, hf_models["logits"]["llama3"], rtol=0, atol=0)


def test_from_hf_takes_the_shape_and_keeps_our_own_knobs(hf_models):
    """model.from_hf: the HF config gives the shape; layer spec, vocab padding and the fused head stay ours."""
    from mmpo_megatron.config import ModelConfig
    from mmpo_megatron.train.preflight import model_from_hf

    folder = str(hf_models["root"] / "llama3")
    hf = json.loads((hf_models["root"] / "llama3" / "config.json").read_text())
    for chunk in (0, 256):
        ours = ModelConfig(from_hf=folder, layer_spec="local_sdpa", make_vocab_size_divisible_by=16,
                           fused_logprob_chunk=chunk, num_layers=99)
        got = model_from_hf(ours)
        assert (got.from_hf, got.layer_spec, got.make_vocab_size_divisible_by, got.fused_logprob_chunk) == (
            folder, "local_sdpa", 16, chunk)
        assert (got.num_layers, got.hidden_size) == (hf["num_hidden_layers"], hf["hidden_size"])


def test_table_layouts_name_their_parts_and_a_row_must_match_them():
    """Stacked splits by its named parts (not a fixed two); a row naming another count of HF
    tensors than its layout takes is refused when the table is written."""
    import torch

    from mmpo_megatron.config import ModelConfig
    from mmpo_megatron.convert.llama import LLAMA_TABLE, GroupedQKV, Row, Stacked

    three = [torch.randn(4, 6) for _ in range(3)]
    stacked = Stacked("a", "b", "c")
    back = stacked.to_hf(stacked.to_megatron(three, ModelConfig(), 0), ModelConfig())
    assert len(back) == 3 and all(torch.equal(x, y) for x, y in zip(back, three))
    assert all(len(row.hf) == len(row.layout.parts) for row in LLAMA_TABLE)
    with pytest.raises(ValueError, match=r"linear_fc1.weight: Stacked takes 2 HF tensors \('gate', 'up'\)"):
        Row("decoder.layers.{i}.mlp.linear_fc1.weight", ("gate_proj.weight",), Stacked("gate", "up"))
    with pytest.raises(ValueError, match="GroupedQKV takes 3"):
        Row("qkv", ("q", "k"), GroupedQKV())
