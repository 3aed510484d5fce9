"""The bundled demo preference data: two-number additions whose preferences are verifiable.

Each pair's prompt is ``"A+B="``; the chosen completion is the right sum and the rejected one a
plausible wrong sum (off by one, off by ten, a dropped carry, or swapped digits). The train and
test splits use disjoint (A, B) pairs, so held-out reward accuracy measures generalisation.
Regenerate the shipped files with ``python -m mmpo_megatron.data.demo_data`` (seeded: the same
seed gives byte-identical files; a test checks this).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DEMO_DIR = Path(__file__).with_name("demo")
SEED = 20260125
SPLIT_SIZES = {"train": 4000, "test": 500}


def demo_data_file(split: str) -> Path:
    """Path of the shipped JSONL file of a split (``train`` or ``test``)."""
    return DEMO_DIR / f"arith_{split}.jsonl"


def _wrong_sum(a: int, b: int, rng: random.Random) -> int:
    right = a + b
    kinds = ["off_by_one", "off_by_ten", "swap"]
    if (a % 10) + (b % 10) >= 10:
        kinds.append("dropped_carry")
    for _ in range(10):
        kind = rng.choice(kinds)
        if kind == "off_by_one":
            wrong = right + rng.choice([-1, 1])
        elif kind == "off_by_ten":
            wrong = right + rng.choice([-10, 10])
        elif kind == "dropped_carry":
            wrong = right - 10
        else:
            digits = str(right)
            wrong = int(digits[::-1]) if len(digits) > 1 else right + 1
        if wrong != right and wrong >= 0:
            return wrong
    return right + 1


def generate(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """All splits as lists of ``{prompt, chosen, rejected}`` rows (plain format)."""
    rng = random.Random(seed)
    operands = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(operands)
    splits = {}
    start = 0
    for split, size in SPLIT_SIZES.items():
        rows = []
        for a, b in operands[start : start + size]:
            rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(_wrong_sum(a, b, rng))})
        splits[split] = rows
        start = start + size
    return splits


def write(seed: int = SEED, directory: Path = DEMO_DIR) -> None:
    """Write every split as JSONL into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(seed).items():
        with (directory / f"arith_{split}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write()
    print(f"wrote {', '.join(str(demo_data_file(s)) for s in SPLIT_SIZES)}")
