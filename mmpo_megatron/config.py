"""Configuration dataclasses, one per concern. Each field documents its default and why.

Hydra builds these from ``configs/``; every check runs in ``__post_init__`` so a bad value fails
before any heavy work, with an error that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass


LOSS_NAMES = ("mmpo", "dpo", "ipo", "simpo")
NORM_SCOPES = ("global", "dp_microbatch", "local", "none")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


@dataclass
class LossConfig:
    """Which preference loss to train with and its hyper-parameters (METHOD.md)."""

    name: str = "mmpo"
    """The objective. MMPO is this project's reason to exist; the others are the paper's baselines."""

    beta: float = 0.1
    """Temperature. Paper grid 0.01, 0.05, 0.1, 0.5; 0.1 is the common DPO default. SimPO uses ~2.0."""

    eps_chosen: float = 0.9
    """MMPO prior-reward offset of the chosen response (paper runs: 0.9)."""

    eps_rejected: float = 0.1
    """MMPO prior-reward offset of the rejected response (paper runs: 0.1)."""

    aux_input: str = "score_margin"
    """MMPO auxiliary term input: ``sc - sr`` (paper-literal) or the DPO margin."""

    aux_weight: float = 1.0
    """MMPO auxiliary weight lambda: 1.0 in the paper; 0 gives pure marginal likelihood.
    With ``score_margin`` and 1.0 the loss equals ``-sc``: the rejected side gets no gradient."""

    norm_scope: str = "global"
    """Where MMPO's min-max statistics come from. ``global`` (the optimizer step's whole batch) is
    the only scope whose result does not depend on the DP x micro-batch split."""

    logp_reduction: str = "sum"
    """Sequence log-prob for MMPO and DPO: sum over completion tokens (paper) or per-token mean.
    IPO and SimPO always use the mean, as their papers define them."""

    label_smoothing: float = 0.0
    """DPO label smoothing (cDPO); 0 is plain DPO."""

    gamma: float = 2.5
    """SimPO target margin; the SimPO paper uses gamma/beta between 1.0 and 1.6 with beta ~2."""

    nll_weight: float = 0.0
    """Weight of an added per-token NLL on the chosen response (RPO style); 0 disables it."""

    def __post_init__(self) -> None:
        _require(self.name in LOSS_NAMES, "loss.name", f"must be one of {LOSS_NAMES}, got {self.name!r}")
        _require(
            self.norm_scope in NORM_SCOPES, "loss.norm_scope", f"must be one of {NORM_SCOPES}, got {self.norm_scope!r}"
        )
        _require(
            self.aux_input in ("score_margin", "dpo_margin"),
            "loss.aux_input",
            f"must be 'score_margin' or 'dpo_margin', got {self.aux_input!r}",
        )
        _require(
            self.logp_reduction in ("sum", "mean"),
            "loss.logp_reduction",
            f"must be 'sum' or 'mean', got {self.logp_reduction!r}",
        )
        _require(self.beta > 0, "loss.beta", f"must be > 0, got {self.beta}")
        _require(self.aux_weight >= 0, "loss.aux_weight", f"must be >= 0, got {self.aux_weight}")
        _require(
            0.0 <= self.label_smoothing < 0.5, "loss.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}"
        )
        _require(self.nll_weight >= 0, "loss.nll_weight", f"must be >= 0, got {self.nll_weight}")

    @property
    def needs_reference(self) -> bool:
        """SimPO is reference-free; every other loss needs reference log-probs."""
        return self.name != "simpo"


@dataclass
class ParallelConfig:
    """How the job is laid out over processes and which device runs it."""

    tensor_parallel: int = 1
    """Tensor-parallel size (megatron TP). Must divide attention heads and query groups."""

    pipeline_parallel: int = 1
    """Pipeline-parallel size. Must divide the number of layers."""

    virtual_pipeline: int | None = None
    """Virtual stages per pipeline rank (interleaved 1F1B); None disables interleaving."""

    device: str = "auto"
    """``auto`` picks CUDA (nccl) when a GPU is visible, else CPU (gloo, through the CPU shim)."""

    seed: int = 1234
    """Seed of megatron's model-parallel RNG streams (same offsets as megatron's own)."""

    timeout_minutes: int = 30
    """Collective timeout. Long enough for a reference precompute pass on rank 0's checkpoint I/O."""

    def __post_init__(self) -> None:
        _require(self.tensor_parallel >= 1, "parallel.tensor_parallel", f"must be >= 1, got {self.tensor_parallel}")
        _require(
            self.pipeline_parallel >= 1, "parallel.pipeline_parallel", f"must be >= 1, got {self.pipeline_parallel}"
        )
        _require(
            self.virtual_pipeline is None or self.virtual_pipeline >= 1,
            "parallel.virtual_pipeline",
            f"must be None or >= 1, got {self.virtual_pipeline}",
        )
        _require(
            self.device in ("auto", "cuda", "cpu"),
            "parallel.device",
            f"must be 'auto', 'cuda' or 'cpu', got {self.device!r}",
        )


@dataclass
class DataSourceConfig:
    """One preference data source."""

    path: str = "embedded"
    """``embedded`` (the bundled arithmetic pairs), a local .jsonl/.json/.parquet file, a folder
    (``save_to_disk`` output, or a folder of such files), or a hub name (machines with internet)."""

    split: str = "train"
    """Split to read; slicing works (``train[:1000]``). A local file is the ``train`` split."""

    format: str = "auto"
    """auto, plain, orca, ultrafeedback, conversational, nemo, or columns (with ``columns``)."""

    weight: float = 1.0
    """Mixing weight relative to the other sources (the paper mixes its two sets 1:1)."""

    columns: dict[str, str] | None = None
    """For format ``columns``: ``{prompt: ..., chosen: ..., rejected: ...}`` column names."""

    def __post_init__(self) -> None:
        _require(self.weight > 0, "data source weight", f"must be > 0, got {self.weight} for {self.path!r}")


@dataclass
class DataConfig:
    """Where the pairs come from and how they become token batches."""

    train: list[DataSourceConfig] | None = None
    """Training sources; None means the embedded demo data's train split."""

    eval: list[DataSourceConfig] | None = None
    """Held-out sources; None means the embedded demo data's test split when training on it."""

    tokenizer: str = "embedded"
    """A local tokenizer folder, a hub name, or ``embedded`` (byte-level, built in code)."""

    max_length: int = 2312
    """Prompt + completion token limit (paper: 2312)."""

    max_prompt_length: int | None = 1800
    """Prompts longer than this keep their last tokens (paper: 1800); None: only max_length applies."""

    pad_to_multiple: int = 16
    """Micro-batches pad to a multiple of this (FP8 GEMMs need 16)."""

    on_bad_row: str = "skip"
    """A row with a null/non-string/empty field or no assistant reply: counted skip or fatal error."""

    group_by_length: bool = False
    """Order each global batch's pairs by length before splitting it, so micro-batches pad less."""

    num_proc: int = 1
    """Processes for tokenisation (datasets.map); results are cached, so a restart re-uses them."""

    seed: int = 1234
    """Seed of the mixing and of the per-epoch shuffle."""

    report_errors: int = 20
    """How many bad rows the data report lists in full (all are counted)."""

    def __post_init__(self) -> None:
        _require(self.max_length >= 2, "data.max_length", f"must be >= 2, got {self.max_length}")
        _require(
            self.max_prompt_length is None or 1 <= self.max_prompt_length < self.max_length,
            "data.max_prompt_length",
            f"must be in [1, max_length={self.max_length}), got {self.max_prompt_length}",
        )
        _require(self.pad_to_multiple >= 1, "data.pad_to_multiple", f"must be >= 1, got {self.pad_to_multiple}")
        _require(self.on_bad_row in ("skip", "error"), "data.on_bad_row", f"must be 'skip' or 'error', got {self.on_bad_row!r}")
        _require(self.num_proc >= 1, "data.num_proc", f"must be >= 1, got {self.num_proc}")
        self.train = [_as_source(s) for s in self.train] if self.train else None
        self.eval = [_as_source(s) for s in self.eval] if self.eval else None


def _as_source(source) -> DataSourceConfig:
    if isinstance(source, DataSourceConfig):
        return source
    if isinstance(source, str):
        return DataSourceConfig(path=source)
    return DataSourceConfig(**dict(source))
