#!/usr/bin/env python
"""Train a policy with MMPO (or DPO / IPO / SimPO) on megatron-core.

    torchrun --nproc-per-node 8 examples/train_mmpo.py model=llama3_2_1b loss=mmpo \\
        parallel.tensor_parallel=2 data=paper_mix data.tokenizer=/models/Llama-3.2-1B-Instruct \\
        checkpoint.load_weights=/ckpt/llama3_2_1b_sft train.output_dir=outputs/llama1b_mmpo
    torchrun --nproc-per-node 2 examples/train_mmpo.py --config-name train_demo   # CPU demo

Config groups live in configs/ (model, loss, parallel, optim, data); any key can be overridden
on the command line. The composed config is validated against mmpo_megatron.config.TrainConfig
before anything heavy starts: unknown keys and bad values fail with the field's name.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from mmpo_megatron.config import ConfigError, TrainConfig  # noqa: E402

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def resolve_config(cfg: DictConfig) -> tuple[TrainConfig, str]:
    """The typed, validated TrainConfig and its YAML; raises ConfigError naming the bad key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        return OmegaConf.to_object(merged), OmegaConf.to_yaml(merged, resolve=True)
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else exc
        raise ConfigError(str(cause).strip()) from None


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train_mmpo")
def main(cfg: DictConfig) -> None:
    """Hydra entry: validate, then train."""
    import os

    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # per-bucket parameter listings
    try:
        train_config, yaml = resolve_config(cfg)
        train_config.validate_for_world(int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    from mmpo_megatron.train.loop import run_training

    run_training(train_config, config_yaml=yaml)


if __name__ == "__main__":  # required: dist_checkpointing spawns a Manager that re-imports this file
    main()
