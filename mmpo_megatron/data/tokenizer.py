"""Tokenizers: any Hugging Face tokenizer from a local path (offline), or the embedded byte-level one.

The embedded tokenizer is built in code (no files, no hub): 256 byte tokens plus a few specials,
with a small chat template, so the demo, the tests and conversational data work offline.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EMBEDDED = "embedded"
"""The tokenizer name that selects the built-in byte-level tokenizer."""

_SPECIALS = ["<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Each message is "<|role|>content<|end|>"; the generation prompt opens an assistant turn, and an
# assistant reply ends with <|end|><eos> so the model learns to stop.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded byte-level tokenizer (vocab 263: 256 bytes + 7 specials), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(_SPECIALS)
    # Plain-text prompts start with <bos>, like Llama's tokenizer (chat templates add their own).
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer.name_or_path = EMBEDDED
    return tokenizer


def load_tokenizer(name_or_path: str = EMBEDDED) -> PreTrainedTokenizerBase:
    """The embedded tokenizer, or a Hugging Face tokenizer from a local folder or hub name."""
    if name_or_path in (EMBEDDED, "", None):
        return build_byte_tokenizer()
    local = Path(name_or_path)
    if not local.exists() and name_or_path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"tokenizer folder {name_or_path!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # transformers raises several types; the path is what the user needs
        raise RuntimeError(f"could not load tokenizer {name_or_path!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        # Llama-family tokenizers ship without a pad token; padding is masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
