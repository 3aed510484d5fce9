"""megatron DDP around the policy's model chunks and its mixed-precision (distributed) optimizer.

One construction for the trainer and the benchmark, so the benchmark times the training path.

Under bf16 the optimizer updates fp32 master copies of the weights and copies them into the bf16
parameters after each step: a parameter written behind the optimizer's back (loaded weights, a
resharded resume) is thrown away at the next step unless its master is re-derived from it
(``refresh_masters``). ``masters_out_of_step`` is the check that none was missed.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from mmpo_megatron.config import OptimConfig, ParallelConfig
from mmpo_megatron.model.builder import unwrap


def wrap_for_training(chunks: Sequence[torch.nn.Module], optim: OptimConfig, parallel: ParallelConfig,
                      dtype: torch.dtype) -> tuple[list, object]:
    """(DDP-wrapped chunks, megatron optimizer): fp32 gradient reduction, fp32 master weights under
    bf16, and the data-parallel communication overlap and bucket size of ``parallel``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = unwrap(chunks[0]).config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=optim.distributed_optimizer,
        overlap_grad_reduce=parallel.overlap_grad_reduce, overlap_param_gather=parallel.overlap_param_gather,
        bucket_size=parallel.ddp_bucket_size,
    )
    # Bucketing only for the first virtual stage, as megatron-LM does for interleaved schedules.
    wrapped = [DistributedDataParallel(config, ddp_config, module=chunk, disable_bucketing=i > 0,
                                       **_param_layout(chunk, ddp_config, disable_bucketing=i > 0))
               for i, chunk in enumerate(chunks)]

    def per_chunk(method: str):
        functions = [getattr(chunk, method) for chunk in wrapped]
        return functions if len(functions) > 1 else functions[0]

    # The schedules call these as Megatron-LM's training loop sets them: gradient sync held back
    # until the last micro-batch, then (overlapped) started per chunk as its backward ends, and
    # the parameter all-gather started per chunk before its first forward.
    config.no_sync_func = per_chunk("no_sync")
    if parallel.overlap_grad_reduce:
        config.grad_sync_func = per_chunk("start_grad_sync")
    if parallel.overlap_param_gather:
        config.param_sync_func = per_chunk("start_param_sync")
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
    use_fused_torch_adam(optimizer)
    return wrapped, optimizer


def _param_layout(chunk: torch.nn.Module, ddp_config, *, disable_bucketing: bool) -> dict:
    """DDP's ``full_param_layout`` where megatron-core takes one (>= 0.18 with the distributed
    optimizer, which otherwise computes it inside DDP and warns that callers should): the same
    computation, with the bucket size DDP itself would use."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    compute = getattr(DistributedOptimizer, "compute_full_param_layout", None)
    if compute is None or not ddp_config.use_distributed_optimizer:
        return {}
    data_parallel = ps.get_data_parallel_world_size(with_context_parallel=True)
    bucket_size = ddp_config.bucket_size
    if bucket_size is None:
        bucket_size = max(40000000, 1000000 * data_parallel)  # DDP's own default
    if not ddp_config.overlap_grad_reduce or disable_bucketing or ps.get_pipeline_model_parallel_rank() > 0:
        bucket_size = None
    parameters = [p for p in chunk.parameters() if p.requires_grad]
    layout = compute(parameters, bucket_size, data_parallel, ddp_config,
                     expert_data_parallel_world_size=ps.get_expert_data_parallel_world_size())
    return {"full_param_layout": layout}


def use_fused_torch_adam(optimizer) -> int:
    """Switch megatron's fallback torch Adam/AdamW (no TE or Apex installed) to its fused kernel; returns
    how many param groups were switched.

    torch picks the multi-kernel foreach implementation by default: about three times the memory
    traffic of the single fused pass over fp32 master weights, gradients and both moments. The
    groups' ``fused`` flag is read at every step (and saved with the optimizer state).
    """
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    switched = 0
    for torch_optimizer in inner:
        if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue  # TE / Apex FusedAdam: fused already
        for group in torch_optimizer.param_groups:
            if group.get("differentiable") or group.get("fused"):
                continue
            if all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in group["params"]):
                group["fused"] = True
                group["foreach"] = False
                switched += 1
    return switched


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def master_weights(optimizer) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]:
    """(parameter, the part of it this rank's optimizer updates, its fp32 master) for every
    parameter kept in lower precision than its master; nothing for fp32 parameters, which the
    optimizer updates in place.

    megatron's non-distributed mixed-precision optimizer keeps a whole master per parameter; the
    distributed one keeps this data-parallel rank's contiguous range of the flattened parameter.
    """
    for inner in _inner_optimizers(optimizer):
        if hasattr(inner, "shard_fp32_from_float16_groups"):  # DistributedOptimizer
            for params, masters in zip(inner.model_float16_groups, inner.shard_fp32_from_float16_groups):
                for param, master in zip(params, masters):
                    owned = inner._get_model_param_range_map(param)["param"]
                    yield param, param.detach().view(-1)[owned.start:owned.end], master
        elif hasattr(inner, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params
            for params, masters in zip(inner.float16_groups, inner.fp32_from_float16_groups):
                for param, master in zip(params, masters):
                    yield param, param.detach(), master


def refresh_masters(optimizer) -> None:
    """Re-derive the fp32 master weights from the parameters (megatron's reload_model_params)."""
    optimizer.reload_model_params()


def masters_out_of_step(optimizer) -> list[torch.nn.Parameter]:
    """Parameters whose fp32 master, rounded to the parameter's dtype, is not the parameter: the
    next step would overwrite them with the master's value."""
    stale = []
    with torch.no_grad():
        for param, owned, master in master_weights(optimizer):
            if not torch.equal(master.detach().to(owned.dtype).view(-1), owned.reshape(-1)):
                stale.append(param)
    return stale
