"""Where reference log-probs come from."""

from __future__ import annotations

from dataclasses import dataclass

from mmpo_megatron.config.checks import choices, require

REFERENCE_MODES = ("auto", "precompute", "resident", "cpu_swap", "adapters_off")


@dataclass
class ReferenceConfig:
    """Where reference log-probs come from."""

    mode: str = "auto"
    """auto: adapters_off when LoRA starts fresh (model.lora.rank > 0 without init_from), else
    precompute (with init_from the starting policy, base + that adapter, is the reference, as in TRL).
    adapters_off (LoRA only): the policy's own chunks with the adapters switched off are the
    reference, the base model: no copy, no swap, no cache.
    precompute: one forward pass over train and eval pairs before training, cached on disk (keyed
    by data, weights, model and numerics) and reused on restart: offline training repeats epochs,
    so this saves a reference forward per step, and no reference weights stay on the device.
    resident: a second frozen model on the device, run on each step's pairs (one more copy of the
    weights). cpu_swap: the reference weights wait in pinned CPU memory and are copied into the
    policy's parameters for each reference forward and back (two weight copies over PCIe a step,
    no second copy on the device)."""

    checkpoint: str | None = None
    """Reference weights; None means the policy's starting weights (the SFT model)."""

    cache_dir: str | None = None
    """Where precomputed log-probs live; None means <output_dir>/reference_cache."""

    def __post_init__(self) -> None:
        require(self.mode in REFERENCE_MODES, "reference.mode",
                 f"must be {choices(REFERENCE_MODES)}, got {self.mode!r}")
