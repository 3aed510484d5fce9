"""Preference data: every format from fixture files written here, chat templates with exact
masks, truncation, bad rows, mixing, sampler determinism/resume, packing, and the demo data."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from mmpo_megatron.config import ConfigError, DataConfig, DataSourceConfig
from mmpo_megatron.data.collate import collate_pairs
from mmpo_megatron.data.demo_data import SPLIT_SIZES, demo_data_file, generate
from mmpo_megatron.data.formats import DataError
from mmpo_megatron.data.packing import (
    collate_packed,
    pack_pairs,
    packed_causal_mask,
    packed_sequence_sums,
    packing_report,
)
from mmpo_megatron.data.pipeline import build_pairs, prepare_source
from mmpo_megatron.data.sampling import PairSampler, eval_microbatches
from mmpo_megatron.data.tokenizer import build_byte_tokenizer
from tool_runs import tool_main

REPO = Path(__file__).resolve().parents[1]

# A real chat template (ChatML, as Qwen2 ships it), set on a tokenizer built locally.
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def chatml_tok():
    t = build_byte_tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def enc(t, text, special=False):
    return t(text, add_special_tokens=special)["input_ids"]


def prepare(path, tokenizer, fmt="auto", columns=None, **cfg):
    config = DataConfig(
        max_length=cfg.pop("max_length", 256), max_prompt_length=cfg.pop("max_prompt_length", 128), **cfg
    )
    return prepare_source(DataSourceConfig(path=path, format=fmt, columns=columns), tokenizer, config)


# --------------------------------------------------------------------------------------------- formats


def test_plain_nemo_and_column_mapping_give_the_same_tokens(tmp_path, tok):
    eos = tok.eos_token_id
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}])
    nemo = write_jsonl(
        tmp_path / "nemo.jsonl", [{"prompt": "Q: 2+2?", "chosen_response": " 4", "rejected_response": " 5"}]
    )
    custom = tmp_path / "custom.parquet"
    datasets.Dataset.from_list([{"instruction": "Q: 2+2?", "good": " 4", "bad": " 5"}]).to_parquet(str(custom))
    results = [
        prepare(plain, tok)[0][0],
        prepare(nemo, tok)[0][0],
        prepare(
            str(custom), tok, fmt="columns", columns={"prompt": "instruction", "chosen": "good", "rejected": "bad"}
        )[0][0],
    ]
    for row in results:
        assert row["prompt_ids"] == enc(tok, "Q: 2+2?", special=True)
        assert row["prompt_ids"][0] == tok.bos_token_id
        assert row["chosen_ids"] == enc(tok, " 4") + [eos]  # EOS appended to plain completions
        assert row["rejected_ids"] == enc(tok, " 5") + [eos]
        assert row["index"] == 0


def test_conversational_formats_with_a_real_chat_template_exact_masks(tmp_path, chatml_tok):
    t = chatml_tok
    system, question = "Be brief.", "Capital of France?"
    orca = write_jsonl(
        tmp_path / "orca.jsonl", [{"system": system, "question": question, "chosen": "Paris", "rejected": "Lyon"}]
    )
    uf = write_jsonl(
        tmp_path / "uf.jsonl",
        [
            {
                "prompt": question,
                "chosen": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": "Paris"},
                ],
                "rejected": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": "Lyon"},
                ],
            }
        ],
    )
    conv = write_jsonl(tmp_path / "conv.jsonl", [{
        "prompt": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": "Paris"}],
        "rejected": "Lyon",
    }])
    prompt_text = (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    expected_prompt = enc(t, prompt_text)
    expected_chosen = enc(t, "Paris<|im_end|>\n")
    for path in (orca, uf, conv):
        pairs, report = prepare(path, t)
        assert report.pairs_kept == 1, report
        row = pairs[0]
        assert row["prompt_ids"] == expected_prompt, path
        assert row["chosen_ids"] == expected_chosen, path
        assert row["rejected_ids"] == enc(t, "Lyon<|im_end|>\n"), path
        batch = collate_pairs([row], t.pad_token_id, pad_to_multiple=16)
        # Token by token: label j is a completion token iff j >= len(prompt) - 1 (shifted by one).
        n_prompt, n_chosen = len(expected_prompt), len(expected_chosen)
        mask = batch.loss_mask[0].tolist()
        assert mask == [False] * (n_prompt - 1) + [True] * n_chosen + [False] * (len(mask) - n_prompt - n_chosen + 1)
        masked_labels = batch.labels[0][batch.loss_mask[0]].tolist()
        assert masked_labels == expected_chosen
        assert batch.input_ids.shape[1] % 16 == 0
        # The chosen and rejected rows of the pair are rows 0 and 1 of the micro-batch.
        assert batch.labels[1][batch.loss_mask[1]].tolist() == row["rejected_ids"]


def test_template_that_breaks_the_prefix_fails_with_the_row(tmp_path):
    t = build_byte_tokenizer()
    # Renders the generation prompt differently from the start of an assistant turn.
    t.chat_template = (
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] + ';' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT>' }}{% endif %}"
    )
    path = write_jsonl(
        tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}]
    )
    with pytest.raises(DataError, match="row 0: the chat template's prompt tokens"):
        prepare(path, t)


def test_local_folder_and_saved_dataset_and_split_slices(tmp_path, tok):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(3)])
    write_jsonl(folder / "b.jsonl", [{"prompt": f"q{i}", "chosen": "c", "rejected": "r"} for i in range(2)])
    assert len(prepare(str(folder), tok)[0]) == 5
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train_prefs": datasets.Dataset.from_list([{"prompt": "x", "chosen": "y", "rejected": "z"}] * 4)}
    ).save_to_disk(str(saved))
    config = DataConfig(max_length=64, max_prompt_length=32)
    pairs, _ = prepare_source(DataSourceConfig(path=str(saved), split="train_prefs"), tok, config)
    assert len(pairs) == 4
    with pytest.raises(DataError, match="no split 'test'"):
        prepare_source(DataSourceConfig(path=str(saved), split="test"), tok, config)
    sliced, _ = prepare_source(DataSourceConfig(path=str(folder / "a.jsonl"), split="train[:2]"), tok, config)
    assert len(sliced) == 2


# --------------------------------------------------------------------------------------------- bad input


def test_bad_rows_are_counted_and_named(tmp_path, tok):
    rows = [
        {"prompt": "ok", "chosen": "a", "rejected": "b"},  # 0 kept
        {"prompt": "null", "chosen": None, "rejected": "b"},  # 1 invalid_field
        {"prompt": "int", "chosen": "a", "rejected": 7},  # 2 invalid_field
        {"prompt": "empty", "chosen": "   ", "rejected": "b"},  # 3 empty_completion
        {"prompt": "same", "chosen": "a", "rejected": "a"},  # 4 kept, identical
        {"prompt": "", "chosen": "a", "rejected": "b"},  # 5 empty_prompt
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    pairs, report = prepare(path, tok)
    assert report.pairs_in == 6 and report.pairs_kept == 2
    assert report.dropped == {"invalid_field": 2, "empty_completion": 1, "empty_prompt": 1}
    assert report.identical_pairs == 1
    assert sorted(pairs["index"]) == [0, 4]
    errors = {e["index"]: e for e in report.errors}
    assert "field 'chosen'" in errors[1]["error"] and "null" in errors[1]["error"]
    assert "field 'rejected'" in errors[2]["error"] and "int" in errors[2]["error"]
    assert errors[3]["reason"] == "empty_completion"
    with pytest.raises(DataError, match=r"row 1: field 'chosen'.*on_bad_row=error"):
        prepare(path, tok, on_bad_row="error")


def test_message_list_without_assistant_reply_and_mismatched_history(tmp_path, chatml_tok):
    rows = [
        {"chosen": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
    ]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    pairs, report = prepare(path, chatml_tok, fmt="ultrafeedback")
    assert report.dropped == {"no_assistant_reply": 1, "prompt_mismatch": 1}
    assert pairs["index"] == [2]
    assert "not an assistant reply" in report.errors[0]["error"]


def test_fatal_errors_name_source_line_and_column(tmp_path, tok):
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: line 2 is not valid JSON"):
        prepare(str(bad_json), tok)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match="cannot detect the preference format"):
        prepare(missing, tok)
    with pytest.raises(DataError, match=r"needs column\(s\) \['rejected'\]"):
        prepare(missing, tok, fmt="plain")
    with pytest.raises(DataError, match="unknown format 'sharegpt'"):
        prepare(missing, tok, fmt="sharegpt")
    with pytest.raises(DataError, match="no such file"):
        prepare(str(tmp_path / "nope.jsonl"), tok)
    conv = write_jsonl(
        tmp_path / "conv.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}]
    )
    no_template = build_byte_tokenizer()
    no_template.chat_template = None
    with pytest.raises(DataError, match="row 0 is conversational but tokenizer"):
        prepare(conv, no_template)
    with pytest.raises(ConfigError, match="data.max_prompt_length"):
        DataConfig(max_length=10, max_prompt_length=10)


# --------------------------------------------------------------------------------------------- truncation


def test_truncation_keeps_pairs_aligned_and_counts_drops(tmp_path, tok):
    rows = [
        {"prompt": "P" * 20, "chosen": "c" * 30, "rejected": "r" * 5},  # prompt cut left to 10, chosen cut to 22
        {"prompt": "short", "chosen": "ok", "rejected": "no"},  # untouched
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    pairs, report = prepare(path, tok, max_length=32, max_prompt_length=10)
    assert report.truncated_pairs == 1 and report.pairs_kept == 2
    first = pairs[0]
    assert first["prompt_ids"] == enc(tok, "P" * 20, special=True)[-10:]  # left truncation keeps the end
    assert first["chosen_ids"] == enc(tok, "c" * 30)[:22]  # right truncation: budget 32 - 10
    assert first["rejected_ids"] == enc(tok, "r" * 5) + [tok.eos_token_id]
    assert len(first["prompt_ids"]) + max(len(first["chosen_ids"]), len(first["rejected_ids"])) <= 32
    # Without a prompt limit the limit follows max_length: the long prompt keeps its last 8 tokens
    # (half of 16, since the 31-token completion would take everything), the completions the other 8.
    pairs, report = prepare(path, tok, max_length=16, max_prompt_length=None)
    assert report.dropped == {} and report.truncated_pairs == 1 and pairs["index"] == [0, 1]
    first = pairs[0]
    assert first["prompt_ids"] == enc(tok, "P" * 20, special=True)[-8:]
    assert first["chosen_ids"] == enc(tok, "c" * 30)[:8]
    assert first["rejected_ids"] == enc(tok, "r" * 5) + [tok.eos_token_id]
    # A short completion leaves the prompt everything else.
    short = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Q" * 20, "chosen": "ok", "rejected": "no"}])
    pairs, _ = prepare(short, tok, max_length=16, max_prompt_length=None)
    completion = len(enc(tok, "ok")) + 1
    assert pairs[0]["prompt_ids"] == enc(tok, "Q" * 20, special=True)[-(16 - completion):]
    assert pairs[0]["chosen_ids"] == enc(tok, "ok") + [tok.eos_token_id]


def test_a_source_weight_is_the_fraction_of_it_an_epoch_uses(tmp_path, tok):
    """Two local sources of 10 and 6 pairs: 1.0 + 1.0 is their concatenation; 0.5 a seeded half;
    2.0 every pair twice; held-out sources never repeat a pair; the report says what each gave."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "chosen": "x", "rejected": "y"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "chosen": "x", "rejected": "y"} for i in range(6)])
    config = DataConfig(max_length=64, max_prompt_length=32, seed=3)

    def counts(pairs):
        return Counter(p.split(":")[0].rsplit("/", 1)[-1] for p in pairs["source"])

    plain, report = build_pairs([DataSourceConfig(path=a), DataSourceConfig(path=b)], tok, config)
    assert counts(plain) == {"a.jsonl": 10, "b.jsonl": 6} and report.pairs_used == 16
    assert sorted(zip(plain["source"], plain["index"])) == sorted(
        set(zip(plain["source"], plain["index"]))
    )  # once each
    weighted, report = build_pairs(
        [DataSourceConfig(path=a, weight=0.5), DataSourceConfig(path=b, weight=2.0)], tok, config
    )
    assert counts(weighted) == {"a.jsonl": 5, "b.jsonl": 12} and report.pairs_used == 17
    assert len(set(i for s, i in zip(weighted["source"], weighted["index"]) if s.startswith(str(a)))) == 5  # a half
    assert Counter(i for s, i in zip(weighted["source"], weighted["index"]) if s.startswith(str(b))) == {
        i: 2 for i in range(6)
    }
    again, _ = build_pairs([DataSourceConfig(path=a, weight=0.5)], tok, config)
    assert again["index"] == [
        i for s, i in zip(weighted["source"], weighted["index"]) if s.startswith(str(a))
    ]  # seeded
    assert [(s["pairs_kept"], s["weight"], s["pairs_used"]) for s in report.sources] == [(10, 0.5, 5), (6, 2.0, 12)]
    assert "17 pairs an epoch" in report.summary()
    held_out, report = build_pairs([DataSourceConfig(path=a, weight=3.0), DataSourceConfig(path=b, weight=1.5)], tok,
                                   config, held_out=True)
    assert counts(held_out) == {"a.jsonl": 10, "b.jsonl": 6} and report.pairs_in == 16


# --------------------------------------------------------------------------------------------- sampler


def test_sampler_is_deterministic_and_dp_independent():
    n, gbs, mbs = 50, 8, 2
    steps = 14  # crosses the epoch boundary (6 steps/epoch)
    sampler = PairSampler(n, gbs, mbs, 0, 1, seed=5)
    ref_steps = [sum(sampler.step_microbatches(step * gbs), []) for step in range(steps)]
    # Epoch 0 covers distinct pairs; epoch 1 is a different permutation.
    epoch0 = sum(ref_steps[:6], [])
    assert len(set(epoch0)) == 48
    assert ref_steps[6] != ref_steps[0]
    for dp in (2, 4):
        ranks = [PairSampler(n, gbs, mbs, r, dp, seed=5) for r in range(dp)]
        for step in range(steps):
            per_rank = [r.step_microbatches(step * gbs) for r in ranks]
            assert all(len(m) == gbs // (mbs * dp) for m in per_rank)
            assert sorted(sum((sum(m, []) for m in per_rank), [])) == sorted(ref_steps[step])
    # Resume from a consumed-samples count with a new sampler, also under another DP size.
    for dp in (1, 2):
        for resume_step in (3, 6, 9):
            ranks = [PairSampler(n, gbs, mbs, r, dp, seed=5) for r in range(dp)]
            for step in range(resume_step, steps):
                got = sorted(sum((sum(r.step_microbatches(step * gbs), []) for r in ranks), []))
                assert got == sorted(ref_steps[step])
    with pytest.raises(ValueError, match="not divisible by micro batch"):
        PairSampler(n, 10, 4, 0, 1)
    with pytest.raises(ValueError, match="not a multiple of the global batch"):
        PairSampler(n, 8, 2, 0, 1).step_microbatches(5)


def test_length_grouping_and_eval_batches():
    lengths = list(range(16))
    sampler = PairSampler(16, 8, 2, 0, 2, seed=1, lengths=lengths)
    micro = sampler.step_microbatches(0)
    for m in micro:
        assert max(lengths[i] for i in m) - min(lengths[i] for i in m) <= 8
    other = PairSampler(16, 8, 2, 1, 2, seed=1, lengths=lengths).step_microbatches(0)
    ungrouped = sum(PairSampler(16, 8, 2, 0, 1, seed=1).step_microbatches(0), [])
    assert sorted(sum(micro + other, [])) == sorted(ungrouped)  # same global batch, other split
    batches = [eval_microbatches(7, 2, r, 2) for r in range(2)]
    assert len(batches[0]) == len(batches[1]) == 2
    seen = [i for b in batches for m in b for i in m if i is not None]
    assert sorted(seen) == list(range(7))
    assert batches == [[[0, 1], [4, 5]], [[2, 3], [6, None]]]


# --------------------------------------------------------------------------------------------- packing


def _packing_equivalence(seed):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mmpo_megatron.logprobs import sequence_logprobs, token_logprobs
    from mmpo_megatron.parallel import initialize_parallel

    initialize_parallel(device="cpu")
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(7):
        lp, lc, lr = (int(x) for x in torch.randint(2, 12, (3,), generator=g))
        pairs.append({"prompt_ids": torch.randint(3, 60, (lp,), generator=g).tolist(),
                      "chosen_ids": torch.randint(3, 60, (lc,), generator=g).tolist(),
                      "rejected_ids": torch.randint(3, 60, (lr,), generator=g).tolist(), "index": i})
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                            hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=64,
                     max_sequence_length=64, position_embedding_type="learned_absolute")
    model.eval()
    with torch.no_grad():
        unpacked = collate_pairs(pairs, pad_id=0, pad_to_multiple=8)
        length = unpacked.input_ids.shape[1]
        causal = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), diagonal=1)
        logits = model(unpacked.input_ids, unpacked.position_ids, causal)
        plain = sequence_logprobs(logits, unpacked.labels, unpacked.loss_mask)
        row_length = 64
        bins = pack_pairs(pairs, row_length)
        packed = collate_packed(pairs, bins, row_length, pad_id=0)
        logits = model(packed.input_ids, packed.position_ids, packed_causal_mask(packed.segment_ids))
        per_token = token_logprobs(logits, packed.labels)
        sums = packed_sequence_sums(per_token, packed)
    by_sequence = {(pos, side): sums[k].item() for k, (_, pos, side) in enumerate(packed.sequences)}
    n = len(pairs)
    expected = {(i, "chosen"): plain[i].item() for i in range(n)} | {
        (i, "rejected"): plain[n + i].item() for i in range(n)
    }
    return {"packed": by_sequence, "unpacked": expected, "report": packing_report(pairs, bins, row_length),
            "bins": bins}


def test_packed_rows_give_the_same_sequence_logprobs_as_padded_rows():
    from mmpo_megatron.parallel.local_ranks import run_on_ranks

    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    (result,) = run_on_ranks(_packing_equivalence, 1, seed)
    assert result["packed"].keys() == result["unpacked"].keys()
    for key, value in result["unpacked"].items():
        assert result["packed"][key] == pytest.approx(value, rel=1e-5, abs=1e-4), (key, seed)
    report = result["report"]
    assert report["rows"] == len(result["bins"]) < 7 and 0 < report["fill_ratio"] <= 1


def test_thd_boundaries_cover_every_sequence_and_each_rows_padding_on_its_own():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    pairs = [{"prompt_ids": [5] * int(a), "chosen_ids": [6] * int(b), "rejected_ids": [7] * int(c)}
             for a, b, c in torch.randint(1, 9, (6, 3), generator=g)]
    row_length = 40
    bins = pack_pairs(pairs, row_length)
    # Pipeline stages pad every micro-batch to one shape: an empty row and 8 columns more.
    packed = collate_packed(pairs, bins, row_length, pad_id=0).padded_to(len(bins) + 1, row_length + 8)
    length = row_length + 8
    expected = []
    for r, members in enumerate(bins + [[]]):
        offset = r * length
        expected.append(offset)
        for pos in members:
            for side in ("chosen", "rejected"):  # each row is prompt + completion minus one token
                offset += len(pairs[pos]["prompt_ids"]) + len(pairs[pos][f"{side}_ids"]) - 1
                expected.append(offset)
        if offset == (r + 1) * length:  # a full row has no padding sequence
            expected.pop()
    expected.append(packed.input_ids.numel())
    cu_seqlens, longest = packed.thd_cu_seqlens()
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == expected
    assert longest == max(b - a for a, b in zip(expected, expected[1:]))


def test_pack_rejects_pairs_longer_than_a_row():
    pair = {"prompt_ids": [1] * 10, "chosen_ids": [2] * 10, "rejected_ids": [3] * 10}
    with pytest.raises(ValueError, match="pair 0 needs 38 tokens"):
        pack_pairs([pair], 32)


# --------------------------------------------------------------------------------------------- demo data & CLI


def test_demo_data_is_reproducible_and_verifiable():
    generated = generate()
    for split, size in SPLIT_SIZES.items():
        shipped = [json.loads(line) for line in demo_data_file(split).read_text().splitlines()]
        assert shipped == generated[split] and len(shipped) == size
        for row in shipped:
            a, b = (int(x) for x in row["prompt"].rstrip("=").split("+"))
            assert int(row["chosen"]) == a + b and int(row["rejected"]) != a + b
    train_ops = {r["prompt"] for r in generated["train"]}
    assert not train_ops & {r["prompt"] for r in generated["test"]}  # held-out operands


def test_inspect_data_cli(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": None, "rejected": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(REPO / "tools/inspect_data.py"), "--data", path, "--max-length", "64",
                           "--max-prompt-length", "32", "--examples", "1", "--report", str(report)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1/2 pairs kept" in done.stdout and "loss mask over labels" in done.stdout
    data = json.loads(report.read_text())
    assert data["pairs_in"] == 2 and data["pairs_kept"] == 1 and data["dropped"] == {"invalid_field": 1}
    assert data["errors"][0]["index"] == 1
    # The error paths through the tool's main() (one interpreter start-up is enough for the CLI itself).
    # The trainer's data.* keys work as overrides: the bad row becomes fatal.
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json}\n")
    (code, _, stderr), (code2, _, stderr2) = tool_main(str(REPO / "tools/inspect_data.py"), [
        ["--data", path, "data.on_bad_row=error", "data.max_length=64", "data.max_prompt_length=32"],
        ["--data", str(broken)]])
    assert code == 2 and "row 1" in stderr and "on_bad_row=error" in stderr, stderr[-1000:]
    assert code2 == 2 and "line 1 is not valid JSON" in stderr2, stderr2[-1000:]


def test_tokenisation_is_cached_across_runs(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(10)])
    first, _ = prepare(path, tok)
    second, _ = prepare(path, tok)
    files = [f["filename"] for f in first.cache_files]
    assert files and files == [f["filename"] for f in second.cache_files]
    assert all(Path(f).exists() for f in files)


def test_inspect_data_mixes_several_sources_and_says_what_each_gave(tmp_path, tok, capsys):
    import inspect_data

    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "chosen": "x", "rejected": "y"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "chosen": "x", "rejected": "y"} for i in range(6)])
    assert (
        inspect_data.main(["--data", str(a), "--data", str(b), "--examples", "0", "--report", str(tmp_path / "r.json")])
        == 0
    )
    out = capsys.readouterr().out
    assert f"{a}:train: 10 pairs an epoch (weight 1 of 10 kept)" in out and "mixed: 16 pairs an epoch" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pairs_used"] == 16 and [s["pairs_used"] for s in report["sources"]] == [10, 6]
