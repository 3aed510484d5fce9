"""megatron DDP around the policy's model chunks and its mixed-precision (distributed) optimizer.

One construction for the trainer and the benchmark, so the benchmark times the training path.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mmpo_megatron.config import OptimConfig
from mmpo_megatron.model.builder import unwrap


def wrap_for_training(chunks: Sequence[torch.nn.Module], optim: OptimConfig, dtype: torch.dtype) -> tuple[list, object]:
    """(DDP-wrapped chunks, megatron optimizer): fp32 gradient reduction, fp32 master weights under bf16."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = unwrap(chunks[0]).config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=optim.distributed_optimizer
    )
    # Bucketing only for the first virtual stage, as megatron-LM does for interleaved schedules.
    wrapped = [DistributedDataParallel(config, ddp_config, module=chunk, disable_bucketing=i > 0)
               for i, chunk in enumerate(chunks)]
    config.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad, bf16=dtype == torch.bfloat16, params_dtype=dtype,
            use_distributed_optimizer=optim.distributed_optimizer,
        ),
        wrapped,
    )
    return wrapped, optimizer
