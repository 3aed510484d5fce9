"""LoRA adapters inside megatron's parallel linears, with PEFT's semantics and layout.

    y = W x + (alpha / r) * B A dropout(x)         one adapter per Hugging Face projection

The fused linears keep one adapter per HF projection (Megatron-Bridge's "canonical" LoRA):
``linear_qkv`` holds q_proj, k_proj and v_proj, whose outputs go into the grouped QKV layout
(per query group: its query heads, then k, then v); ``linear_fc1`` holds gate_proj and up_proj
(``[gate; up]`` on every TP rank). Sharding follows the base weight, on the same TP group:

- column-parallel bases (linear_qkv, linear_fc1): A [r, in] whole on every TP rank, B split by
  output rows like W. The adapter reads the base's input gathered along the sequence under
  sequence parallelism (its backward keeps this rank's part only: the base's own gather sums the
  input gradient over TP). Each rank's B shard gives a partial dL/d(Ax), summed over TP before A.
- row-parallel bases (linear_proj, linear_fc2): A split by input columns like W, its partial
  product all-reduced; B [out, r] whole on every rank; under sequence parallelism the output is
  split along the sequence like the base's reduce-scatter (whose backward gathers the gradient
  back, so B's gradient is whole on every rank).

Pipeline stages need nothing: adapters live inside the layers. The base linear keeps its own
parameter names and checkpoint keys; the adapters sit beside it as
``<linear>.lora.projections.<proj>.lora_A.weight`` / ``lora_B.weight`` with their own TP sharding
in the distributed checkpoint. Initialisation as PEFT
(A Kaiming-uniform with a = sqrt(5) over the whole input, B zero), from a generator seeded by the
layer and projection, so every TP x PP layout builds the same adapters.
"""

from __future__ import annotations

import contextlib
import json
import math
import types
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from mmpo_megatron.config import ConfigError, LoraConfig, lora_projections

# megatron linear -> its HF projections, in the order their outputs sit in the fused output.
LINEAR_PROJECTIONS = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
                      "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
ADAPTER = "lora"  # the attribute (and checkpoint key part) of a base linear's adapters


class LoraMatrix(torch.nn.Module):
    """One adapter matrix, applied as ``x @ weight.T``. A module of its own, called as one: megatron's
    DDP finishes a parameter's deferred all-gather (overlap_param_gather) in the pre-forward hook
    of the module that holds it, which a bare ``F.linear`` on the tensor would bypass."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T"""
        return F.linear(x, self.weight)


class LoraProjection(torch.nn.Module):
    """One HF projection's adapter: this TP rank's shards of lora_A [r, in] and lora_B [out, r]
    (PEFT's names: ``lora_A.weight``, ``lora_B.weight``)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, *, column: bool) -> None:
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__()
        self.lora_A = LoraMatrix(a)
        self.lora_B = LoraMatrix(b)
        # The split matrix is marked as megatron marks its own shards, so that the gradient norm
        # counts every rank's part (a replicated one counts once, from TP rank 0).
        split, dim = (self.lora_B.weight, 0) if column else (self.lora_A.weight, 1)
        set_tensor_model_parallel_attributes(split, is_parallel=True, dim=dim, stride=1)


class LoraAdapters(torch.nn.Module):
    """The adapters of one base linear, applied beside it (``delta(x)`` has the base's output layout)."""

    def __init__(self, linear_name: str, projections: dict[str, LoraProjection], *, scale: float, dropout: float,
                 sequence_parallel: bool, qkv_groups: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        self.linear_name = linear_name
        self.column = linear_name in COLUMN_PARALLEL
        self.projections = torch.nn.ModuleDict(projections)
        self.scale = scale
        self.sequence_parallel = sequence_parallel
        self.qkv_groups = qkv_groups
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.enabled = True
        # This rank's starting values (PEFT's initialisation or init_from), kept on the CPU (adapters
        # are small) for reset(): a run's starting weights are the base plus these.
        self.initial = {name: (p.lora_A.weight.detach().cpu().clone(), p.lora_B.weight.detach().cpu().clone())
                        for name, p in projections.items()}

    def reset(self) -> None:
        """Put the starting values back into the adapters."""
        with torch.no_grad():
            for name, projection in self.projections.items():
                a, b = self.initial[name]
                projection.lora_A.weight.copy_(a)
                projection.lora_B.weight.copy_(b)

    def delta(self, x: torch.Tensor, output_shape: torch.Size) -> torch.Tensor:
        """(alpha / r) * B A dropout(x) of every projection, laid out as the base's output."""
        if self.column:
            return self._column_delta(x, output_shape)
        return self._row_delta(x)

    def _column_delta(self, x: torch.Tensor, output_shape: torch.Size) -> torch.Tensor:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )
        from megatron.core.tensor_parallel.random import _DATA_PARALLEL_RNG_TRACKER_NAME

        group = ps.get_tensor_model_parallel_group()
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=group)
        # x is the same on every TP rank, and so must its mask be (A is whole on each rank): megatron's
        # stream seeded alike on all TP ranks, which activation recompute replays.
        with get_cuda_rng_tracker().fork(_DATA_PARALLEL_RNG_TRACKER_NAME):
            x = self.dropout(x)
        parts = {}
        for name, adapter in self.projections.items():
            hidden = copy_to_tensor_model_parallel_region(adapter.lora_A(x), group=group)
            parts[name] = adapter.lora_B(hidden) * self.scale
        return self._assemble(parts, x, output_shape)

    def _assemble(self, parts: dict[str, torch.Tensor], x: torch.Tensor, output_shape: torch.Size) -> torch.Tensor:
        """The projections' outputs in the fused linear's local layout (untargeted parts zero)."""
        leading = x.shape[:-1]
        if self.linear_name == "linear_fc1":
            half = output_shape[-1] // 2
            zero = x.new_zeros(*leading, half)
            return torch.cat([parts.get("gate_proj", zero), parts.get("up_proj", zero)], dim=-1)
        groups, per_group, head_dim = self.qkv_groups
        shapes = {"q_proj": per_group * head_dim, "k_proj": head_dim, "v_proj": head_dim}
        pieces = []
        for name, width in shapes.items():
            part = parts.get(name)
            pieces.append(x.new_zeros(*leading, groups, width) if part is None else part.view(*leading, groups, width))
        return torch.cat(pieces, dim=-1).reshape(*leading, -1)

    def _row_delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
        from megatron.core.tensor_parallel.mappings import (
            reduce_from_tensor_model_parallel_region,
            scatter_to_sequence_parallel_region,
        )

        group = ps.get_tensor_model_parallel_group()
        with get_cuda_rng_tracker().fork():  # this rank's input features: a mask of its own
            x = self.dropout(x)
        (adapter,) = self.projections.values()
        hidden = reduce_from_tensor_model_parallel_region(adapter.lora_A(x), group=group)
        out = adapter.lora_B(hidden) * self.scale
        if self.sequence_parallel:
            out = scatter_to_sequence_parallel_region(out, group=group)
        return out

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """Checkpoint entries sharded like the base: B by rows (column bases), A by columns (row bases)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        axis = {f"projections.{name}.{'lora_B' if self.column else 'lora_A'}.weight": 0 if self.column else 1
                for name in self.projections}
        return make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets)


def _adapted_forward(self, input_, *args, **kwargs):
    output, bias = self._lora_base_forward(input_, *args, **kwargs)
    adapters = getattr(self, ADAPTER)
    if adapters.enabled:
        output = output + adapters.delta(input_, output.shape)
    return output, bias


def _adapted_sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
    state = self._lora_base_sharded_state_dict(prefix, sharded_offsets, metadata)
    own = f"{prefix}{ADAPTER}."
    state = {key: value for key, value in state.items() if not key.startswith(own)}
    state.update(getattr(self, ADAPTER).sharded_state_dict(own, sharded_offsets, metadata))
    return state


def _generator(seed: int, layer: int, projection: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{layer}:{projection}".encode()))


def _kaiming_uniform(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    # PEFT: nn.init.kaiming_uniform_(A, a=sqrt(5)) on the whole [r, in] matrix.
    bound = math.sqrt(6.0 / ((1 + 5.0) * columns))
    return (torch.rand(rows, columns, generator=generator, dtype=torch.float32) * 2 - 1) * bound


def _peft_initialisation(config, base, linear_name: str, projection: str, rank: int, tp: int,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole A (Kaiming-uniform over the whole input) and B (zero), as PEFT initialises them."""
    if linear_name in COLUMN_PARALLEL:
        rows = _column_rows(config, linear_name, projection, tp, 0)[0]
        return _kaiming_uniform(rank, config.hidden_size, generator), torch.zeros(rows, rank)
    return _kaiming_uniform(rank, base.input_size_per_partition * tp, generator), torch.zeros(config.hidden_size, rank)


def _column_rows(config, linear_name: str, projection: str, tp: int, rank: int) -> tuple[int, int, int]:
    """(whole output rows, this rank's first row, its row count) of one projection in a column base."""
    if linear_name == "linear_fc1":
        whole = config.ffn_hidden_size
    else:
        head_dim = config.kv_channels
        heads = config.num_attention_heads if projection == "q_proj" else config.num_query_groups
        whole = heads * head_dim
    local = whole // tp
    return whole, rank * local, local


def peft_name(layer: int, projection: str, matrix: str) -> str:
    """PEFT's tensor name for ``lora_A`` / ``lora_B`` of a projection of (0-based) ``layer``."""
    block = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{projection}.{matrix}.weight"


PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def read_peft_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors by PEFT name) of a PEFT LoRA adapter folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not (folder / name).exists():
            raise ConfigError(f"model.lora.init_from: {folder} has no {name} (a PEFT adapter folder has both)")
    return json.loads((folder / PEFT_CONFIG).read_text()), load_file(str(folder / PEFT_WEIGHTS))


def check_peft_adapter(lora: LoraConfig, adapter: dict) -> None:
    """Refuse an init_from adapter that is not the configured LoRA (rank, alpha, targets, variant)."""
    key = "model.lora.init_from"
    if adapter.get("peft_type", "LORA") != "LORA" or adapter.get("use_dora") or adapter.get("use_rslora"):
        raise ConfigError(f"{key}: only plain LoRA adapters load (peft_type LORA, no DoRA, no rsLoRA)")
    if adapter.get("bias", "none") != "none":
        raise ConfigError(f"{key}: adapters with bias={adapter['bias']!r} are not supported (bias='none' only)")
    for field in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform", "target_parameters"):
        if adapter.get(field):
            raise ConfigError(f"{key}: the adapter sets {field}={adapter[field]!r}; only one rank and alpha on whole "
                              f"projections load (what it trained beyond them would be lost)")
    if adapter.get("r") != lora.rank:
        raise ConfigError(f"model.lora.rank: {lora.rank}, but the init_from adapter has r={adapter.get('r')}")
    alpha = lora.alpha if lora.alpha is not None else lora.rank
    if float(adapter.get("lora_alpha", 8)) != float(alpha):
        raise ConfigError(
            f"model.lora.alpha: {alpha}, but the init_from adapter has lora_alpha={adapter.get('lora_alpha')}"
        )
    theirs = adapter.get("target_modules") or []
    theirs = lora_projections([theirs] if isinstance(theirs, str) else theirs)
    if set(theirs) != set(lora.projections):
        raise ConfigError(f"model.lora.target_modules: {list(lora.projections)}, but the init_from adapter targets "
                          f"{list(theirs)}")


def write_peft_adapter(folder: str | Path, lora: LoraConfig, tensors: dict[str, torch.Tensor],
                       base_model: str | None) -> Path:
    """A PEFT adapter folder (adapter_config.json, adapter_model.safetensors) that
    ``peft.PeftModel.from_pretrained(base, folder)`` loads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
              "lora_alpha": lora.alpha if lora.alpha is not None else lora.rank, "lora_dropout": lora.dropout,
              "target_modules": list(lora.projections), "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
              "base_model_name_or_path": base_model, "inference_mode": True}
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / PEFT_WEIGHTS))
    return folder


def add_lora(
    gpt: torch.nn.Module, lora: LoraConfig, *, seed: int, initial: dict[str, torch.Tensor] | None = None
) -> int:
    """Attach adapters to every targeted linear of ``gpt`` (a GPTModel chunk), freeze everything
    else; returns the number of adapters added. The chunk's layers know their global numbers.
    ``initial``: whole adapter tensors by PEFT name (read_peft_adapter), else PEFT's initialisation."""
    from megatron.core import parallel_state as ps

    config = gpt.config
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for param in gpt.parameters():
        param.requires_grad_(False)
    if gpt.pre_process:
        # The frozen embedding's output needs no gradient, so megatron's reentrant activation
        # checkpoint (model.recompute=full) would see inputs that do not require grad and cut the
        # graph: the adapters inside would get none (PEFT's enable_input_require_grads, for HF).
        gpt.embedding.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    targets = set(lora.projections)
    added = 0
    for layer in gpt.decoder.layers:
        holders = {"linear_qkv": layer.self_attention, "linear_proj": layer.self_attention,
                   "linear_fc1": layer.mlp, "linear_fc2": layer.mlp}
        for linear_name, names in LINEAR_PROJECTIONS.items():
            chosen = [n for n in names if n in targets]
            if not chosen:
                continue
            base = getattr(holders[linear_name], linear_name)
            weight = base.weight
            projections = {}
            for name in chosen:
                if initial is None:
                    a, b = _peft_initialisation(config, base, linear_name, name, lora.rank, tp,
                                                _generator(seed, layer.layer_number, name))
                else:
                    a, b = (initial[peft_name(layer.layer_number - 1, name, m)].float() for m in ("lora_A", "lora_B"))
                if linear_name in COLUMN_PARALLEL:  # this rank's rows of B
                    _, first, count = _column_rows(config, linear_name, name, tp, rank)
                    b = b[first:first + count]
                else:  # this rank's input columns of A
                    columns = base.input_size_per_partition
                    a = a[:, rank * columns:(rank + 1) * columns]
                projections[name] = LoraProjection(a.to(weight.dtype).to(weight.device).contiguous(),
                                                   b.to(weight.dtype).to(weight.device).contiguous(),
                                                   column=linear_name in COLUMN_PARALLEL)
            groups = None
            if linear_name == "linear_qkv":
                groups = (config.num_query_groups // tp, config.num_attention_heads // config.num_query_groups,
                          config.kv_channels)
            adapters = LoraAdapters(linear_name, projections, scale=lora.scale, dropout=lora.dropout,
                                    sequence_parallel=config.sequence_parallel, qkv_groups=groups)
            setattr(base, ADAPTER, adapters)
            base._lora_base_forward = base.forward
            base.forward = types.MethodType(_adapted_forward, base)
            base._lora_base_sharded_state_dict = base.sharded_state_dict
            base.sharded_state_dict = types.MethodType(_adapted_sharded_state_dict, base)
            added += len(projections)
    return added


def adapter_modules(chunks: Sequence[torch.nn.Module]) -> list[LoraAdapters]:
    """Every LoraAdapters module of the chunks (wrappers included)."""
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LoraAdapters)]


@contextlib.contextmanager
def adapters_disabled(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Inside the block the chunks compute the base model: every adapter is switched off."""
    modules = adapter_modules(chunks)
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, state in zip(modules, previous):
            m.enabled = state


def reset_adapters(chunks: Sequence[torch.nn.Module]) -> None:
    """Every adapter back at its starting values (the base weights are not touched)."""
    for adapters in adapter_modules(chunks):
        adapters.reset()


def has_lora(chunks: Sequence[torch.nn.Module]) -> bool:
    """Whether the chunks carry adapters."""
    return bool(adapter_modules(chunks))


def _fused_delta(adapters: LoraAdapters, weight: torch.Tensor) -> torch.Tensor:
    """(alpha / r) * B A of every projection in fp32, laid out as the base weight (one TP rank: whole)."""
    deltas = {name: adapters.scale * (p.lora_B.weight.detach().float() @ p.lora_A.weight.detach().float())
              for name, p in adapters.projections.items()}
    columns = weight.shape[1]
    if not adapters.column:
        return next(iter(deltas.values()))
    if adapters.linear_name == "linear_fc1":
        half = weight.shape[0] // 2
        zero = weight.new_zeros(half, columns, dtype=torch.float32)
        return torch.cat([deltas.get("gate_proj", zero), deltas.get("up_proj", zero)], dim=0)
    groups, per_group, head_dim = adapters.qkv_groups
    widths = {"q_proj": per_group * head_dim, "k_proj": head_dim, "v_proj": head_dim}
    pieces = [deltas[name].view(groups, width, columns) if name in deltas else
              weight.new_zeros(groups, width, columns, dtype=torch.float32) for name, width in widths.items()]
    return torch.cat(pieces, dim=1).reshape(-1, columns)


def merge_adapters(chunks: Sequence[torch.nn.Module]) -> int:
    """Fold every adapter into its base weight, W + (alpha / r) B A computed in fp32 and stored in
    W's dtype, and switch the adapters off (the chunks then compute the merged model). One process
    at TP=1 (the exporter's); returns how many linears were merged."""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() != 1:
        raise RuntimeError("merge_adapters works on whole weights (TP=1); the exporter builds the model so")
    merged = 0
    for chunk in chunks:
        for module in chunk.modules():
            adapters = getattr(module, ADAPTER, None)
            if not isinstance(adapters, LoraAdapters):
                continue
            with torch.no_grad():
                weight = module.weight
                weight.copy_((weight.float() + _fused_delta(adapters, weight)).to(weight.dtype))
            adapters.enabled = False
            merged += 1
    return merged


def adapter_tensors(chunks: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every adapter's whole lora_A / lora_B by PEFT name (TP=1)."""
    out = {}
    for chunk in chunks:
        for layer in chunk.modules():
            if not hasattr(layer, "layer_number") or not hasattr(layer, "self_attention"):
                continue
            for holder in (layer.self_attention, layer.mlp):
                for linear_name in LINEAR_PROJECTIONS:
                    adapters = getattr(getattr(holder, linear_name, None), ADAPTER, None)
                    if not isinstance(adapters, LoraAdapters):
                        continue
                    for name, projection in adapters.projections.items():
                        for matrix in ("lora_A", "lora_B"):
                            out[peft_name(layer.layer_number - 1, name, matrix)] = (
                                getattr(projection, matrix).weight.detach().cpu()
                            )
    return out
