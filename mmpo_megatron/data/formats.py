"""Preference-data formats, each normalised to one row shape: (prompt, chosen, rejected).

A normalised row has ``prompt`` (plain text, "" for conversational rows), ``prompt_messages``
(a JSON list of chat messages, "" for plain rows), and ``chosen`` / ``rejected`` (the two reply
texts), plus ``drop_reason`` / ``error`` when the row is unusable. Row-level problems are reported
that way, never raised, so one bad row cannot crash a run; structural problems (a missing column,
an unknown format) raise :class:`DataError` at once.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

FORMATS = ("auto", "plain", "orca", "ultrafeedback", "conversational", "nemo", "columns")

# Required columns per format; `auto` picks the first format whose columns are all present.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "nemo": ("prompt", "chosen_response", "rejected_response"),
    "orca": ("question", "chosen", "rejected"),
    "ultrafeedback": ("chosen", "rejected"),  # message lists; prompt optional
    "conversational": ("prompt", "chosen", "rejected"),  # prompt is a message list
    "plain": ("prompt", "chosen", "rejected"),
}

BAD_ROW_REASONS = ("invalid_field", "empty_prompt", "empty_completion", "no_assistant_reply", "prompt_mismatch")
"""Drop reasons that mean the row itself is malformed (``data.on_bad_row`` decides: skip or fail).
Length limits never drop a pair: prompts and completions are truncated instead."""



class DataError(ValueError):
    """A data problem that stops the run; the message names the source, row and field."""


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)


def detect_format(columns: Sequence[str], first_row: Mapping[str, Any], source: str) -> str:
    """Pick the format from the column names (and, where names are shared, the first row's types)."""
    cols = set(columns)
    if set(FORMAT_COLUMNS["nemo"]) <= cols:
        return "nemo"
    if set(FORMAT_COLUMNS["orca"]) <= cols:
        return "orca"
    if set(FORMAT_COLUMNS["conversational"]) <= cols and _is_message_list(first_row.get("prompt")):
        return "conversational"
    if {"chosen", "rejected"} <= cols and _is_message_list(first_row.get("chosen")):
        return "ultrafeedback"
    if set(FORMAT_COLUMNS["plain"]) <= cols:
        return "plain"
    raise DataError(
        f"{source}: cannot detect the preference format from columns {sorted(cols)}; expected one of "
        + "; ".join(f"{name}: {list(c)}" for name, c in FORMAT_COLUMNS.items())
        + ". Name the format or give a column mapping (data.columns={prompt: ..., chosen: ..., rejected: ...})."
    )


def check_columns(fmt: str, columns: Sequence[str], source: str, mapping: Mapping[str, str] | None = None) -> None:
    """Raise a DataError naming the missing column(s) of ``fmt``."""
    if fmt == "columns":
        if not mapping or not {"prompt", "chosen", "rejected"} <= set(mapping):
            raise DataError(f"{source}: format 'columns' needs data.columns with keys prompt, chosen, rejected")
        needed = [mapping["prompt"], mapping["chosen"], mapping["rejected"]]
    elif fmt in FORMAT_COLUMNS:
        needed = list(FORMAT_COLUMNS[fmt])
    else:
        raise DataError(f"{source}: unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{source}: format {fmt!r} needs column(s) {missing}, the data has {sorted(columns)}")


class _RowProblem(Exception):
    def __init__(self, reason: str, field: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.field = field
        self.detail = detail


def _text(row: Mapping[str, Any], column: str, *, allow_empty: bool = False) -> str:
    value = row.get(column)
    if value is None:
        raise _RowProblem("invalid_field", column, f"field {column!r} is null")
    if not isinstance(value, str):
        raise _RowProblem("invalid_field", column, f"field {column!r} is {type(value).__name__}, expected a string")
    if not allow_empty and not value.strip():
        reason = "empty_completion" if column not in ("prompt", "question", "system") else "empty_prompt"
        raise _RowProblem(reason, column, f"field {column!r} is empty")
    return value


def _messages(value: Any, column: str) -> list[dict[str, str]]:
    if value is None:
        raise _RowProblem("invalid_field", column, f"field {column!r} is null")
    if not _is_message_list(value) or not value:
        raise _RowProblem(
            "invalid_field", column, f"field {column!r} is not a non-empty list of {{role, content}} messages"
        )
    for i, message in enumerate(value):
        if not isinstance(message["content"], str):
            raise _RowProblem("invalid_field", column, f"{column}[{i}].content is not a string")
    return [{"role": str(m["role"]), "content": m["content"]} for m in value]


def _reply(value: Any, column: str) -> tuple[list[dict[str, str]], str]:
    """(history, assistant reply) of a message list whose last message is the reply."""
    messages = _messages(value, column)
    if messages[-1]["role"] != "assistant":
        raise _RowProblem(
            "no_assistant_reply",
            column,
            f"{column}: the last message is {messages[-1]['role']!r}, not an assistant reply",
        )
    if not messages[-1]["content"].strip():
        raise _RowProblem("empty_completion", column, f"{column}: the assistant reply is empty")
    return messages[:-1], messages[-1]["content"]


def _reply_text(value: Any, column: str) -> str:
    """A reply given as a string or as a one-message assistant list (TRL's conversational format)."""
    if isinstance(value, list):
        history, reply = _reply(value, column)
        if history:
            raise _RowProblem(
                "invalid_field", column, f"{column}: expected only the assistant reply, got {len(value)} messages"
            )
        return reply
    return _text({column: value}, column)


def _normalise(fmt: str, row: Mapping[str, Any], mapping: Mapping[str, str] | None) -> dict[str, str]:
    prompt, prompt_messages = "", ""
    if fmt == "plain":
        prompt = _text(row, "prompt")
        chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    elif fmt == "nemo":
        prompt = _text(row, "prompt")
        chosen, rejected = _text(row, "chosen_response"), _text(row, "rejected_response")
    elif fmt == "columns":
        prompt = _text(row, mapping["prompt"])
        chosen, rejected = _text(row, mapping["chosen"]), _text(row, mapping["rejected"])
    elif fmt == "orca":
        system = row.get("system")
        if system is not None and not isinstance(system, str):
            raise _RowProblem(
                "invalid_field", "system", f"field 'system' is {type(system).__name__}, expected a string"
            )
        messages = [{"role": "system", "content": system}] if system and system.strip() else []
        messages.append({"role": "user", "content": _text(row, "question")})
        prompt_messages = json.dumps(messages)
        chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    elif fmt == "ultrafeedback":
        history_c, chosen = _reply(row.get("chosen"), "chosen")
        history_r, rejected = _reply(row.get("rejected"), "rejected")
        if history_c != history_r:
            raise _RowProblem(
                "prompt_mismatch", "rejected", "chosen and rejected conversations differ before the reply"
            )
        if not history_c:
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise _RowProblem("invalid_field", "prompt", "no conversation before the reply and no prompt text")
            history_c = [{"role": "user", "content": row["prompt"]}]
        prompt_messages = json.dumps(history_c)
    elif fmt == "conversational":
        prompt_messages = json.dumps(_messages(row.get("prompt"), "prompt"))
        chosen, rejected = _reply_text(row.get("chosen"), "chosen"), _reply_text(row.get("rejected"), "rejected")
    else:
        raise DataError(f"unknown format {fmt!r}")
    return {"prompt": prompt, "prompt_messages": prompt_messages, "chosen": chosen, "rejected": rejected}


def row_normaliser(fmt: str, mapping: Mapping[str, str] | None = None) -> Callable[[Mapping[str, Any]], dict[str, str]]:
    """A function row -> normalised row, for ``datasets.map``; problems land in drop_reason/error."""

    def normalise(row: Mapping[str, Any]) -> dict[str, str]:
        try:
            out = _normalise(fmt, row, mapping)
            return {**out, "drop_reason": "", "error": ""}
        except _RowProblem as problem:
            empty = {"prompt": "", "prompt_messages": "", "chosen": "", "rejected": ""}
            return {**empty, "drop_reason": problem.reason, "error": problem.detail}

    return normalise
