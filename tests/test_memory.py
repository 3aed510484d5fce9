"""Peak-memory measurement on CPU, and the memory bound of the fused output-layer log-probs.

The fused head must never hold a [tokens, vocab] tensor: its peak grows with the chunk, not with
the number of tokens, while the unfused path's peak grows with tokens x vocab.
"""

import argparse

import torch
from logprob_memory import main as logprob_memory_main  # noqa: E402
from logprob_memory import measure

from mmpo_megatron.memory import track_peak_memory

HIDDEN, VOCAB, CHUNK = 32, 4000, 64


def test_tracker_counts_live_storages_views_and_saved_tensors():
    n = 1000 * 1000
    with track_peak_memory("cpu") as memory:
        a = torch.empty(n)  # 4 MB
        b = a * 2  # 8 MB live
        view = b[10:]  # a view allocates nothing
        del a  # 4 MB live
        c = b + 1  # 8 MB live
        del view
    assert memory.peak_bytes == 8 * n and memory.end_bytes == 8 * n
    del b, c
    x = torch.randn(n, requires_grad=True)
    with track_peak_memory("cpu") as memory:
        y = x.exp()  # saved for backward: stays alive until backward
        z = (y * 3).sum()
        del y
        z.backward()
    # exp result + (y * 3) at once, then backward temporaries; x.grad stays at the end.
    assert memory.peak_bytes >= 2 * 4 * n
    assert memory.end_bytes == 4 * n + z.untyped_storage().nbytes()


def head_peak(variant: str, tokens: int, seed: int) -> dict:
    args = argparse.Namespace(hidden=HIDDEN, vocab=VOCAB, dtype="fp32", seed=seed)
    return measure(variant, tokens, args, torch.device("cpu"))


def test_fused_head_peak_follows_the_chunk_not_tokens_times_vocab():
    logits_bytes = lambda tokens: tokens * VOCAB * 4  # noqa: E731 (fp32 [tokens, vocab])
    weight_bytes = VOCAB * HIDDEN * 4
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs, the same for every variant
    full_small, full_large = head_peak("full", 512, seed), head_peak("full", 2048, seed)
    fused_small, fused_large = head_peak(f"fused:{CHUNK}", 512, seed), head_peak(f"fused:{CHUNK}", 2048, seed)
    # The unfused path holds at least the logits and their gradient.
    assert full_small["peak_gib"] * 2**30 >= 2 * logits_bytes(512)
    assert full_large["peak_gib"] * 2**30 >= 2 * logits_bytes(2048)
    # Fused: a few [chunk, vocab] buffers, the weight gradient (and its fp32 sum), [tokens, hidden] terms.
    bound = 4 * logits_bytes(CHUNK) + 3 * weight_bytes + 8 * 2048 * HIDDEN * 4
    assert fused_large["peak_gib"] * 2**30 <= bound
    # 4x the tokens adds only [tokens, hidden]-sized memory, never [tokens, vocab].
    growth = (fused_large["peak_gib"] - fused_small["peak_gib"]) * 2**30
    assert growth <= 8 * (2048 - 512) * HIDDEN * 4 < logits_bytes(2048 - 512)
    # Same numbers from every variant.
    for fused, full in ((fused_small, full_small), (fused_large, full_large)):
        assert abs(fused["logp_sum"] - full["logp_sum"]) <= 1e-4 * abs(full["logp_sum"])


def test_logprob_memory_tool_prints_a_table(capsys, tmp_path):
    out = tmp_path / "head.json"
    assert logprob_memory_main(["--hidden", "16", "--vocab", "500", "--tokens", "128", "--chunks", "32",
                                "--dtype", "fp32", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for variant in ("megatron-ce", "full", "fused:32"):
        assert variant in printed
    import json

    results = json.loads(out.read_text())["results"]
    sums = [r["logp_sum"] for r in results]
    assert max(sums) - min(sums) <= 1e-3 * abs(sums[0])
    assert {r["variant"] for r in results} == {"megatron-ce", "full", "fused:32"}
