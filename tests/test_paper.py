"""What reproducing the paper needs beyond training: the run watching its language-modelling NLL
on a corpus (the paper's second claim), exports that generate and stop, generations for
AlpacaEval, and the loss x beta sweep sharing one reference cache, tabulated and plotted."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from mmpo_megatron.config import (
    CheckpointConfig,
    DataConfig,
    DataSourceConfig,
    EvalConfig,
    LoggingConfig,
    LossConfig,
    OptimConfig,
    ParallelConfig,
    ReferenceConfig,
    TrainConfig,
    TrainerConfig,
)
from mmpo_megatron.parallel.local_ranks import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
DOCUMENTS = ["The cat sat on the mat.", "12+7=19", "Preference optimisation keeps the language model's abilities.",
             "a", "short text", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16"]

# The shape of this file's tiny HF models (a Llama and a Mistral).
TINY_HF_SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny fp32 Llama (transformers) with the embedded tokenizer, converted to megatron."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mmpo_megatron.convert import convert_hf_to_megatron
    from mmpo_megatron.data.tokenizer import build_byte_tokenizer

    root = tmp_path_factory.mktemp("paper")
    config = LlamaConfig(
        **TINY_HF_SHAPE,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(root / "hf")
    build_byte_tokenizer().save_pretrained(root / "hf")
    run_on_ranks(convert_hf_to_megatron, 1, root / "hf", root / "mcore", dtype="fp32")
    with torch.random.fork_rng():  # other weights of the same shape: a reference that is not the policy
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).save_pretrained(root / "hf_other")
    build_byte_tokenizer().save_pretrained(root / "hf_other")
    run_on_ranks(convert_hf_to_megatron, 1, root / "hf_other", root / "mcore_other", dtype="fp32")
    (root / "corpus.txt").write_text("\n".join(DOCUMENTS) + "\n")
    return root


def small_run(root: Path, name: str, *, tp: int = 1, steps: int = 2, loss: LossConfig | None = None, **sections):
    from mmpo_megatron.convert.checkpoints import read_hf_config
    from mmpo_megatron.convert.llama import model_config_from_hf

    model = dataclasses.replace(model_config_from_hf(read_hf_config(root / "mcore")), make_vocab_size_divisible_by=16)
    return TrainConfig(
        device="cpu", model=model, loss=loss or LossConfig(name="mmpo", aux_weight=0.5),
        data=DataConfig(train=[DataSourceConfig(split="train[:16]")], eval=[DataSourceConfig(split="test[:6]")],
                        max_length=32, pad_to_multiple=8, tokenizer=str(root / "mcore" / "tokenizer")),
        parallel=ParallelConfig(tensor_parallel=tp),
        optim=sections.pop("optim", OptimConfig(lr=1e-2, warmup_ratio=0.0)),
        train=TrainerConfig(global_batch_size=8, micro_batch_size=2, max_steps=steps, eval_interval=steps,
                            output_dir=str(root / name)),
        checkpoint=CheckpointConfig(load_weights=str(root / "mcore")),
        reference=sections.pop("reference", ReferenceConfig()),
        eval=sections.pop("eval", EvalConfig()),
        logging=LoggingConfig(tensorboard=False, progress_bar=False),
    )


def train(cfg):
    from mmpo_megatron.train.trainer import run_training

    return run_training(cfg)


# ------------------------------------------------------------------------------------------ capability tracking


def hf_corpus_nll(root: Path, max_length: int, folder: str = "hf") -> float:
    """The corpus's mean per-token NLL under transformers' own forward of the HF model, in float64."""
    from transformers import AutoModelForCausalLM

    from mmpo_megatron.data.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(root / folder, torch_dtype=torch.float64).eval()
    tokenizer = load_tokenizer(str(root / folder))
    total, count = 0.0, 0
    with torch.no_grad():
        for text in DOCUMENTS:
            tokens = torch.tensor(tokenizer(text)["input_ids"][:max_length])
            if len(tokens) < 2:
                continue
            logits = model(tokens[None]).logits[0, :-1]
            total -= float(logits.log_softmax(-1).gather(-1, tokens[1:, None]).sum())
            count += len(tokens) - 1
    return total / count


@pytest.mark.parametrize("tp,loss", [(2, "mmpo"), (1, "simpo")])
def test_the_run_watches_its_language_modelling_nll_on_a_corpus(tiny_hf, tp, loss):
    """eval.lm_data: lm/nll at the start equals transformers' float64 NLL of the same documents (at
    TP=2 through the trainer's scoring); the reference's (precomputed for MMPO, the starting policy
    for reference-free SimPO) equals it; after training the delta is the difference."""
    root = tiny_hf
    cfg = small_run(root, f"lm_{loss}_tp{tp}", tp=tp, loss=LossConfig(name=loss),
                    eval=EvalConfig(lm_data=str(root / "corpus.txt"), lm_max_length=24))
    records = [r for r in run_on_ranks(train, tp, cfg)[0] if r["split"] == "eval"]
    start, end = records[0], records[-1]
    assert [r["step"] for r in records] == [0, 2]
    expected = hf_corpus_nll(root, 24)
    assert start["lm/nll"] == pytest.approx(expected, rel=1e-5) and start["lm/nll_ref"] == pytest.approx(
        expected, rel=1e-5
    )
    assert start["lm/nll_delta"] == pytest.approx(0.0, abs=1e-5)
    assert end["lm/nll"] != pytest.approx(start["lm/nll"], rel=1e-4)  # training moved it
    assert end["lm/nll_delta"] == pytest.approx(end["lm/nll"] - end["lm/nll_ref"], abs=1e-9)
    assert end["lm/nll_ref"] == start["lm/nll_ref"]  # scored once


def lm_reference_runs(root):
    """MMPO with a reference of other weights; SimPO (reference-free) saved at step 1, then resumed
    from it on the same corpus and on the corpus cut shorter."""
    from run_folders import seed_run_folder

    root = Path(root)
    corpus = EvalConfig(lm_data=str(root / "corpus.txt"), lm_max_length=24)
    out = {
        "other_reference": train(
            small_run(
                root,
                "lm_other_ref",
                loss=LossConfig(name="mmpo"),
                eval=corpus,
                reference=ReferenceConfig(mode="precompute", checkpoint=str(root / "mcore_other")),
            )
        )
    }

    def simpo(name, lm_max_length=24):
        cfg = small_run(
            root, name, loss=LossConfig(name="simpo"), eval=dataclasses.replace(corpus, lm_max_length=lm_max_length)
        )
        cfg.checkpoint = dataclasses.replace(cfg.checkpoint, save_interval=1, keep_last=2)
        return cfg

    out["simpo"] = train(simpo("lm_simpo"))
    for name, length in (("simpo_resumed", 24), ("simpo_other_corpus", 20)):
        seed_run_folder(root / "lm_simpo", root / name, 1, reference_cache=False)
        out[name] = train(simpo(name, length))
    return out


def test_the_lm_reference_is_the_reference_and_survives_a_resume(tiny_hf):
    """lm/nll_ref is the reference's NLL when the reference is other weights (transformers' float64
    NLL of those), not the policy's; a reference-free run keeps its starting policy's NLL across a
    resume, and drops it (no delta) when the corpus changed."""
    root = tiny_hf
    runs = run_on_ranks(lm_reference_runs, 1, str(root))[0]
    start = [r for r in runs["other_reference"] if r["split"] == "eval"][0]
    assert start["lm/nll"] == pytest.approx(hf_corpus_nll(root, 24), rel=1e-5)
    assert start["lm/nll_ref"] == pytest.approx(hf_corpus_nll(root, 24, "hf_other"), rel=1e-5)
    # Two random tiny models sit near ln(vocab) alike: 1.8e-3 apart, 30x the tolerance above.
    assert abs(start["lm/nll_ref"] - start["lm/nll"]) > 20 * 1e-5 * start["lm/nll"]
    first = [r for r in runs["simpo"] if r["split"] == "eval"]
    resumed = [r for r in runs["simpo_resumed"] if r["split"] == "eval"]
    assert [r["step"] for r in resumed] == [2]
    assert resumed[0]["lm/nll_ref"] == first[0]["lm/nll_ref"]
    assert resumed[0]["lm/nll"] == pytest.approx(first[-1]["lm/nll"], rel=1e-6)
    (changed,) = [r for r in runs["simpo_other_corpus"] if r["split"] == "eval"]
    assert "lm/nll" in changed and "lm/nll_ref" not in changed and "lm/nll_delta" not in changed


# ------------------------------------------------------------------------------------------ exports that generate


def export_after_training(root, source, name, load):
    """Convert an HF folder (if given), train 2 steps from it (or from the seeded init), export with
    the converter's default flags."""
    from mmpo_megatron.convert import convert_hf_to_megatron
    from mmpo_megatron.parallel import destroy_parallel
    from tool_runs import tool_main

    root = Path(root)
    if load:
        convert_hf_to_megatron(root / source, root / f"{source}_mcore", dtype="fp32")
        destroy_parallel(destroy_process_group=True)
    cfg = small_run(root, name, optim=OptimConfig(lr=1e-6, warmup_ratio=0.0))
    if load:
        from mmpo_megatron.convert.checkpoints import read_hf_config
        from mmpo_megatron.convert.llama import model_config_from_hf

        cfg.model = dataclasses.replace(
            model_config_from_hf(read_hf_config(root / f"{source}_mcore")), make_vocab_size_divisible_by=16
        )
        cfg.checkpoint = CheckpointConfig(load_weights=str(root / f"{source}_mcore"))
        cfg.data.tokenizer = str(root / f"{source}_mcore" / "tokenizer")
    else:
        cfg.checkpoint, cfg.data.tokenizer = CheckpointConfig(), "embedded"
    train(cfg)
    return tool_main(str(REPO / "tools/convert_megatron_to_hf.py"),
                     [["--checkpoint", str(root / name), "--output", str(root / f"{name}_hf")]])[0]


def test_an_exported_model_generates_and_stops_at_the_source_models_end_of_turn(tiny_hf):
    """The source model's generation config (its end-of-turn token), token ids, model type and
    tokenizer travel from import through training to export: transformers' generate stops there.
    A checkpoint trained from the seeded initialisation exports with its tokenizer's ids."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, MistralConfig

    root = tiny_hf
    # The token the model emits first after this prompt stands for a chat model's end-of-turn token.
    shutil.copytree(root / "hf", root / "chat")
    model = AutoModelForCausalLM.from_pretrained(root / "chat", torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "chat")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    end_of_turn = int(model(prompt).logits[0, -1].argmax())
    assert end_of_turn != tokenizer.eos_token_id
    GenerationConfig(bos_token_id=1, eos_token_id=[end_of_turn, 2], pad_token_id=0, do_sample=False).save_pretrained(
        root / "chat"
    )
    # A Mistral: its model type must survive (it exported as llama).
    with torch.random.fork_rng():
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(
            MistralConfig(**TINY_HF_SHAPE, sliding_window=None)
        ).save_pretrained(root / "mistral")
    shutil.copy2(root / "hf" / "tokenizer.json", root / "mistral")
    shutil.copy2(root / "hf" / "tokenizer_config.json", root / "mistral")
    results = {
        name: run_on_ranks(export_after_training, 1, str(root), source, name, load)[0]
        for name, source, load in (
            ("chat_run", "chat", True),
            ("mistral_run", "mistral", True),
            ("random_run", None, False),
        )
    }
    assert all(code == 0 for code, _, _ in results.values()), results
    exported = AutoModelForCausalLM.from_pretrained(root / "chat_run_hf", torch_dtype=torch.float32).eval()
    assert exported.generation_config.eos_token_id == [end_of_turn, 2]
    out = exported.generate(prompt, max_new_tokens=12, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 1 and int(out[0, -1]) == end_of_turn  # stopped at the end of turn
    exported_tokenizer = AutoTokenizer.from_pretrained(root / "chat_run_hf")
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    assert json.loads((root / "mistral_run_hf" / "config.json").read_text())["model_type"] == "mistral"
    random = json.loads((root / "random_run_hf" / "config.json").read_text())
    assert (random["bos_token_id"], random["eos_token_id"], random["pad_token_id"]) == (1, 2, 0)  # the tokenizer's
    assert json.loads((root / "random_run_hf" / "generation_config.json").read_text())["eos_token_id"] == 2


def test_generations_for_alpaca_eval_from_a_checkpoint_and_from_an_hf_folder(tiny_hf, tmp_path):
    """tools/generate.py writes AlpacaEval's model-outputs format; a megatron checkpoint (exported on
    the fly) and the HF folder it came from generate the same text with the same seed."""
    from tool_runs import tool_main

    root = tiny_hf
    prompts = tmp_path / "alpaca.json"
    prompts.write_text(json.dumps([{"instruction": "Say hi", "dataset": "x"}, {"instruction": "What is 2+2?"},
                                   {"instruction": "Name a colour"}]))
    argv = ["--prompts", str(prompts), "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu"]
    results = run_on_ranks(tool_main, 1, str(REPO / "tools/generate.py"), [
        ["--model", str(root / "hf"), "--output", str(tmp_path / "hf.json"), *argv],
        ["--model", str(root / "mcore"), "--output", str(tmp_path / "mcore.json"), "--generator", "tiny", *argv]])[0]
    assert [code for code, _, _ in results] == [0, 0], results
    from_hf, from_checkpoint = (json.loads((tmp_path / f).read_text()) for f in ("hf.json", "mcore.json"))
    assert [r["instruction"] for r in from_hf] == ["Say hi", "What is 2+2?", "Name a colour"]
    assert {r["generator"] for r in from_hf} == {"hf"} and {r["generator"] for r in from_checkpoint} == {"tiny"}
    assert [r["output"] for r in from_hf] == [r["output"] for r in from_checkpoint]
    assert any(r["output"] for r in from_hf)  # something was generated
    # Batching (left padding, the prompt sliced off) changes nothing: greedy, two a batch against one.
    greedy = [*argv, "--temperature", "0"]
    results = run_on_ranks(tool_main, 1, str(REPO / "tools/generate.py"), [
        ["--model", str(root / "hf"), "--output", str(tmp_path / "batched.json"), *greedy],
        ["--model", str(root / "hf"), "--output", str(tmp_path / "single.json"), *greedy, "--batch-size", "1"]])[0]
    assert [code for code, _, _ in results] == [0, 0], results
    batched, single = (json.loads((tmp_path / f).read_text()) for f in ("batched.json", "single.json"))
    assert [r["output"] for r in batched] == [r["output"] for r in single]
    assert len({r["output"] for r in single}) > 1  # the prompts lead to different text


# ------------------------------------------------------------------------------------------ the beta sweep


def sweep_runs(root):
    """An MMPO run, then DPO at another beta on the same data and weights with the same reference
    cache folder: the cache's files before and after the second run, and both runs' records."""
    root = Path(root)
    cache = root / "sweep" / "reference_cache"
    runs, files = {}, {}
    for name, loss in (
        ("mmpo-beta0.1", LossConfig(name="mmpo", beta=0.1)),
        ("dpo-beta0.5", LossConfig(name="dpo", beta=0.5)),
    ):
        cfg = small_run(
            root,
            f"sweep/{name}",
            loss=loss,
            reference=ReferenceConfig(mode="precompute", cache_dir=str(cache)),
            eval=EvalConfig(lm_data=str(root / "corpus.txt")),
        )
        runs[name] = train(cfg)
        files[name] = {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}
    return runs, files


def test_one_reference_cache_serves_the_sweep_and_compare_runs_tabulates_and_plots_it(tiny_hf, tmp_path):
    """The reference cache key holds no loss or beta: DPO at beta 0.5 reuses what MMPO at 0.1
    precomputed (no new or rewritten file; DPO starts at ln 2). tools/compare_runs.py then gives one
    row per run and a PNG."""
    from tool_runs import tool_main

    root = tiny_hf
    runs, files = run_on_ranks(sweep_runs, 1, str(root))[0]
    assert files["mmpo-beta0.1"] and files["dpo-beta0.5"] == files["mmpo-beta0.1"]
    first_dpo = [r for r in runs["dpo-beta0.5"] if r["split"] == "train"][0]
    assert first_dpo["loss"] == pytest.approx(math.log(2), abs=1e-6)
    folders = sorted(str(p) for p in (root / "sweep").iterdir())  # as a shell's sweep/* gives them
    assert str(root / "sweep" / "reference_cache") in folders
    code, stdout, stderr = run_on_ranks(
        tool_main,
        1,
        str(REPO / "tools/compare_runs.py"),
        [[*folders, "--png", str(tmp_path / "sweep.png"), "--table", str(tmp_path / "t.md")]],
    )[0][0]
    assert code == 0, stderr
    assert "skipped" in stderr and "reference_cache" in stderr
    rows = [line for line in stdout.splitlines() if line.startswith("| dpo") or line.startswith("| mmpo")]
    assert len(rows) == 2 and rows[0].startswith("| dpo | 0.5 | 2 |") and rows[1].startswith("| mmpo | 0.1 | 2 |")
    last_mmpo = [r for r in runs["mmpo-beta0.1"] if r["split"] == "eval"][-1]
    assert f"{last_mmpo['rewards/accuracies']:.4f}" in rows[1] and f"{last_mmpo['lm/nll_delta']:.4f}" in rows[1]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "t.md").read_text().count("\n") == 4
