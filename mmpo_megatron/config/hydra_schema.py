"""TrainConfig as Hydra's schema, and a composed Hydra config turned into a checked TrainConfig."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from mmpo_megatron.config.checks import ConfigError
from mmpo_megatron.config.run import TrainConfig

if TYPE_CHECKING:
    from omegaconf import DictConfig


HYDRA_SCHEMA = "train_schema"
"""The name configs/train_mmpo.yaml lists first in its defaults: TrainConfig as the schema."""


def _required(key: str):
    raise ConfigError(f"{key}: required by the chosen preset and not given; pass {key}=...")


def register_hydra_schema() -> None:
    """Register TrainConfig with Hydra's ConfigStore as the schema the YAML files extend.

    Every field then exists on the command line with its default and type (``data.packing=true``
    works on any preset; ``train.global_batch_size=abc`` fails at composition). A preset marks a key
    the user must give as ``${required:KEY}``: a bare ``???`` merged onto a schema default would
    silently keep the default.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("required"):
        OmegaConf.register_new_resolver("required", _required)
    ConfigStore.instance().store(name=HYDRA_SCHEMA, node=TrainConfig)


def resolve_config(cfg: "DictConfig") -> TrainConfig:
    """The typed, validated TrainConfig of a composed Hydra config; raises ConfigError naming the
    bad or missing key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(
                f"{missing[0]}: required and not given" + (f" (also {', '.join(missing[1:])})" if missing[1:] else "")
            )
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        cause = exc
        while cause is not None and not isinstance(cause, ConfigError):  # ours, raised inside OmegaConf
            cause = cause.__cause__ or cause.__context__
        raise ConfigError(str(cause or exc).strip()) from None


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
"""The repository's configs/ (a source checkout or an editable install)."""


def compose_config(
    config_name: str = "train_mmpo", overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR
) -> TrainConfig:
    """The TrainConfig ``examples/train_mmpo.py --config-name NAME OVERRIDES...`` would train with
    (before preflight), for a notebook or a test."""
    from hydra import compose, initialize_config_dir

    register_hydra_schema()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return resolve_config(compose(config_name=config_name, overrides=list(overrides)))
