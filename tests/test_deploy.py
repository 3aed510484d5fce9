"""Configs, Dockerfile and Slurm script: everything they name exists and every config composes
and validates (no docker engine or cluster here, so these are static checks)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from hydra import compose, initialize_config_dir

from mmpo_megatron.config import register_hydra_schema, resolve_config
from mmpo_megatron.parallel.local_ranks import run_on_ranks
from tool_runs import tool_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
register_hydra_schema()  # the schema configs/train_mmpo.yaml extends, as the entry script registers it

TOP_LEVEL = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
GROUP_OPTIONS = sorted((g.name, p.stem) for g in CONFIGS.iterdir() if g.is_dir() for p in g.glob("*.yaml"))
# Keys a preset deliberately leaves to the user (``${required:KEY}``), filled here.
REQUIRED = {"data.tokenizer": "embedded", "model.from_hf": "unused"}


def composed(name, overrides=()):
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name=name, overrides=list(overrides))
    for key, value in REQUIRED.items():
        section, field = key.split(".")
        raw = OmegaConf.to_container(cfg[section], resolve=False).get(field)
        if isinstance(raw, str) and raw.startswith("${required:"):
            OmegaConf.update(cfg, key, value)
    return resolve_config(cfg)


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_configs_compose_and_validate(name):
    cfg = composed(name)
    mp = cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel
    # The smallest world with whole data-parallel replicas that split the global batch.
    world = next(
        w
        for w in range(mp, 64 * mp + 1, mp)
        if cfg.train.global_batch_size % (cfg.train.micro_batch_size * (w // mp)) == 0
    )
    cfg.validate_for_world(world)


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    """Every value the preset file states arrives in the typed config (lists of sources included)."""
    import dataclasses

    import yaml

    cfg = composed("train_mmpo", [f"{group}={option}"])
    stated = yaml.safe_load((CONFIGS / group / f"{option}.yaml").read_text())
    section = getattr(cfg, group)
    for key, value in stated.items():
        if isinstance(value, str) and value.startswith("${"):
            continue  # interpolations: the required marker, or the top-level device
        got = getattr(section, key)
        if isinstance(value, list):
            got = [{k: v for k, v in dataclasses.asdict(s).items() if k in item} for s, item in zip(got, value)]
        assert got == value, (group, option, key, got)


def test_large_model_recipes_lay_out_on_their_clusters():
    cfg = composed("llama3_8b_mmpo")
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel) == (4, 2)
    cfg.validate_for_world(16)  # 2 nodes x 8
    assert cfg.parallel.uses_sequence_parallel and cfg.parallel.overlap_grad_reduce and cfg.model.recompute == "none"
    cfg = composed("llama3_70b_mmpo")
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.virtual_pipeline) == (8, 4, None)
    cfg.validate_for_world(32)  # 4 nodes x 8
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (80, 8192, 64)
    assert cfg.parallel.uses_sequence_parallel and cfg.model.recompute == "none"
    assert cfg.data.max_prompt_length == 1800 and cfg.reference_mode == "precompute"
    # The paper's LoRA setups (its authors' recipes), the reference the base with adapters off.
    for recipe, (rank, targets, lr) in {
        "llama3_2_1b_mmpo_lora": (64, 7, 5e-4),
        "llama3_8b_mmpo_lora": (32, 4, 1e-4),
    }.items():
        cfg = composed(recipe)
        cfg.validate_for_world(8)
        lora = cfg.model.lora
        assert (lora.rank, lora.alpha, lora.dropout, len(lora.projections), cfg.optim.lr) == (
            rank,
            rank,
            0.01,
            targets,
            lr,
        )
        assert cfg.reference_mode == "adapters_off" and cfg.train.global_batch_size == 128 and cfg.train.epochs == 5
        assert (cfg.optim.warmup_ratio, cfg.optim.decay_style, cfg.data.max_length, cfg.data.max_prompt_length) == (
            0.1, "cosine", 2312, 1800)


def test_recipe_comments_state_the_planners_prediction():
    from mmpo_megatron.model.memory_plan import Layout, Workload, estimate

    for recipe, world in (("llama3_8b_mmpo", 16), ("llama3_70b_mmpo", 32), ("llama3_2_1b_mmpo_lora", 8),
                          ("llama3_8b_mmpo_lora", 8)):
        cfg = composed(recipe)
        predicted = estimate(cfg.model, Layout.of(cfg, world), Workload.of(cfg)).gib()
        stated = float(re.search(r"predicts (\d+\.\d) GiB a GPU", (CONFIGS / f"{recipe}.yaml").read_text()).group(1))
        assert stated == round(predicted, 1), (recipe, predicted)
        assert predicted < 0.9 * 80  # fits an 80 GB H100 with the planner's headroom


def test_dockerfile_names_real_paths_and_ngc_conventions():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\$\{NGC_TAG\}$", text, re.M)
    assert re.search(r"^ARG NGC_TAG=\d\d\.\d\d-py3$", text, re.M)
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which does not exist"
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert "--no-deps -e ." in text  # the image's torch / TE are never replaced
    assert "torch==" not in text and "transformer-engine" not in text
    assert re.search(r"^USER \d+:\d+$", text, re.M)  # numeric, for runAsNonRoot
    cmd = shlex.split(re.search(r"^CMD \[(.*)\]$", text, re.M).group(1).replace(",", " "))
    assert (REPO / cmd[0]).exists()
    assert (CONFIGS / f"{cmd[cmd.index('--config-name') + 1]}.yaml").exists()
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_dockerfile_installs_pyprojects_dependencies_less_torch():
    """The image's dependency layer runs the Dockerfile's own snippet: pyproject's list minus torch."""
    import tomllib

    text = (REPO / "Dockerfile").read_text().replace("\\\n", "")
    snippet = re.search(r'RUN (python -c "import tomllib.*?") > /tmp/requirements.txt', text).group(1)
    done = subprocess.run(["bash", "-c", snippet.replace("python", shlex.quote(sys.executable), 1)],
                          cwd=REPO, capture_output=True, text=True, check=True)
    from packaging.requirements import Requirement

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [Requirement(d).name for d in declared]
    assert "torch" in names
    # Exactly the requirement named torch goes (a torchdata or torchao would stay), nothing else.
    assert done.stdout.split() == [d for d, name in zip(declared, names) if name != "torch"]
    assert {"megatron-core", "transformers", "tensorboard", "hydra-core"} <= {
        Requirement(d).name for d in done.stdout.split()
    }


def test_dockerfile_and_sbatch_pass_hadolint_and_shellcheck():
    """Linted with the test extra's hadolint and shellcheck (warnings fail; hadolint's info level does not);
    shellcheck also covers tools/gpu_report.sh."""
    bin_dir = Path(sys.executable).parent
    lint = subprocess.run([str(bin_dir / "hadolint"), "--failure-threshold", "warning", "Dockerfile"],
                          cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    check = subprocess.run([str(bin_dir / "shellcheck"), "examples/slurm/train_mmpo.sbatch", "examples/slurm/sweep.sh",
                            "tools/gpu_report.sh"],
                           cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_sbatch_script_is_valid_bash_and_names_real_paths():
    script = REPO / "examples/slurm/train_mmpo.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert len(re.findall(r"^#SBATCH --nodes=\d+", text, re.M)) == 1
    assert "--rdzv-backend c10d" in text and "srun" in text
    assert (REPO / re.search(r"(examples/\S+\.py)", text).group(1)).exists()
    for name in re.findall(r"--config-name (\S+)", text):
        assert (CONFIGS / f"{name}.yaml").exists(), name


def test_benchmark_runs_and_reports(tmp_path):
    """Its main() on a pooled rank (the TRL comparison below runs it as a subprocess)."""
    out = tmp_path / "bench.json"
    code, stdout, stderr = run_on_ranks(tool_main, 1, str(REPO / "tools/benchmark.py"), [[
        "--model", "tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--pairs", "4", "--realistic",
        "--max-length", "64", "--packing", "--json", str(out)]])[0][0]
    assert code == 0, stderr[-2000:]
    assert "real tok/s" in stdout
    (result,) = json.loads(out.read_text())["results"]
    assert result["lengths"] == "realistic" and result["packing"] and result["real_tokens_per_s"] > 0
    assert result["pack_length"] == 128  # the trainer's default on CPU: one longest pair (2 x --max-length)
    assert 0 <= result["padding_fraction"] < 1 and result["s_per_step"] > 0


def test_checkpoint_benchmark_times_both_modes(tmp_path):
    """tools/benchmark_checkpoint.py on the tiny model, a step during the background write."""
    out = tmp_path / "save.json"
    code, stdout, stderr = run_on_ranks(tool_main, 1, str(REPO / "tools/benchmark_checkpoint.py"), [[
        "--model", "tiny", "--vocab", "0", "--num-layers", "0", "--device", "cpu", "--steps-during-write", "1",
        "--root", str(tmp_path / "ckpt"), "--json", str(out)]])[0][0]
    assert code == 0, stderr[-2000:]
    assert "training blocked s" in stdout
    sync, background = json.loads(out.read_text())
    assert (sync["mode"], background["mode"]) == ("sync", "async")
    assert sync["blocked_s"] == sync["complete_s"] > 0 and sync["checkpoint_gb"] > 0
    assert 0 < background["blocked_s"] <= background["complete_s"]
    assert background["checkpoint_gb"] == pytest.approx(sync["checkpoint_gb"], rel=1e-3)
    assert not (tmp_path / "ckpt" / "sync").exists()  # removed after


@pytest.mark.start_early(8)
def test_benchmark_against_trl_on_the_same_data(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(REPO / "tools/benchmark.py"), "--model", "tiny", "--device", "cpu",
                           "--warmup", "1", "--steps", "2", "--pairs", "2", "--lengths", "12+12", "--vs-trl",
                           "--trl-reference", "online,precompute", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, online, precompute = json.loads(out.read_text())["results"]
    assert (
        ours["layer_spec"] == "local"
        and online["layer_spec"] == "trl-online"
        and precompute["layer_spec"] == "trl-precomp"
    )
    # 12+12 under the byte tokenizer: each pair feeds 2 x 12 prompt + 12 + 12 completion tokens, less
    # the last token of each row; 2 pairs a step. Both sides must count exactly that per step (2 timed
    # steps: the median step time is the mean), so the ratio is the inverse ratio of step times.
    tokens_per_step = 2 * (2 * 12 + 12 + 12 - 2)
    for side in (ours, online, precompute):
        assert side["real_tokens_per_s"] * side["s_per_step"] == pytest.approx(tokens_per_step, rel=1e-9), side
    for trl in (online, precompute):
        assert ours["params_m"] == pytest.approx(trl["params_m"], rel=0.05)  # the same model shape
        assert trl["ours_over_trl"] == pytest.approx(trl["s_per_step"] / ours["s_per_step"], rel=1e-9)
    assert "ours / TRL" in done.stdout


def test_attention_benchmark_lays_the_same_pairs_out_packed_and_padded(tmp_path):
    out = tmp_path / "attn.json"
    code, stdout, stderr = run_on_ranks(tool_main, 1, str(REPO / "tools/attention_benchmark.py"), [[
        "--device", "cpu", "--pairs", "6", "--max-length", "1024", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
        "--warmup", "0", "--repeats", "1", "--json", str(out)]])[0][0]
    assert code == 0, stderr[-2000:]
    packed, padded = json.loads(out.read_text())["results"]
    assert packed["real_tokens"] == padded["real_tokens"] > 0
    assert (
        packed["rows"] * packed["length"] >= packed["real_tokens"] and packed["length"] <= 2048
    )  # 2 x --max-length on CPU
    assert padded["rows"] == 12  # chosen and rejected of each pair
    assert packed["padding_fraction"] < padded["padding_fraction"]
    assert "packed (flex_attention)" in stdout and "padded (SDPA causal)" in stdout


# ------------------------------------------------------------------------------------------ the GPU kit and report

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands for the GPU machine's python: answers the report's checks at once, and runs each phase's
# command as FAKE_PHASES tells (ok | fail | hang).
case "$1" in
    -c) [[ "$2" == *"import torch, megatron.core"* ]] &&
            echo "torch 2.11.0 | CUDA 13.0 | megatron-core 0.19.2 | NVIDIA H200"
        [[ "$2" == *"import megatron.core, hydra"* && -n "${FAKE_MISSING:-}" ]] && exit 1
        exit 0 ;;
    -m) phase=smoke ;;
    tools/benchmark.py) if [[ "$*" == *--realistic* ]]; then phase=realistic; else phase=fixed; fi ;;
    tools/logprob_memory.py) phase=memory ;;
    tools/attention_benchmark.py) phase=attention ;;
    *) exit 9 ;;
esac
what=$(tr ' ' '\\n' <<< "$FAKE_PHASES" | grep "^$phase=" | cut -d= -f2)
echo "$phase running"
[[ $what == hang ]] && sleep 60
[[ $what == fail ]] && { echo "$phase broke" >&2; exit 3; }
echo "$phase done"
"""


def test_gpu_report_runs_every_phase_under_its_limit_and_keeps_what_finished(tmp_path):
    """`tools/gpu_report.sh all` as the GPU machine runs it (its python faked): the phases in order,
    a failed one and one past its time limit logged while the rest still run, the log written as it
    goes, a non-zero exit at the end."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(fake),
           "FAKE_PHASES": "smoke=ok fixed=fail realistic=ok memory=hang attention=ok",
           "PHASE_LIMITS": "smoke:20 fixed:20 realistic:20 memory:2 attention:20"}
    done = subprocess.run(["bash", "tools/gpu_report.sh", "all"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    log = (tmp_path / "out" / "gpu_report.log").read_text()
    markers = [line for line in log.splitlines() if line.startswith("===")]
    names = [line.split()[1].rstrip(":") for line in markers[:-1] if "exit" in line or "stopped" in line]
    assert names == ["smoke", "fixed", "realistic", "memory", "attention"], log
    assert "=== fixed: exit 3" in log and "fixed broke" in log
    assert "=== memory: stopped after its 2 s" in log and "memory done" not in log
    assert "attention done" in log and log.strip().endswith("2 phase(s) failed or stopped")
    assert log.splitlines()[0].startswith("torch 2.11.0")
    # A machine without megatron-core and no kit that installs: stopped before any phase, said in the log.
    done = subprocess.run(["bash", "tools/gpu_report.sh", "all"], cwd=REPO, env={**env, "FAKE_MISSING": "1"},
                          capture_output=True, text=True, timeout=60)
    log = (tmp_path / "out" / "gpu_report.log").read_text()
    assert done.returncode == 2 and "=== smoke" not in log, log
    assert ".whl/" in log.strip().splitlines()[-1], log


def test_gpu_kit_requirements_and_a_missing_trl_module_named(tmp_path, monkeypatch):
    """The kit resolves what the GPU run imports (pyproject's dependencies less torch, with pytest
    and TRL); its stub torch is a valid wheel that brings nothing; an ImportError inside TRL names
    the module to carry."""
    import zipfile

    import benchmark
    import gpu_kit

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = gpu_kit.requirements()
    assert not any(r.startswith("torch") for r in wanted) and "psutil" in wanted
    assert len(wanted) == len(declared) - 1 + len(gpu_kit.EXTRA_FOR_THE_RUN)
    stub = gpu_kit.stub_torch_wheel(tmp_path)
    with zipfile.ZipFile(stub) as wheel:
        assert sorted(wheel.namelist()) == ["torch-2.11.0.dist-info/METADATA", "torch-2.11.0.dist-info/RECORD",
                                            "torch-2.11.0.dist-info/WHEEL"]
        assert "Requires-Dist" not in wheel.read("torch-2.11.0.dist-info/METADATA").decode()
    # A TRL whose import fails on a module the machine lacks, wrapped as TRL's lazy module wraps it.
    fake = tmp_path / "fake" / "trl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("try:\n    import a_module_the_machine_lacks\nexcept ImportError as e:\n"
                                      "    raise RuntimeError('Failed to import trl.trainer.dpo_trainer') from e\n")
    for name in [m for m in sys.modules if m == "trl" or m.startswith("trl.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    with pytest.raises(RuntimeError, match="module 'a_module_the_machine_lacks' \\(a dependency of TRL\\) is missing"):
        benchmark.import_trl()
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(RuntimeError, match="module 'trl' \\(TRL itself\\) is missing"):
        benchmark.import_trl()


def test_the_sweep_submits_the_papers_grid_sharing_one_reference_cache(tmp_path):
    """examples/slurm/sweep.sh (dry run): 3 losses x 4 betas, the paper's learning rate per loss,
    SimPO's gamma 1.6 x beta, one run folder each, one reference cache; every job's overrides
    compose on its recipe."""
    # A relative output root is the caller's, not the repository's (the script changes folder).
    done = subprocess.run(
        ["bash", str(REPO / "examples/slurm/sweep.sh"), "smollm2_360m_mmpo", "sweep", "data.tokenizer=/m"],
        cwd=tmp_path,
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    tmp_path = tmp_path / "sweep"
    jobs = [shlex.split(line) for line in done.stdout.splitlines()]
    assert len(jobs) == 12
    seen = {}
    for job in jobs:
        assert job[:job.index("examples/slurm/train_mmpo.sbatch")][-2:] == ["--nodes=1", "--gpus-per-node=1"]
        args = job[job.index("examples/slurm/train_mmpo.sbatch") + 1:]
        if "loss=simpo" in args:
            assert any(
                a in ("loss.gamma=0.016", "loss.gamma=0.08", "loss.gamma=0.16", "loss.gamma=0.8") for a in args
            ), args
        assert args[:2] == ["--config-name", "smollm2_360m_mmpo"]
        cfg = composed(args[1], args[2:])
        seen[(cfg.loss.name, cfg.loss.beta)] = cfg
        assert cfg.reference.cache_dir == str(tmp_path / "reference_cache")
        assert cfg.train.output_dir == str(tmp_path / f"{cfg.loss.name}-beta{cfg.loss.beta:g}")
    assert sorted(seen) == sorted((loss, beta) for loss in ("mmpo", "dpo", "simpo") for beta in (0.01, 0.05, 0.1, 0.5))
    assert {loss: seen[(loss, 0.1)].optim.lr for loss in ("mmpo", "dpo", "simpo")} == {
        "mmpo": 5e-4,
        "dpo": 5e-5,
        "simpo": 1e-4,
    }
    assert seen[("simpo", 0.5)].loss.gamma == pytest.approx(0.8)
    paper = seen[("mmpo", 0.1)]
    assert (paper.train.global_batch_size, paper.train.epochs, paper.optim.decay_style, paper.optim.warmup_ratio,
            paper.data.max_length, paper.data.max_prompt_length, paper.loss.eps_chosen, paper.loss.eps_rejected) == (
        128, 5, "cosine", 0.1, 2312, 1800, 0.9, 0.1)
