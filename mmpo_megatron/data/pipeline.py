"""From data sources to tokenised, truncated preference pairs, with a report of every drop.

load (datasets) -> normalise the format -> tokenise once with ``datasets.map`` (cached, so a
restart does not tokenise again) -> drop bad or over-long pairs (counted by reason) -> mix sources
(each by its weight: the fraction of it an epoch uses).
A kept row has ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (the completions, EOS included),
``source`` and ``index`` (the row's position in its source).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets

from mmpo_megatron.config import DataConfig, DataSourceConfig
from mmpo_megatron.data.formats import (
    BAD_ROW_REASONS,
    DataError,
    check_columns,
    detect_format,
    row_normaliser,
)

log = logging.getLogger(__name__)

EMBEDDED_DATA = "embedded"
"""The source path that selects the bundled arithmetic preference pairs."""


@dataclass
class DataReport:
    """What happened to every input pair; written to JSON and printed at start."""

    pairs_in: int = 0
    pairs_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    identical_pairs: int = 0
    truncated_pairs: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Per source: ``source``, ``pairs_kept``, ``weight`` and ``pairs_used`` (per epoch, after the weight)."""
    pairs_used: int = 0
    """Pairs in the mix: one epoch of training (a pair used twice counts twice)."""

    def merge(self, other: "DataReport", max_errors: int) -> None:
        """Add another source's counts to this report."""
        self.pairs_in += other.pairs_in
        self.pairs_kept += other.pairs_kept
        self.identical_pairs += other.identical_pairs
        self.truncated_pairs += other.truncated_pairs
        for reason, count in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + count
        self.errors.extend(other.errors[: max(0, max_errors - len(self.errors))])

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-able dict."""
        return asdict(self)

    def summary(self) -> str:
        """One human-readable paragraph."""
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        text = (
            f"{self.pairs_kept}/{self.pairs_in} pairs kept; dropped by reason: {drops}; "
            f"{self.truncated_pairs} truncated; {self.identical_pairs} with chosen == rejected (kept)"
        )
        if len(self.sources) > 1 or any(s["pairs_used"] != s["pairs_kept"] for s in self.sources):
            used = ", ".join(
                f"{s['source']} {s['pairs_used']} (x{s['weight']:g} of {s['pairs_kept']})" for s in self.sources
            )
            text += f"; mixed: {used}; {self.pairs_used} pairs an epoch"
        return text


# ---------------------------------------------------------------------------------------------
# Loading


def _check_json_lines(path: Path) -> None:
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg} at column {exc.colno})") from None


def _load_files(builder: str, files: list[str], split: str, source: str) -> datasets.Dataset:
    if not split.startswith("train"):
        raise DataError(
            f"{source}: local files form a single 'train' split (slices like train[:100] work), got {split!r}"
        )
    try:
        return datasets.load_dataset(builder, data_files=files, split=split)
    except Exception as exc:
        if builder == "json":
            for f in files:
                if f.endswith(".jsonl"):
                    _check_json_lines(Path(f))
        raise DataError(f"{source}: could not read {builder} data: {exc}") from exc


def load_source(source: DataSourceConfig) -> datasets.Dataset:
    """Read one source into a ``datasets.Dataset`` (no processing)."""
    path = source.path
    if path == EMBEDDED_DATA:
        from mmpo_megatron.data.demo_data import demo_data_file

        split = source.split.split("[")[0]
        if split not in ("train", "test"):
            raise DataError(f"embedded data has splits 'train' and 'test', got {source.split!r}")
        return datasets.load_dataset(
            "json", data_files=str(demo_data_file(split)), split="train" + source.split[len(split) :]
        )
    local = Path(path).expanduser()
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
    if local.is_file():
        builder = builders.get(local.suffix)
        if builder is None:
            raise DataError(f"{path}: unsupported file type {local.suffix!r}; use .jsonl, .json, .parquet or .arrow")
        return _load_files(builder, [str(local)], source.split, path)
    if local.is_dir():
        if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                split = source.split.split("[")[0]
                if split not in loaded:
                    raise DataError(f"{path}: no split {split!r}; splits are {sorted(loaded)}")
                loaded = loaded[split]
            return loaded
        for suffix, builder in builders.items():
            files = sorted(str(f) for f in local.glob(f"*{suffix}"))
            if files:
                return _load_files(builder, files, source.split, path)
        raise DataError(f"{path}: folder holds no .jsonl, .json, .parquet or .arrow files and is not a saved dataset")
    if path.startswith(("/", ".", "~")) or local.suffix in builders:
        raise DataError(f"{path}: no such file or folder")
    try:
        return datasets.load_dataset(path, split=source.split)
    except Exception as exc:
        raise DataError(f"{path}: could not load from the hub (split {source.split!r}): {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Tokenisation and truncation


def _ids(encoded: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return list(encoded)


def prompt_token_limit(max_length: int, max_prompt_length: int | None, longest_completion: int) -> int:
    """How many prompt tokens a pair keeps (its last ones).

    An explicit ``max_prompt_length`` is the limit. Unset, the limit follows ``max_length``: the
    prompt is cut only as far as the longer completion needs to fit, and a long completion claims
    at most half of ``max_length`` from it.
    """
    if max_prompt_length is not None:
        return max_prompt_length
    return max_length - max(1, min(longest_completion, max_length // 2))


class PairTokeniser:
    """Turns a normalised row into prompt and completion token ids, truncated to the limits."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int | None, source: str) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.source = source

    def _conversation(self, messages: list[dict[str, str]], reply: str, prompt_ids: list[int], index: int) -> list[int]:
        full = _ids(
            self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=True)
        )
        if full[: len(prompt_ids)] != prompt_ids:
            raise DataError(
                f"{self.source}: row {index}: the chat template's prompt tokens (with the generation prompt) are not "
                f"a prefix of the full conversation's tokens; this template cannot split prompt and reply"
            )
        return full[len(prompt_ids):]

    def __call__(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "index": index, "source": self.source,
               "truncated": False, "identical": False, "drop_reason": row["drop_reason"], "error": row["error"]}
        if row["drop_reason"]:
            return out
        tok = self.tokenizer
        if row["prompt_messages"]:
            if not getattr(tok, "chat_template", None):
                raise DataError(
                    f"{self.source}: row {index} is conversational but tokenizer {tok.name_or_path!r} "
                    "has no chat template"
                )
            messages = json.loads(row["prompt_messages"])
            prompt = _ids(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
            chosen = self._conversation(messages, row["chosen"], prompt, index)
            rejected = self._conversation(messages, row["rejected"], prompt, index)
        else:
            prompt = _ids(tok(row["prompt"], add_special_tokens=True)["input_ids"])
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            chosen = _ids(tok(row["chosen"], add_special_tokens=False)["input_ids"]) + eos
            rejected = _ids(tok(row["rejected"], add_special_tokens=False)["input_ids"]) + eos
        out["identical"] = chosen == rejected

        truncated = False
        prompt_limit = prompt_token_limit(self.max_length, self.max_prompt_length, max(len(chosen), len(rejected)))
        if len(prompt) > prompt_limit:
            prompt, truncated = prompt[-prompt_limit:], True  # keep the end: the question
        budget = self.max_length - len(prompt)  # >= 1: prompt_token_limit leaves room
        if len(chosen) > budget or len(rejected) > budget:
            chosen, rejected, truncated = chosen[:budget], rejected[:budget], True
        if not chosen or not rejected:
            return {**out, "drop_reason": "empty_completion", "error": "a completion has no tokens"}
        return {**out, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "truncated": truncated}


def prepare_source(
    source: DataSourceConfig, tokenizer, config: DataConfig, *, name: str | None = None
) -> tuple[datasets.Dataset, DataReport]:
    """Load, normalise, tokenise and filter one source; returns kept pairs and the source's report."""
    name = name or f"{source.path}:{source.split}"
    raw = load_source(source)
    if len(raw) == 0:
        raise DataError(f"{name}: the source has no rows")
    fmt = source.format
    if fmt == "auto":
        fmt = detect_format(raw.column_names, raw[0], name)
    check_columns(fmt, raw.column_names, name, source.columns)

    normalised = raw.map(
        row_normaliser(fmt, source.columns), remove_columns=raw.column_names, num_proc=_procs(config, raw),
        desc=f"normalising {name}",
    )
    tokenised = normalised.map(
        PairTokeniser(tokenizer, config.max_length, config.max_prompt_length, name),
        with_indices=True, remove_columns=["prompt", "prompt_messages", "chosen", "rejected"],
        num_proc=_procs(config, raw), desc=f"tokenising {name}",
    )

    report = DataReport(pairs_in=len(tokenised))
    reasons = tokenised["drop_reason"]
    report.dropped = dict(Counter(r for r in reasons if r))
    bad = [i for i, r in enumerate(reasons) if r]
    if config.on_bad_row == "error":
        first = next((i for i in bad if reasons[i] in BAD_ROW_REASONS), None)
        if first is not None:
            raise DataError(f"{name}: row {first}: {tokenised[first]['error']} (data.on_bad_row=error)")
    for i in bad[: config.report_errors]:
        report.errors.append({"source": name, "index": i, "reason": reasons[i], "error": tokenised[i]["error"]})
    kept = tokenised.filter(lambda reason: not reason, input_columns=["drop_reason"], desc=f"filtering {name}")
    report.pairs_kept = len(kept)
    report.identical_pairs = int(sum(kept["identical"]))
    report.truncated_pairs = int(sum(kept["truncated"]))
    if report.identical_pairs:
        log.warning(
            "%s: %d pairs have chosen == rejected; kept (they carry no preference signal)", name, report.identical_pairs
        )
    kept = kept.remove_columns(["drop_reason", "error", "identical", "truncated"])
    return kept, report


def _procs(config: DataConfig, dataset: datasets.Dataset) -> int | None:
    # Multi-process map only pays off on large data; None keeps it in-process.
    return config.num_proc if config.num_proc > 1 and len(dataset) >= 1000 else None


def weighted_positions(count: int, weight: float, seed: int) -> list[int]:
    """Which of a source's ``count`` pairs an epoch uses under ``weight``, the fraction of the
    source per epoch (like alignment-handbook's dataset_mixer fractions, which take a set's first
    rows and stop at 1): every pair ``floor(weight)`` times, then
    a seeded sample of the fraction left (2.0: every pair twice; 0.5: a seeded half)."""
    import numpy as np

    whole = int(weight)
    extra = round((weight - whole) * count)
    sample = np.random.default_rng(seed).choice(count, size=extra, replace=False) if extra else []
    return list(range(count)) * whole + sorted(int(i) for i in sample)


def build_pairs(
    sources: Sequence[DataSourceConfig], tokenizer, config: DataConfig, *, held_out: bool = False
) -> tuple[datasets.Dataset, DataReport]:
    """All sources prepared and concatenated, each by its weight (the fraction of it an epoch
    uses: 1.0 + 1.0 is the plain concatenation); returns the pairs and the merged report.
    ``held_out``: held-out data, where a weight above 1 does not repeat pairs (capped at 1)."""
    used = []
    report = DataReport()
    for number, source in enumerate(sources):
        kept, source_report = prepare_source(source, tokenizer, config)
        if len(kept) == 0:
            raise DataError(f"{source.path}:{source.split}: no pair survived ({source_report.summary()})")
        report.merge(source_report, config.report_errors)
        weight = min(source.weight, 1.0) if held_out else source.weight
        positions = weighted_positions(len(kept), weight, config.seed + number)
        if positions != list(range(len(kept))):
            kept = kept.select(positions)
        report.sources.append({"source": f"{source.path}:{source.split}", "pairs_kept": source_report.pairs_kept,
                               "weight": weight, "pairs_used": len(kept)})
        used.append(kept)
    mixed = used[0] if len(used) == 1 else datasets.concatenate_datasets(used)
    report.pairs_used = len(mixed)
    if len(mixed) == 0:
        raise DataError(f"the sources' weights leave no pair: {report.sources}")
    return mixed, report


HELD_OUT_SPLITS = ("test", "test_prefs")
"""Held-out split names, in order of preference (the paper's sets use ``test_prefs``)."""


def held_out_split(path: str) -> str:
    """The split to score when none is given: a source's held-out split where it has one
    (embedded: ``test``; a saved DatasetDict or hub set: ``test``/``test_prefs``), else the whole
    source (a local file, or a folder of files, is one ``train`` split)."""
    if path == EMBEDDED_DATA:
        return "test"
    local = Path(path).expanduser()
    if (local / "dataset_dict.json").is_file():
        splits = json.loads((local / "dataset_dict.json").read_text()).get("splits", [])
    elif local.exists():
        return "train"
    else:
        try:
            splits = datasets.get_dataset_split_names(path)
        except Exception:  # offline or unknown: the loader will say what is wrong
            return "test"
    held_out = [s for s in HELD_OUT_SPLITS if s in splits]
    if held_out:
        return held_out[0]
    return "train" if "train" in splits or not splits else splits[0]


def train_sources(config: DataConfig) -> list[DataSourceConfig]:
    """The configured training sources (default: embedded train split)."""
    return config.train or [DataSourceConfig(path=EMBEDDED_DATA, split="train")]


def eval_sources(config: DataConfig) -> list[DataSourceConfig]:
    """The configured held-out sources (default: the embedded test split when training on it)."""
    if config.eval:
        return config.eval
    if config.train is None or all(s.path == EMBEDDED_DATA for s in config.train):
        return [DataSourceConfig(path=EMBEDDED_DATA, split="test")]
    return []


def write_report(report: DataReport, path: str | Path) -> None:
    """Write the report as JSON (the keys the inspection CLI documents)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report.to_json(), indent=2))
