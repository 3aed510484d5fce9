#!/usr/bin/env python
"""Score preference pairs with a trained checkpoint: summed completion log-probs per pair.

    python tools/score_pairs.py --checkpoint outputs/demo/checkpoints --output scores.jsonl
    torchrun --nproc-per-node 4 tools/score_pairs.py --checkpoint ckpt/ --reference sft_ckpt/ --tp 2 --pp 2 \\
        --data pairs.jsonl --tokenizer /models/tok --output scores.jsonl

Without ``--split`` a source's held-out split is scored where it has one (embedded: test; a saved
dataset: test or test_prefs), and a local file is scored whole; the output says which split.
``--max-length`` alone makes the prompt limit follow it (docs/data.md); without either flag both
limits are the training run's.

Writes one JSON object per kept pair, in input order: ``{"index", "chosen_logps", "rejected_logps"}``
(+ ``ref_chosen_logps``, ``ref_rejected_logps`` and ``implicit_reward_correct`` with
``--reference``), and prints the implicit-reward accuracy. Any TP/PP under torchrun (the
checkpoint reshards on load); a plain ``python`` call on a machine without a GPU runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmpo_megatron.config import DEVICES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a step_NNNNNNN folder, or a checkpoints/run folder (newest)")
    p.add_argument("--reference", help="reference checkpoint, for implicit rewards")
    p.add_argument("--data", default="embedded", help="data file/folder/hub name (default: embedded)")
    p.add_argument("--split", help="default: the held-out split where the data has one, else all of it")
    p.add_argument("--format", default="auto",
                   help="auto, plain, orca, ultrafeedback, conversational or nemo (default: auto)")
    p.add_argument("--tokenizer", help="default: the one the checkpoint was trained with")
    p.add_argument("--max-length", type=int, help="default: the training config's")
    p.add_argument("--max-prompt-length", type=int)
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", choices=DEVICES)
    return p.parse_args(argv)


def score_pairs(args: argparse.Namespace) -> dict | None:
    """Score and write; returns a summary on the writing rank (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mmpo_megatron.config import DataConfig, DataSourceConfig, LossConfig, ParallelConfig, PrecisionConfig
    from mmpo_megatron.data.pipeline import build_pairs, held_out_split
    from mmpo_megatron.data.tokenizer import load_tokenizer
    from mmpo_megatron.model.builder import build_model_chunks
    from mmpo_megatron.model.checkpoint import TRAINER_STATE, load_weights, resolve_checkpoint, saved_model_config
    from mmpo_megatron.model.objective import objective_for
    from mmpo_megatron.model.preference_model import MegatronPreferenceModel
    from mmpo_megatron.model.schedule import ForwardPlan
    from mmpo_megatron.parallel import destroy_parallel, initialize_parallel

    policy_path = resolve_checkpoint(args.checkpoint)
    state = json.loads((policy_path / TRAINER_STATE).read_text())
    train_cfg = state.get("train_config", {})
    data_cfg = dict(train_cfg.get("data", {}))
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, device=args.device)
    layout = initialize_parallel(parallel)
    try:
        split = args.split or held_out_split(args.data)
        if args.max_length is None and args.max_prompt_length is None:  # the limits the model was trained with
            max_length, max_prompt_length = data_cfg.get("max_length", 2312), data_cfg.get("max_prompt_length")
        else:  # a prompt limit not given follows the given max_length
            max_length, max_prompt_length = args.max_length or data_cfg.get("max_length", 2312), args.max_prompt_length
        data = DataConfig(
            train=[DataSourceConfig(path=args.data, split=split, format=args.format)],
            tokenizer=args.tokenizer or state.get("tokenizer", "embedded"),
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            pad_to_multiple=data_cfg.get("pad_to_multiple", 16),
        )
        tokenizer = load_tokenizer(data.tokenizer)
        pairs, report = build_pairs(data.train, tokenizer, data, held_out=True)  # every pair once, in order
        model = saved_model_config(state)
        precision = PrecisionConfig(**train_cfg.get("precision", {}))

        def scores_of(path):
            chunks = build_model_chunks(
                model, parallel, precision, vocab_size=state["vocab_size"], device=layout.device.type
            )
            load_weights(path, chunks)
            scorer = MegatronPreferenceModel(
                chunks,
                objective_for(LossConfig()),
                vocab_size=state["vocab_size"],
                pad_id=tokenizer.pad_token_id,
                forward_plan=ForwardPlan.of(model),
                pad_to_multiple=data.pad_to_multiple,
                micro_batch_size=args.micro_batch_size,
            )
            return scorer.score(pairs)

        policy = scores_of(policy_path)
        reference = scores_of(resolve_checkpoint(args.reference)) if args.reference else None
        writer = (
            ps.is_pipeline_last_stage(ignore_virtual=True)
            and ps.get_data_parallel_rank() == 0
            and ps.get_tensor_model_parallel_rank() == 0
        )
        summary = None
        if writer:
            out = Path(args.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            correct = 0
            with out.open("w", encoding="utf-8") as handle:
                for pos in sorted(range(len(pairs)), key=lambda i: pairs[i]["index"]):
                    record = {"index": int(pairs[pos]["index"]), "chosen_logps": float(policy.chosen[pos]),
                              "rejected_logps": float(policy.rejected[pos])}
                    if reference is not None:
                        record["ref_chosen_logps"] = float(reference.chosen[pos])
                        record["ref_rejected_logps"] = float(reference.rejected[pos])
                        record["implicit_reward_correct"] = bool(
                            policy.chosen[pos] - reference.chosen[pos] > policy.rejected[pos] - reference.rejected[pos]
                        )
                        correct += record["implicit_reward_correct"]
                    handle.write(json.dumps(record) + "\n")
            summary = {"pairs": len(pairs), "data": args.data, "split": split, "output": str(out),
                       "data_report": report.to_json()}
            if reference is not None:
                summary["implicit_reward_accuracy"] = correct / max(len(pairs), 1)
            print(f"scored {len(pairs)} pairs of {args.data} (split {split!r}; {report.summary()}) -> {out}")
            if reference is not None:
                print(f"implicit-reward accuracy vs reference: {summary['implicit_reward_accuracy']:.4f}")
        dist.barrier()
        return summary
    finally:
        destroy_parallel()


def main(argv: list[str] | None = None) -> int:
    """CLI entry; exit code 2 on bad input."""
    args = parse_args(argv)
    from mmpo_megatron.config import ConfigError
    from mmpo_megatron.data.formats import DataError
    from mmpo_megatron.model.checkpoint import DamagedCheckpointError
    from mmpo_megatron.parallel import destroy_parallel

    try:
        score_pairs(args)
    except (ConfigError, DataError, DamagedCheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel(destroy_process_group=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
