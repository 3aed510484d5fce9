"""A language-modelling corpus for the run to watch (``eval.lm_data``): documents laid out as
preference pairs whose chosen side is the document, so the policy's and the reference's ordinary
scoring path (any TP/PP/DP, packing, the fused head) gives each document's summed log-prob.

A document's first token (the tokenizer's BOS where it adds one) is the pair's prompt, the rest its
chosen completion; the rejected side is one token, scored and ignored. The mean per-token NLL is
``-sum(chosen log-probs) / sum(chosen tokens)`` over the corpus.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets

from mmpo_megatron.config import ConfigError


def read_documents(path: str | Path, limit: int) -> list[str]:
    """The first ``limit`` documents of a .txt file (one a line) or a JSONL file (a ``text`` field)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval.lm_data: {path} is not a file (a .txt with one document a line, or JSONL with 'text')")
    documents = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            if path.suffix in (".jsonl", ".json"):
                try:
                    line = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ConfigError(f"eval.lm_data: {path} line {number} has no 'text' field ({exc})") from None
            documents.append(line)
            if len(documents) == limit:
                break
    if not documents:
        raise ConfigError(f"eval.lm_data: {path} holds no document")
    return documents


def lm_documents(path: str | Path, tokenizer, max_length: int, limit: int) -> datasets.Dataset:
    """The corpus as pairs (``prompt_ids`` the first token, ``chosen_ids`` the rest, ``rejected_ids``
    one token), each document cut to ``max_length`` tokens; documents of one token are left out."""
    rows = []
    for index, text in enumerate(read_documents(path, limit)):
        tokens = list(tokenizer(text)["input_ids"])[:max_length]
        if len(tokens) < 2:
            continue
        rows.append({"prompt_ids": tokens[:1], "chosen_ids": tokens[1:], "rejected_ids": tokens[-1:],
                     "source": f"{path}:lm", "index": index})
    if not rows:
        raise ConfigError(f"eval.lm_data: no document of {path} has two tokens")
    documents = datasets.Dataset.from_list(rows)
    # A fingerprint of the content (an in-memory dataset gets a random one): a precomputed
    # reference's cache, keyed by it, is then found again on restart.
    content = hashlib.sha256(json.dumps([r["prompt_ids"] + r["chosen_ids"] for r in rows]).encode()).hexdigest()[:16]
    documents._fingerprint = f"lm-{content}"
    return documents
