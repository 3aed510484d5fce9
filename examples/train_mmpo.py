#!/usr/bin/env python
"""Train a policy with MMPO (or DPO / IPO / SimPO) on megatron-core.

    torchrun --nproc-per-node 8 examples/train_mmpo.py model=llama3_2_1b loss=mmpo \\
        parallel.tensor_parallel=2 data=paper_mix data.tokenizer=/models/Llama-3.2-1B-Instruct \\
        checkpoint.load_weights=/ckpt/llama3_2_1b_sft train.output_dir=outputs/llama1b_mmpo
    torchrun --nproc-per-node 2 examples/train_mmpo.py --config-name train_demo   # CPU demo

Config groups live in configs/ (model, loss, parallel, optim, data) on top of the schema
mmpo_megatron.config.TrainConfig, so every field can be overridden on the command line. Before
anything heavy starts, the HF shape of model=from_hf is read and the whole config is checked
against the world size and this machine: a bad key or value exits with code 2 and one
``config error:`` line that names it.

Exit codes: 0 the run finished; 2 a config or checkpoint error; 75 it stopped early with a
checkpoint (SIGTERM, SIGUSR1 or train.max_wall_minutes; run the same command to resume). Under
torchrun, which reports any non-zero worker as a failure, the environment variable
MMPO_RUN_STATUS names a JSON file where rank 0 writes the outcome (examples/slurm/train_mmpo.sbatch
reads it to requeue).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from mmpo_megatron.config import ConfigError, register_hydra_schema, resolve_config  # noqa: E402

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
register_hydra_schema()


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train_mmpo")
def main(cfg: DictConfig) -> None:
    """Hydra entry: resolve the config, then train (which checks it first)."""
    import os

    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # per-bucket parameter listings
    from mmpo_megatron.model.checkpoint import DamagedCheckpointError
    from mmpo_megatron.train.stopping import STOPPED_EXIT_CODE, TrainingStopped, write_run_status
    from mmpo_megatron.train.trainer import run_training

    status = {"status": "failed"}
    try:
        records = run_training(resolve_config(cfg))
        status = {"status": "finished", "step": max((r["step"] for r in records), default=None)}
    except TrainingStopped as exc:
        status = exc.status()  # the trainer printed where it stopped and how to resume
        sys.exit(STOPPED_EXIT_CODE)
    except ConfigError as exc:
        status = {"status": "config_error", "error": str(exc)}
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except DamagedCheckpointError as exc:
        status = {"status": "checkpoint_error", "error": str(exc)}
        print(f"checkpoint error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        write_run_status(status)


if __name__ == "__main__":  # required: dist_checkpointing spawns a Manager that re-imports this file
    main()
