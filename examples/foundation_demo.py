"""Smallest real thing the foundation can do (until the trainer lands): under torchrun, build a
tiny megatron-core GPT at TP = world size, score random preference pairs with vocab-parallel
log-probs, normalise MMPO's prior rewards over the global batch, and print MMPO and DPO losses.

    torchrun --nproc-per-node 2 examples/foundation_demo.py
"""

import math

import torch

from mmpo_megatron.config import LossConfig
from mmpo_megatron.logprobs import sequence_logprobs
from mmpo_megatron.losses import PairLogProbs, preference_loss, prior_rewards
from mmpo_megatron.parallel import destroy_parallel, initialize_parallel
from mmpo_megatron.parallel.batch_stats import normalisation_stats


def main() -> None:
    import torch.distributed as dist
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    initialize_parallel(tensor_parallel=int(__import__("os").environ.get("WORLD_SIZE", "1")), device="auto")
    tp = dist.get_world_size()
    torch.manual_seed(0)
    vocab, seq, pairs = 256, 32, 4
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, tensor_model_parallel_size=tp,
                               use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=vocab,
                     max_sequence_length=seq, position_embedding_type="rope")
    tokens = torch.randint(0, vocab, (2 * pairs, seq + 1))  # rows: chosen 0..3, rejected 4..7
    mask = torch.zeros(2 * pairs, seq, dtype=torch.bool)
    mask[:, 10:] = True  # a 10-token prompt
    positions = torch.arange(seq).unsqueeze(0).expand(2 * pairs, -1)
    causal = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    logits = model(tokens[:, :-1], positions, causal)
    logps = sequence_logprobs(logits, tokens[:, 1:], mask)
    chosen, rejected = logps.sum[:pairs], logps.sum[pairs:]
    ref_c, ref_r = chosen.detach(), rejected.detach()  # the policy is its own reference at step 0

    rc, rr = prior_rewards(ref_c, ref_r, beta=0.1)
    stats = normalisation_stats([rc], [rr], "global")
    pair_logps = PairLogProbs(chosen, rejected, logps.tokens[:pairs], logps.tokens[pairs:], ref_c, ref_r)
    mmpo, metrics = preference_loss(LossConfig(name="mmpo"), pair_logps,
                                    norm_min=stats.norm_min[0], norm_max=stats.norm_max[0])
    dpo, _ = preference_loss(LossConfig(name="dpo"), pair_logps)
    if dist.get_rank() == 0:
        print(f"TP={tp}: vocab shard {logits.shape[-1]} of {vocab}; chosen log-probs {chosen.tolist()}")
        print(f"MMPO loss {mmpo.mean().item():.4f} (== -rewards/chosen: {torch.equal(mmpo, -metrics['rewards/chosen'])})")
        print(f"DPO loss at step 0 {dpo.mean().item():.6f} (ln 2 = {math.log(2):.6f})")
    destroy_parallel(destroy_process_group=True)


if __name__ == "__main__":
    main()
