"""Where the preference data comes from and how it is cut into rows."""

from __future__ import annotations

from dataclasses import dataclass

from mmpo_megatron.config.checks import require


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
    """The fraction of this source an epoch uses (like alignment-handbook's dataset_mixer
    fractions, but sampled with data.seed and repeating above 1): 1.0 is every
    pair once, 0.5 a seeded half, 2.0 every pair twice. The paper concatenates its two sets (1.0
    each). Held-out sources never repeat a pair (a weight above 1 counts as 1)."""

    columns: dict[str, str] | None = None
    """For format ``columns``: ``{prompt: ..., chosen: ..., rejected: ...}`` column names."""

    def __post_init__(self) -> None:
        require(self.weight > 0, "data source weight", f"must be > 0, got {self.weight} for {self.path!r}")


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

    max_prompt_length: int | None = None
    """A cap on prompt tokens (prompts keep their last tokens). None (the default) follows
    ``max_length``: ``max_length - min(longer completion, max_length // 2)``, i.e. a prompt is cut
    only as far as the pair needs to fit, and a long completion claims at most half the budget
    (docs/data.md). The paper's recipes set 1800 of 2312 explicitly."""

    pad_to_multiple: int = 16
    """Micro-batches pad to a multiple of this (FP8 GEMMs need 16)."""

    on_bad_row: str = "skip"
    """A row with a null/non-string/empty field or no assistant reply: counted skip or fatal error."""

    packing: bool = False
    """Pack each micro-batch's pairs into rows of up to ``pack_length`` tokens (chosen and rejected
    of a pair in one row) with block-diagonal causal attention: no compute on padding. local_sdpa
    uses a flex_attention block mask (a dense one where it trains on CPU), local a dense
    [rows, 1, L, L] mask, transformer_engine THD (cu_seqlens; TE's causal attention ignores a mask).
    The first packed step checks packed against padded log-probs and stops the run if they differ."""

    pack_length: int | None = None
    """Packed row length. None: a whole micro-batch (up to 16k tokens) in one row where flex_attention
    trains (local_sdpa on GPU: almost no padding), else 2 x max_length (a dense mask grows with length^2)."""

    group_by_length: bool = False
    """Order each global batch's pairs by length before splitting it, so micro-batches pad less."""

    num_proc: int = 1
    """Processes for tokenisation (datasets.map); results are cached, so a restart re-uses them."""

    seed: int = 1234
    """Seed of the mixing and of the per-epoch shuffle."""

    report_errors: int = 20
    """How many bad rows the data report lists in full (all are counted)."""

    def __post_init__(self) -> None:
        require(self.max_length >= 2, "data.max_length", f"must be >= 2, got {self.max_length}")
        require(
            self.max_prompt_length is None or 1 <= self.max_prompt_length < self.max_length,
            "data.max_prompt_length",
            f"must be in [1, max_length={self.max_length}), got {self.max_prompt_length} "
            "(null lets it follow max_length)",
        )
        require(self.pad_to_multiple >= 1, "data.pad_to_multiple", f"must be >= 1, got {self.pad_to_multiple}")
        require(
            self.on_bad_row in ("skip", "error"),
            "data.on_bad_row",
            f"must be 'skip' or 'error', got {self.on_bad_row!r}",
        )
        require(self.num_proc >= 1, "data.num_proc", f"must be >= 1, got {self.num_proc}")
        self.train = [_as_source(s) for s in self.train] if self.train else None
        self.eval = [_as_source(s) for s in self.eval] if self.eval else None


def _as_source(source) -> DataSourceConfig:
    if isinstance(source, DataSourceConfig):
        return source
    if isinstance(source, str):
        return DataSourceConfig(path=source)
    return DataSourceConfig(**dict(source))
