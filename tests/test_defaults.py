"""What a new user meets first, with only the flags they would pass: model=from_hf at any TP/PP,
score_pairs on a local file, converters that keep the weights' dtype, a prompt limit that follows
max_length, the config schema on the command line, start-up checks, a demo that trains every time,
and damaged checkpoints."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmpo_megatron.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DataSourceConfig,
    LoggingConfig,
    OptimConfig,
    PrecisionConfig,
    TrainConfig,
    TrainerConfig,
)
from mmpo_megatron.parallel.local_ranks import run_on_ranks
from tiny_models import tiny_model
from tool_runs import tool_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
QUIET = {**os.environ, "MMPO_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore"}

# Llama-3-8B's config.json (the fields the translation reads).
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
             "torch_dtype": "bfloat16"}
# A tiny Llama whose 9 heads / 3 KV heads split only at TP 1, 3 or 9 (SmolLM2-135M's head counts).
NINE_HEADS = {"model_type": "llama", "hidden_size": 72, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 384, "max_position_embeddings": 128,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu",
              "torch_dtype": "float32"}


def compose(*overrides, config_name="train_mmpo"):
    """The TrainConfig the entry script would build from these command-line overrides."""
    from mmpo_megatron.config import compose_config

    return compose_config(config_name, overrides, CONFIGS)


def write_hf_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ------------------------------------------------------------------------------------ config schema


def _override_value(field: dataclasses.Field, current):
    """A valid command-line value for a field, different from its default."""
    kind = str(field.type)
    if "bool" in kind:
        return "true" if not current else "false"
    if "list" in kind:
        return '[{path:embedded,split:"train[:8]"}]'
    if "dict" in kind:
        return "{prompt:q,chosen:a,rejected:b}"
    if "float" in kind:
        return "0.25"
    if "int" in kind:
        return str((current or 1) + 1)
    return "somewhere_else" if field.name in ("output_dir", "name", "wandb_project") else None


def test_every_config_field_overrides_on_every_preset_and_is_type_checked():
    """The YAML presets extend the TrainConfig schema: a key a preset does not list still exists."""
    from hydra.errors import ConfigCompositionException

    sections = {f.name: f.type for f in dataclasses.fields(TrainConfig) if f.name != "device"}
    defaults = TrainConfig()
    overrides = []
    for section in sections:
        for field in dataclasses.fields(getattr(defaults, section)):
            value = _override_value(field, getattr(getattr(defaults, section), field.name))
            if value is not None:
                overrides.append((f"{section}.{field.name}", value))
    assert len(overrides) > 60, len(overrides)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mmpo_megatron.config import register_hydra_schema

    register_hydra_schema()

    presets = [("model=tiny", "loss=mmpo"), ("model=llama3_8b", "loss=dpo"), ("model=smollm2_135m", "loss=simpo"),
               ("model=from_hf", "loss=ipo"), ("data=paper_mix", "parallel=llama3_8b_2x8")]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        for preset in presets:
            composed = hydra_compose(config_name="train_mmpo", overrides=[*preset, *(f"{k}={v}" for k, v in overrides)])
            for key, value in overrides:
                section, name = key.split(".")
                got = composed[section][name]
                if value in ("true", "false"):
                    assert got is (value == "true"), (preset, key)
                elif "{" not in value and "[" not in value:
                    assert str(got) == value, (preset, key, got)
        # Types are checked at composition, naming the key.
        with pytest.raises(ConfigCompositionException, match="train.global_batch_size"):
            hydra_compose(config_name="train_mmpo", overrides=["train.global_batch_size=abc"])
    # The README's example and the keys the issue found refused before.
    cfg = compose("data.packing=true", "data.pack_length=4096", "model.fused_logprob_chunk=0", "loss=dpo",
                  "loss.aux_weight=0.3", "parallel.timeout_minutes=5", "model=llama3_8b",
                  "model.make_vocab_size_divisible_by=64", "model.layer_spec=local_sdpa")
    assert (cfg.data.packing, cfg.data.pack_length, cfg.model.fused_logprob_chunk, cfg.loss.name, cfg.loss.aux_weight,
            cfg.parallel.timeout_minutes, cfg.model.num_layers, cfg.model.make_vocab_size_divisible_by) == (
        True, 4096, 0, "dpo", 0.3, 5, 32, 64)


def test_a_required_preset_key_stays_required():
    with pytest.raises(ConfigError, match=r"^model.from_hf: required"):
        compose("model=from_hf")
    with pytest.raises(ConfigError, match=r"^data.tokenizer: required"):
        compose("data=paper_mix")
    # Given, they resolve (the HF shape is read later, before validation).
    cfg = compose("data=paper_mix", "data.tokenizer=/models/tok", "model=from_hf", "model.from_hf=/models/x")
    assert cfg.data.tokenizer == "/models/tok" and cfg.model.from_hf == "/models/x"
    assert compose("model=from_hf", "model.from_hf=/m").model.layer_spec == "local_sdpa"  # the preset's own keys stay


# ------------------------------------------------------------------------------------ from_hf and start-up checks


def test_from_hf_shape_is_validated_not_the_default_tiny_one(tmp_path):
    from mmpo_megatron.train.preflight import preflight

    folder = write_hf_config(tmp_path / "llama3_8b", LLAMA3_8B)
    cfg = compose("model=from_hf", f"model.from_hf={folder}", "parallel.tensor_parallel=8",
                  "parallel.pipeline_parallel=4", "train.micro_batch_size=1", "train.global_batch_size=128")
    checked = preflight(cfg, world_size=32)  # validation only: no process starts
    assert (checked.model.num_attention_heads, checked.model.num_layers, checked.model.vocab_size) == (32, 32, 128256)
    assert checked.model.layer_spec == "local_sdpa" and checked.model.fused_logprob_chunk == 1024  # the preset's knobs
    # A layout the HF model does not split into fails with the HF model's numbers.
    with pytest.raises(ConfigError, match="parallel.tensor_parallel: 3 must divide model.num_attention_heads=32"):
        preflight(compose("model=from_hf", f"model.from_hf={folder}", "parallel.tensor_parallel=3"), world_size=3)
    with pytest.raises(ConfigError, match="model.from_hf: .*no config.json"):
        preflight(compose("model=from_hf", f"model.from_hf={tmp_path / 'nothing'}"), world_size=1)


def test_start_up_checks_run_before_any_work(tmp_path):
    """Checks that need the machine fail like config errors: before data, processes or the run folder."""
    from mmpo_megatron.train.preflight import preflight

    # A TP that does not divide the padded vocabulary (263 tokens -> 272 with a unit of 16).
    cfg = compose("model.num_attention_heads=6", "model.num_query_groups=3", "model.hidden_size=48",
                  "parallel.tensor_parallel=3", "train.global_batch_size=6", "train.micro_batch_size=2")
    with pytest.raises(ConfigError, match="model.make_vocab_size_divisible_by: 16 gives a vocab of 272, which "
                                          "tensor_parallel=3 does not divide"):
        preflight(cfg, world_size=3)
    with pytest.raises(ConfigError, match="model.vocab_size: 100 is smaller than the tokenizer's 263 tokens"):
        preflight(compose("model.vocab_size=100"), world_size=1)
    with pytest.raises(ConfigError, match="data.tokenizer: tokenizer folder '/no/such/tok' does not exist"):
        preflight(compose("data.tokenizer=/no/such/tok"), world_size=1)
    # Through the entry script: FP8 on a machine without TE / an FP8 GPU, and a TP the heads do not
    # allow, each exit 2 with one line; nothing was tokenised or written.
    out = tmp_path / "run"
    cases = [(["precision.fp8=hybrid", "model.layer_spec=transformer_engine", "device=cpu"], {}),
             (["--config-name", "train_demo", "parallel.tensor_parallel=3"], {"WORLD_SIZE": "3"})]
    results = run_on_ranks(
        entry_script,
        1,
        [(args + [f"train.output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"], env) for args, env in cases],
    )[0]
    expected = ["config error: model.layer_spec: transformer_engine needs",
                "config error: parallel.tensor_parallel: 3 must divide model.num_attention_heads=4"]
    for (code, stderr), line in zip(results, expected, strict=True):
        assert code == 2, stderr[-2000:]
        assert stderr.strip().splitlines()[-1].startswith(line), stderr[-2000:]
        assert "Traceback" not in stderr
    assert not out.exists()


def entry_script(cases):
    """examples/train_mmpo.py run as `python examples/train_mmpo.py ARGS` runs it (Hydra's parser, the
    exit code, stderr), once per (args, environment) case, in this pooled rank: (exit code, stderr)."""
    import contextlib
    import io
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    script = str(REPO / "examples/train_mmpo.py")
    results = []
    for args, env in cases:
        saved_argv, saved_env, stderr = sys.argv, dict(os.environ), io.StringIO()
        sys.argv, code = [script, *args], 0
        os.environ.update(env, MMPO_NO_PROGRESS="1")
        try:
            with contextlib.redirect_stderr(stderr):
                runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.argv = saved_argv
            os.environ.clear()
            os.environ.update(saved_env)
            GlobalHydra.instance().clear()
        results.append((code, stderr.getvalue()))
    return results


@pytest.mark.start_early(4)
@pytest.mark.xdist_group("many_ranks")  # one pytest worker: see Makefile
def test_from_hf_nine_heads_trains_at_tp3_with_no_shape_keys(tmp_path):
    """SmolLM2's 9 heads / 3 KV heads: model=from_hf at TP=3 through torchrun, and data.max_length alone."""
    folder = write_hf_config(tmp_path / "nine_heads", NINE_HEADS)
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--nproc-per-node", "3", str(REPO / "examples/train_mmpo.py"), "model=from_hf",
         f"model.from_hf={folder}", "parallel.tensor_parallel=3", "device=cpu", "data.max_length=24",
         'data.train=[{path:embedded,split:"train[:8]"}]', 'data.eval=[{path:embedded,split:"test[:6]"}]',
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=2", "train.eval_interval=2",
         "logging.progress_bar=false", "logging.tensorboard=false", f"train.output_dir={out}"],
        capture_output=True, text=True, timeout=400, env=QUIET, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(0, "eval"), (1, "train"), (2, "train"), (2, "eval")]
    state = json.loads((out / "checkpoints" / "step_0000002" / "trainer_state.json").read_text())
    assert state["layout"]["tensor_parallel"] == 3
    assert (state["model"]["num_attention_heads"], state["model"]["num_query_groups"]) == (9, 3)
    assert (
        state["train_config"]["data"]["max_length"] == 24 and state["train_config"]["data"]["max_prompt_length"] is None
    )


# ------------------------------------------------------------------------------------ prompt limits


def test_max_length_alone_works_everywhere(tmp_path):
    """A prompt limit nobody set follows max_length: in the trainer's config, the presets and inspect_data."""
    assert compose("data.max_length=256").data.max_prompt_length is None
    assert compose("data=paper_mix", "data.tokenizer=t", "data.max_length=256").data.max_length == 256
    assert compose(config_name="train_demo").data.max_prompt_length is None
    with pytest.raises(ConfigError, match=r"data.max_prompt_length: must be in \[1, max_length=256\), got 1800 "
                                          r"\(null lets it follow max_length\)"):
        compose("data.max_length=256", "data.max_prompt_length=1800")  # both given, and inconsistent
    import inspect_data

    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "x" * 400, "chosen": "yes", "rejected": "no"}) + "\n")
    assert inspect_data.main(["--data", str(path), "--max-length", "256", "--examples", "0",
                              "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pairs_kept"] == 1 and report["truncated_pairs"] == 1


def test_paper_recipes_keep_the_paper_prompt_limit():
    for recipe in ("smollm2_135m_mmpo", "llama3_8b_mmpo"):
        cfg = compose("data.tokenizer=/models/tok", config_name=recipe)
        assert (cfg.data.max_length, cfg.data.max_prompt_length) == (2312, 1800), recipe


# ------------------------------------------------------------------------------------ dtype-preserving conversion


def small_config(out, steps=3, **kw):
    return TrainConfig(
        device="cpu",
        model=tiny_model(),
        data=DataConfig(train=[DataSourceConfig(split="train[:16]")], eval=[DataSourceConfig(split="test[:8]")],
                        max_length=32, pad_to_multiple=8),
        precision=PrecisionConfig(dtype="fp32"),
        optim=kw.pop("optim", OptimConfig(lr=1e-3, warmup_ratio=0.0)),
        train=TrainerConfig(global_batch_size=8, micro_batch_size=2, max_steps=steps, eval_interval=0,
                            output_dir=str(out), overwrite_output_dir=kw.pop("overwrite", False)),
        checkpoint=kw.pop("checkpoint", CheckpointConfig()),
        logging=LoggingConfig(tensorboard=False, progress_bar=False),
    )


def train(cfg):
    from mmpo_megatron.train.trainer import run_training

    return run_training(cfg)


def run_tool(*args, cwd):
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, env=QUIET,
                          cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def score_and_narrow(root, pairs):
    """score_pairs through its own argument parser on both checkpoints, then a forced bf16 export."""
    import contextlib
    import io

    import score_pairs

    from mmpo_megatron.convert import convert_megatron_to_hf

    root = Path(root)
    out = {}
    for name, checkpoint in (("trained", root / "run" / "checkpoints"), ("reimported", root / "mcore")):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = score_pairs.main(["--checkpoint", str(checkpoint), "--data", str(pairs), "--max-length", "40",
                                     "--output", str(root / f"{name}.jsonl")])
        out[name] = (
            code,
            printed.getvalue(),
            [json.loads(line) for line in (root / f"{name}.jsonl").read_text().splitlines()],
        )
    warned = io.StringIO()
    with contextlib.redirect_stderr(warned), contextlib.redirect_stdout(io.StringIO()):
        convert_megatron_to_hf(root / "run", root / "hf_bf16", dtype="bf16")
    out["narrowing"] = warned.getvalue()
    return out


@pytest.mark.start_early(5)
def test_fp32_run_exported_and_reimported_with_default_flags_scores_like_the_trained_checkpoint(tmp_path):
    run_on_ranks(train, 1, small_config(tmp_path / "run", steps=3))
    # The converters as a user runs them: subprocesses, default flags, exit codes.
    export = run_tool(REPO / "tools/convert_megatron_to_hf.py", "--checkpoint", tmp_path / "run", "--output",
                      tmp_path / "hf", cwd=tmp_path)
    assert "export dtype: fp32 (the checkpoint's weights are fp32)" in export.stdout
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float32"
    imported = run_tool(REPO / "tools/convert_hf_to_megatron.py", "--hf-model", tmp_path / "hf", "--output",
                        tmp_path / "mcore", cwd=tmp_path)
    assert "weights: fp32" in imported.stdout
    # A user's local file with no --split, and --max-length alone.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n"
            for a, b in [(12, 7), (40, 3), (9, 9), (25, 17), (3, 88), (61, 1)]
        )
    )
    out = run_on_ranks(score_and_narrow, 1, str(tmp_path), str(pairs))[0]
    for name in ("trained", "reimported"):
        code, printed, _ = out[name]
        assert code == 0 and f"scored 6 pairs of {pairs} (split 'train'" in printed, printed
    trained, reimported = out["trained"][2], out["reimported"][2]
    assert [r["index"] for r in trained] == list(range(6)) == [r["index"] for r in reimported]
    for a, b in zip(trained, reimported):
        assert (
            abs(a["chosen_logps"] - b["chosen_logps"]) < 1e-4 and abs(a["rejected_logps"] - b["rejected_logps"]) < 1e-4
        )
    # Forcing bf16 onto these fp32 weights is allowed, with the measured cost said.
    warning = [line for line in out["narrowing"].splitlines() if line.startswith("warning: --dtype bf16 rounds")]
    assert warning and float(warning[0].split("up to ")[1].split(" nats")[0]) > 0, out["narrowing"]
    assert json.loads((tmp_path / "hf_bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_hf_weight_dtype_follows_the_config():
    from mmpo_megatron.convert.checkpoints import hf_weight_dtype

    assert hf_weight_dtype({"torch_dtype": "bfloat16"}) == "bf16"
    assert hf_weight_dtype({"dtype": "bfloat16"}) == "bf16"  # transformers 5
    assert hf_weight_dtype({"torch_dtype": "float32"}) == "fp32"
    assert hf_weight_dtype({"torch_dtype": "float16"}) == "fp32"  # bf16 would round fp16's mantissa
    assert hf_weight_dtype({}) == "fp32"


# ------------------------------------------------------------------------------------ run folders and checkpoints


def run_folder_cases(root):
    """A finished run started again: resumes (nothing to train), trains on with a larger max_steps,
    or, with overwrite, trains afresh; damaged newest checkpoint: resume from the intact one; all
    damaged: an error naming them."""
    import contextlib
    import io

    from mmpo_megatron.model.checkpoint import DamagedCheckpointError

    root = Path(root)
    out = {}
    first = train(small_config(root / "again", steps=2))
    out["resumed"] = train(small_config(root / "again", steps=2))
    out["overwritten"] = train(small_config(root / "again", steps=2, overwrite=True))
    out["first"] = first
    out["metrics_lines"] = len((root / "again" / "metrics.jsonl").read_text().splitlines())

    # A finished 4-step run started again with train.max_steps=8 (as the "nothing to train" message
    # suggests) and another peak and minimum lr: steps 5-8 follow the new 8-step schedule, as a
    # fresh 8-step run's.
    train(small_config(root / "longer", steps=4, optim=OptimConfig(lr=1e-3, warmup_ratio=0.25, decay_style="cosine")))
    schedule = OptimConfig(lr=2e-3, min_lr=1e-4, warmup_ratio=0.25, decay_style="cosine")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out["longer"] = train(small_config(root / "longer", steps=8, optim=schedule))
    out["longer_printed"] = printed.getvalue()
    out["fresh_8"] = train(small_config(root / "fresh_8", steps=8, optim=schedule))

    # A user's file with a bad row: the run skips and counts it, and data_report.json says which.
    rows = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(16)]
    rows.insert(5, {"prompt": "1+1=", "chosen": None, "rejected": "3"})
    (root / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = small_config(root / "report", steps=1)
    cfg.data.train, cfg.data.eval = [DataSourceConfig(path=str(root / "mine.jsonl"))], None
    train(cfg)
    out["report"] = json.loads((root / "report" / "data_report.json").read_text())

    every_step = CheckpointConfig(save_interval=1, keep_last=5)
    train(small_config(root / "damaged", steps=2, checkpoint=every_step))
    shutil.copytree(root / "damaged", root / "all_damaged")
    for folder, steps in ((root / "damaged", [2]), (root / "all_damaged", [1, 2])):
        for step in steps:
            shard = sorted((folder / "checkpoints" / f"step_{step:07d}").glob("*.distcp"))[0]
            shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a full disk
    out["after_damage"] = train(small_config(root / "damaged", steps=3, checkpoint=every_step))
    try:
        train(small_config(root / "all_damaged", steps=3, checkpoint=every_step))
    except DamagedCheckpointError as exc:
        out["all_damaged"] = str(exc)
    return out


def test_run_folders_restart_resume_and_survive_a_damaged_checkpoint(tmp_path, caplog):
    out = run_on_ranks(run_folder_cases, 1, str(tmp_path))[0]
    assert [r["step"] for r in out["first"]] == [1, 2]
    assert out["resumed"] == []  # auto-resume of a finished run: nothing left
    assert [r["step"] for r in out["overwritten"]] == [1, 2]  # afresh
    assert out["overwritten"][1]["loss"] == out["first"][1]["loss"]
    assert out["metrics_lines"] == 2  # the earlier run's lines went with it
    longer = {r["step"]: r["lr"] for r in out["longer"]}
    fresh = {r["step"]: r["lr"] for r in out["fresh_8"]}
    assert sorted(longer) == [5, 6, 7, 8]
    assert [longer[s] for s in (5, 6, 7, 8)] == [fresh[s] for s in (5, 6, 7, 8)]
    assert len(set(longer.values())) == 4 and min(longer.values()) > 1e-4  # decaying, not stuck at min_lr
    assert out["longer_printed"].count("learning-rate schedule: this run's config, not the checkpoint's") == 1
    assert "(max_lr 0.001 -> 0.002, min_lr 0.0 -> 0.0001, lr_warmup_steps 1 -> 2, lr_decay_steps 4 -> 8)" in \
        out["longer_printed"], out["longer_printed"]
    # step_2 truncated: resumed from step_1, so steps 2 and 3 train again.
    assert [r["step"] for r in out["after_damage"] if r["split"] == "train"] == [2, 3]
    assert "step_0000001" in out["all_damaged"] and "step_0000002" in out["all_damaged"]
    assert "has 100 bytes" in out["all_damaged"]
    report = out["report"]
    assert (report["pairs_in"], report["pairs_kept"], report["dropped"]) == (17, 16, {"invalid_field": 1})
    (error,) = report["errors"]
    assert error["index"] == 5 and error["reason"] == "invalid_field" and "chosen" in error["error"]
    assert error["source"].endswith("mine.jsonl:train")


def test_checkpoint_manifest_detects_truncation_and_missing_files(tmp_path):
    from mmpo_megatron.model.checkpoint import MANIFEST, DamagedCheckpointError, checkpoint_damage, resolve_checkpoint

    folder = tmp_path / "step_0000001"
    folder.mkdir()
    (folder / "a.distcp").write_bytes(b"x" * 50)
    (folder / "trainer_state.json").write_text("{}")
    (folder / MANIFEST).write_text(json.dumps({"a.distcp": 50, "common.pt": 10}))
    assert checkpoint_damage(folder) == "common.pt is missing"
    (folder / "common.pt").write_bytes(b"y" * 10)
    assert checkpoint_damage(folder) is None
    (folder / "a.distcp").write_bytes(b"x" * 49)
    assert checkpoint_damage(folder) == "a.distcp has 49 bytes, 50 were saved"
    with pytest.raises(DamagedCheckpointError, match="step_0000001 is damaged: a.distcp has 49 bytes"):
        resolve_checkpoint(folder)


# ------------------------------------------------------------------------------------ reference cache key


def test_reference_cache_key_covers_what_changes_reference_values():
    from mmpo_megatron.train.setup import reference_cache_key

    base = small_config("unused")

    def key(cfg, pack_length=None):
        return json.dumps(reference_cache_key(cfg, "weights@1", "cpu", 263, pack_length), sort_keys=True, default=str)

    changed = []
    for mutate in (
        lambda c: setattr(c.precision, "fp8", "hybrid"),
        lambda c: setattr(c.precision, "fp8_recipe", "tensorwise"),
        lambda c: setattr(c.precision, "dtype", "bf16"),
        lambda c: setattr(c.model, "layer_spec", "local_sdpa"),
    ):
        cfg = small_config("unused")
        mutate(cfg)
        changed.append(key(cfg) != key(base))
    assert changed == [True, True, True, True]
    assert key(base, pack_length=64) != key(base)
    # What does not change reference log-probs leaves the key alone: the cache is reused.
    cfg = small_config("elsewhere")
    cfg.optim.lr, cfg.loss.beta = 0.5, 0.3
    assert key(cfg) == key(base)


# ------------------------------------------------------------------------------------ the real run in bf16

# A small Llama saved as Hugging Face saves bf16 models; std 0.1 weights make its next-token
# distributions far from uniform, so its log-probs are far from a random initialisation's.
BF16_LLAMA = {"vocab_size": 288, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "rms_norm_eps": 1e-5, "initializer_range": 0.1, "tie_word_embeddings": False}


def save_bf16_llama(folder: Path) -> Path:
    """A seeded random Llama in bf16 safetensors with the embedded tokenizer, as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mmpo_megatron.data.tokenizer import build_byte_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(11)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**BF16_LLAMA), torch_dtype=torch.bfloat16)
    model.save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder


def real_run(root, dtype, checkpoint):
    """model=from_hf + checkpoint.load_weights at TP=2 on the converted folder, 3 steps, as on the command line."""
    cfg = compose("model=from_hf", f"model.from_hf={checkpoint}", f"checkpoint.load_weights={checkpoint}",
                  f"data.tokenizer={checkpoint}/tokenizer", "parallel.tensor_parallel=2", "device=cpu",
                  f"precision.dtype={dtype}", "data.max_length=48", 'data.train=[{path:embedded,split:"train[:24]"}]',
                  "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=3", "train.eval_interval=0",
                  "optim.lr=1e-3", "optim.warmup_ratio=0", "logging.progress_bar=false", "logging.tensorboard=false",
                  f"train.output_dir={Path(root) / dtype}")
    return train(cfg)


def real_runs(root):
    """Both runs' records, and the dtype each saved its trained weights in."""
    from mmpo_megatron.convert.checkpoints import saved_weight_dtype
    from mmpo_megatron.model.checkpoint import latest_checkpoint

    out = {dtype: real_run(root, dtype, Path(root) / f"mcore_{dtype}") for dtype in ("fp32", "bf16")}
    out["saved"] = {
        dtype: saved_weight_dtype(latest_checkpoint(Path(root) / dtype / "checkpoints")) for dtype in ("fp32", "bf16")
    }
    return out


# Measured on this path (bf16 vs fp32, steps 1 and 2): loss and log-probs within 1.5e-3 relative,
# gradient norm within 1.3e-3, margins within 0.009 nats. With the fp32 master weights left at the
# random initialisation (the fault this guards against) step 2 was 0.11 off in loss and 0.46 in
# gradient norm.
REAL_RUN_REL = {"loss": 5e-3, "logps/chosen": 5e-3, "logps/rejected": 5e-3, "rewards/chosen": 5e-3, "grad_norm": 5e-3}
REAL_RUN_MARGIN_ABS = 0.03


def test_the_real_run_path_in_bf16_tracks_fp32_from_the_loaded_weights(tmp_path):
    """HF folder (bf16 safetensors) -> convert_hf_to_megatron.py -> model=from_hf + checkpoint.load_weights
    at TP=2 in bf16, the GPU default: steps 1 and 2 track the same run in fp32."""
    save_bf16_llama(tmp_path / "hf")
    converter = str(REPO / "tools/convert_hf_to_megatron.py")
    results = run_on_ranks(tool_main, 1, converter, [
        ["--hf-model", str(tmp_path / "hf"), "--output", str(tmp_path / "mcore_bf16")],  # --dtype auto: bf16
        ["--hf-model", str(tmp_path / "hf"), "--output", str(tmp_path / "mcore_fp32"), "--dtype", "fp32"]])[0]
    assert [code for code, _, _ in results] == [0, 0], results
    assert "weights: bf16" in results[0][1], results[0][1]
    runs = run_on_ranks(real_runs, 2, str(tmp_path))[0]
    assert runs["saved"] == {"fp32": "fp32", "bf16": "bf16"}  # each run trained in its own dtype
    fp32, bf16 = ([r for r in runs[d] if r["split"] == "train"] for d in ("fp32", "bf16"))
    assert [r["step"] for r in bf16] == [1, 2, 3]
    assert fp32[1]["loss"] != fp32[0]["loss"]  # the steps move the model
    for a, b in zip(fp32[:2], bf16[:2]):
        for key, rel in REAL_RUN_REL.items():
            assert b[key] == pytest.approx(a[key], rel=rel), (a["step"], key)
        assert abs(b["rewards/margins"] - a["rewards/margins"]) < REAL_RUN_MARGIN_ABS, a["step"]
