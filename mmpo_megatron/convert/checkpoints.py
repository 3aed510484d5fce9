"""HF checkpoint folder <-> megatron dist checkpoint, one tensor at a time.

Both directions run in one process on CPU (or one GPU) through the parallel runtime: the dist
checkpoint is layout-free (dist_checkpointing reshards on load), so the trainer and score_pairs
load it at any TP/PP. Output is written under a temporary name and renamed when complete: a
failure leaves no half-written output folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from mmpo_megatron.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig
from mmpo_megatron.convert.llama import (
    hf_config_from_model,
    hf_to_megatron,
    megatron_to_hf,
    model_config_from_hf,
    tensor_count,
)
from mmpo_megatron.messages import say

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
HF_CONFIG = "hf_config.json"
GENERATION_CONFIG = "generation_config.json"
# What an exported model needs of its source to generate as it did: the source config's fields
# (token ids, names), its generation config, its model type (hf_config.json's) and the tokenizer.
SOURCE_METADATA = (HF_CONFIG, GENERATION_CONFIG)


class ConversionError(RuntimeError):
    """The input cannot be converted; the message names the file, tensor or field."""


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """config.json of an HF folder (or hf_config.json of a converted checkpoint)."""
    folder = Path(folder)
    for name in ("config.json", HF_CONFIG):
        if (folder / name).exists():
            return json.loads((folder / name).read_text())
    raise ConversionError(f"{folder}: no config.json (is this a Hugging Face model folder?)")


def _tensor_reader(folder: Path) -> Callable[[str], torch.Tensor]:
    """``get(name)`` over the folder's safetensors files, opened lazily, one tensor at a time."""
    from safetensors import safe_open

    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
    elif (folder / "model.safetensors").exists():
        weight_map = None
    else:
        raise ConversionError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    handles: dict[str, Any] = {}

    def handle(file: str):
        if file not in handles:
            try:
                handles[file] = safe_open(str(folder / file), framework="pt")
            except Exception as exc:
                raise ConversionError(
                    f"{folder / file}: cannot read safetensors (truncated or corrupt?): {exc}"
                ) from exc
        return handles[file]

    def get(name: str) -> torch.Tensor:
        file = "model.safetensors" if weight_map is None else weight_map.get(name)
        if file is None:
            raise ConversionError(f"{folder}: tensor {name!r} is missing from the checkpoint")
        h = handle(file)
        if name not in h.keys():
            raise ConversionError(f"{folder / file}: tensor {name!r} is missing from the checkpoint")
        try:
            return h.get_tensor(name)
        except Exception as exc:
            raise ConversionError(
                f"{folder / file}: cannot read tensor {name!r} (truncated or corrupt?): {exc}"
            ) from exc

    return get


def _single_process_chunks(model: ModelConfig, dtype: str, vocab_size: int):
    from megatron.core import parallel_state as ps

    from mmpo_megatron.model.builder import build_model_chunks
    from mmpo_megatron.parallel import initialize_parallel

    if not ps.model_parallel_is_initialized():
        initialize_parallel(ParallelConfig(device="cpu"))
    # The output layer stays a layer (no fused head): the narrowing check runs plain forwards.
    return build_model_chunks(replace(model, fused_logprob_chunk=0), ParallelConfig(device="cpu"),
                              PrecisionConfig(dtype=dtype), vocab_size=vocab_size, device="cpu", initialize=False)


_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def hf_weight_dtype(hf: dict[str, Any]) -> str:
    """The dtype an HF folder's weights are in, from its config (``torch_dtype``, or ``dtype`` in
    transformers 5). fp16 and an unstated dtype map to fp32, which holds them exactly (bf16 would
    round fp16's mantissa)."""
    stated = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").replace("torch.", "")
    return "bf16" if stated == "bfloat16" else "fp32"


def saved_weight_dtype(checkpoint: Path) -> str:
    """The dtype the trained parameters were saved in, read from the dist checkpoint's metadata."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    found = {t.dtype for key, t in meta.items() if not key.startswith("optimizer") and key.endswith("weight")}
    return "fp32" if torch.float32 in found or not found else "bf16"


def _logprob_change(chunk: torch.nn.Module, vocab_size: int, change: Callable[[], Any], sequences: int = 4,
                    length: int = 32) -> float:
    """The largest change of a summed sequence log-prob (seeded random token sequences) that
    ``change()`` makes to the chunk's weights (it changes them in place)."""
    from mmpo_megatron.model.builder import unwrap

    gpt = unwrap(chunk)
    tokens = torch.randint(0, vocab_size, (sequences, length + 1), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(length).expand(sequences, -1)

    def summed_logps() -> torch.Tensor:
        logits = gpt(tokens[:, :-1], positions, None)[..., :vocab_size].double()
        return logits.log_softmax(-1).gather(-1, tokens[:, 1:, None]).sum((1, 2))

    with torch.no_grad():
        before = summed_logps()
        change()
        return float((summed_logps() - before).abs().max())


def _round_to_bf16(chunk: torch.nn.Module) -> None:
    from mmpo_megatron.model.builder import unwrap

    for param in unwrap(chunk).parameters():
        param.copy_(param.to(torch.bfloat16))


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=os.environ.get("MMPO_NO_PROGRESS") == "1")


def convert_hf_to_megatron(
    hf_dir: str | Path, output: str | Path, *, dtype: str = "auto", layer_spec: str = "local", tp: int = 1, pp: int = 1
) -> Path:
    """Write a megatron dist checkpoint (plus model config and tokenizer) from an HF folder.

    ``dtype="auto"`` keeps the dtype the HF weights are in (hf_weight_dtype); bf16/fp32 force one.
    """
    from mmpo_megatron.config import padded_vocab_size, validate_layout
    from mmpo_megatron.model.builder import unwrap
    from mmpo_megatron.model.checkpoint import save_to, staging_folder

    hf_dir, output = Path(hf_dir), Path(output)
    hf = read_hf_config(hf_dir)
    model = model_config_from_hf(hf, layer_spec=layer_spec)
    source_dtype = hf_weight_dtype(hf)
    dtype = source_dtype if dtype == "auto" else dtype
    say(f"weights: {dtype} (the HF config states {hf.get('torch_dtype') or hf.get('dtype') or 'no dtype'})")
    # The checkpoint itself is layout-free; --tp/--pp only check that the model splits that way.
    validate_layout(model, ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
    get = _tensor_reader(hf_dir)
    if output.exists():
        raise ConversionError(f"{output} already exists; choose a new output folder")
    chunks = _single_process_chunks(model, dtype, model.vocab_size)
    params = unwrap(chunks[0]).state_dict(keep_vars=True)
    assigned = set()
    with torch.no_grad(), _progress(tensor_count(model), "hf -> megatron") as bar:
        for name, tensor in hf_to_megatron(get, model, padded):
            if name not in params:
                raise ConversionError(f"megatron model has no parameter {name!r} (layer spec {layer_spec})")
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise ConversionError(
                    f"{name}: HF gives shape {tuple(tensor.shape)}, megatron expects {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
            assigned.add(name)
            bar.update(1)
    missing = [n for n in params if n not in assigned and not n.endswith("_extra_state")]
    if missing:
        raise ConversionError(f"no HF tensor mapped to megatron parameter(s) {missing}")
    state = {"model": asdict(model), "vocab_size": model.vocab_size, "source": str(hf_dir.resolve()),
             "tokenizer": str((output / "tokenizer").resolve()), "dtype": dtype}
    with renamed_when_done(output) as partial:
        try:
            save_to(partial, chunks, None, state)
        finally:  # a failed save leaves its own staging folder beside ``partial``
            shutil.rmtree(staging_folder(partial), ignore_errors=True)
        (partial / HF_CONFIG).write_text(json.dumps(hf, indent=2))
        if (hf_dir / GENERATION_CONFIG).exists():  # end-of-turn tokens and sampling defaults, for the export
            shutil.copy2(hf_dir / GENERATION_CONFIG, partial / GENERATION_CONFIG)
        (partial / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (hf_dir / name).exists():
                shutil.copy2(hf_dir / name, partial / "tokenizer" / name)
    return output


def convert_megatron_to_hf(
    checkpoint: str | Path,
    output: str | Path,
    *,
    dtype: str = "auto",
    model_type: str | None = None,
    shard_bytes: int = 5 * 2**30,
    adapter_only: bool = False,
) -> Path:
    """Write safetensors shards, config.json and the tokenizer from a (trainer or converted) checkpoint.

    ``dtype="auto"`` keeps the dtype the trained parameters were saved in; forcing bf16 onto fp32
    weights warns with the log-prob change the rounding causes. A LoRA checkpoint exports merged
    (W + alpha / r * B A in fp32, stored in the base's dtype), or with ``adapter_only`` as a PEFT
    adapter folder for its base model.
    """

    from mmpo_megatron.model.builder import unwrap
    from mmpo_megatron.model.checkpoint import (
        LORA_BASE,
        TRAINER_STATE,
        load_weights,
        resolve_checkpoint,
        saved_model_config,
    )
    from mmpo_megatron.model.lora import adapter_tensors, write_peft_adapter

    path = resolve_checkpoint(checkpoint)
    state = json.loads((path / TRAINER_STATE).read_text())
    model = saved_model_config(state)
    model.vocab_size = state.get("vocab_size", model.vocab_size)
    base = (state.get(LORA_BASE) or {}).get("weights")
    if adapter_only and not model.lora.enabled:
        raise ConversionError(f"--adapter-only: {path} was not trained with LoRA (model.lora.rank is 0)")
    weights_dir = resolve_checkpoint(base) if base else path  # where the base weights (and their metadata) are
    source_hf = json.loads((weights_dir / HF_CONFIG).read_text()) if (weights_dir / HF_CONFIG).exists() else None
    model_type = (
        model_type
        or (source_hf or {}).get("model_type")
        or ("qwen3" if model.qk_norm else "qwen2" if model.qkv_bias else "llama")
    )
    output = Path(output)
    if output.exists():
        raise ConversionError(f"{output} already exists; choose a new output folder")
    saved = saved_weight_dtype(weights_dir)
    dtype = saved if dtype == "auto" else dtype
    narrowing = saved == "fp32" and dtype == "bf16"
    say(f"export dtype: {dtype} (the checkpoint's weights are {saved})")
    # Load in the export dtype (in the saved one when narrowing, to measure the rounding): one copy
    # of the weights in RAM, plus one shard being written.
    chunks = _single_process_chunks(model, saved if narrowing else dtype, model.vocab_size)
    load_weights(path, chunks)  # any saved TP/PP layout; optimizer state is not read
    if model.lora.enabled and adapter_only:
        with renamed_when_done(output) as partial:
            write_peft_adapter(partial, model.lora, adapter_tensors(chunks), base_model=base)
        return output
    if model.lora.enabled:
        _merge_adapters(chunks, model, dtype)
    if narrowing:
        change = _logprob_change(chunks[0], model.vocab_size, lambda: _round_to_bf16(chunks[0]))
        print(f"warning: --dtype bf16 rounds this checkpoint's fp32 weights: summed log-probs of 4 random 32-token "
              f"sequences move by up to {change:.3g} nats (a fine-tune's small updates can vanish); "
              f"--dtype auto keeps fp32", file=sys.stderr, flush=True)
    weights = {k: v for k, v in unwrap(chunks[0]).state_dict().items()
               if not k.endswith("_extra_state") and ".lora." not in k}
    torch_dtype = _TORCH_DTYPES[dtype]
    with renamed_when_done(output) as partial:
        partial.mkdir(parents=True)
        with _progress(tensor_count(model), "megatron -> hf") as bar:
            exported = megatron_to_hf(weights.__getitem__, model)
            write_safetensors_shards(_cast(exported, torch_dtype, bar), partial, shard_bytes)
        config = hf_config_from_model(
            model, model_type=model_type, torch_dtype="bfloat16" if dtype == "bf16" else "float32"
        )
        if source_hf:  # keep what we do not model (token ids, names) from the original config
            config = {**source_hf, **config}
        tokenizer_source = weights_dir if base and not (path / "tokenizer").is_dir() else path
        tokenizer = _write_tokenizer(tokenizer_source, state, partial)
        _write_generation_files(partial, config, tokenizer, generation_sources=(path, weights_dir))
    return output


def _merge_adapters(chunks, model: ModelConfig, dtype: str) -> None:
    """Merge the LoRA adapters into the base weights, saying how far that moves the log-probs."""
    from mmpo_megatron.model.lora import merge_adapters

    merged = []
    moved = _logprob_change(chunks[0], model.vocab_size, lambda: merged.append(merge_adapters(chunks)))
    say(
        f"LoRA: merged {merged[0]} adapted linears into the base weights (W + alpha / r * B A in fp32, stored "
        f"in {dtype}): summed log-probs of 4 random 32-token sequences moved by up to {moved:.3g} nats"
    )
    if dtype == "bf16" and moved > 1e-3:
        print(f"warning: bf16 rounds away part of the adapters' change to the weights ({moved:.3g} nats); "
              f"--dtype fp32 keeps the merged model exact, --adapter-only keeps the adapters apart",
              file=sys.stderr, flush=True)


def _write_generation_files(folder: Path, config: dict, tokenizer, generation_sources: tuple[Path, ...]) -> None:
    """config.json, with the tokenizer's special-token ids where the source config has none (a random
    init has no source), and generation_config.json: the source's when one has it, else those ids."""
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
    for key, value in ids.items():
        if config.get(key) is None and value is not None:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = next((d / GENERATION_CONFIG for d in generation_sources if (d / GENERATION_CONFIG).exists()), None)
    if generation is not None:
        shutil.copy2(generation, folder / GENERATION_CONFIG)
    else:
        token_ids = {k: v for k, v in config.items() if k in ids}
        (folder / GENERATION_CONFIG).write_text(json.dumps(token_ids, indent=2))


def _cast(tensors: Iterable[tuple[str, Tensor]], dtype: torch.dtype, bar) -> Iterator[tuple[str, Tensor]]:
    """Each tensor in the export dtype, contiguous and its own storage, ticking the progress bar."""
    for name, tensor in tensors:
        bar.update(1)
        yield name, tensor.to(dtype).contiguous().clone()


@contextlib.contextmanager
def renamed_when_done(output: Path) -> Iterator[Path]:
    """A folder ``<output>.partial`` to write into (absent at the start), renamed to ``output`` when
    the block completes and removed if it raises: ``output`` only ever exists whole."""
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
        partial.rename(output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def write_safetensors_shards(tensors: Iterable[tuple[str, Tensor]], folder: Path, shard_bytes: int) -> int:
    """HF's safetensors layout in ``folder``: one ``model.safetensors``, or shards of at most
    ``shard_bytes`` (a larger tensor gets one of its own) named ``model-0000i-of-0000N`` with an
    index. A shard is written as soon as it fills, so one shard is held in memory. Returns the count."""
    from safetensors.torch import save_file

    shard_names: list[list[str]] = []  # the tensor names of each shard written so far
    current: dict[str, Tensor] = {}
    current_bytes = 0
    total_bytes = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > shard_bytes:
            save_file(current, str(folder / f"shard-{len(shard_names):05d}"), metadata={"format": "pt"})
            shard_names.append(list(current))
            current = {}
            current_bytes = 0
        current[name] = tensor
        current_bytes += nbytes
        total_bytes += nbytes
    save_file(current, str(folder / f"shard-{len(shard_names):05d}"), metadata={"format": "pt"})
    shard_names.append(list(current))
    count = len(shard_names)
    files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    if count == 1:
        files = ["model.safetensors"]
    for i, file in enumerate(files):
        (folder / f"shard-{i:05d}").rename(folder / file)
    if count > 1:
        weight_map = {name: files[i] for i, names in enumerate(shard_names) for name in names}
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return count


def run_cli(convert: Callable[[], Path]) -> int:
    """Run a conversion for a command-line tool: exit code 2 with the message on bad input."""
    from mmpo_megatron.model.checkpoint import DamagedCheckpointError
    from mmpo_megatron.parallel import destroy_parallel

    try:
        out = convert()
    except (ConfigError, ConversionError, DamagedCheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel(destroy_process_group=True)
    print(f"wrote {out}")
    return 0


def _write_tokenizer(checkpoint: Path, state: dict, out: Path):
    """The checkpoint's tokenizer (its own folder, else the run's data.tokenizer, chat template
    included) into ``out``; returns it, loaded from there."""
    from mmpo_megatron.data.tokenizer import load_tokenizer

    if (checkpoint / "tokenizer").is_dir() and any((checkpoint / "tokenizer").iterdir()):
        for f in (checkpoint / "tokenizer").iterdir():
            shutil.copy2(f, out / f.name)
        return load_tokenizer(str(out))
    name = state.get("tokenizer") or "embedded"
    try:
        tokenizer = load_tokenizer(name)
        tokenizer.save_pretrained(str(out))
    except Exception as exc:  # the weights are the point; say what to copy by hand
        raise ConversionError(f"could not write the tokenizer {name!r}: {exc}; copy its files into {out}") from exc
    return tokenizer


