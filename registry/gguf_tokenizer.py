"""A GGUF file's tokenizer as Hugging Face tokenizer files, built by transformers' converter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlxserve.core.errors import UnsupportedModelError
from mlxserve.plugins.gguf_mapping import GGUFModel


def save_gguf_tokenizer(gguf: GGUFModel, dest: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (special tokens, chat template) for
    the vocabulary, merges and special token ids in ``gguf``'s ``tokenizer.*`` metadata."""
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError as exc:
        raise UnsupportedModelError(
            f"{gguf.path.name}: converting a GGUF tokenizer needs a transformers release with "
            f"transformers.integrations.gguf; upgrade it (`pip install -U transformers`)"
        ) from exc

    metadata = gguf.metadata
    fields = {
        name: metadata[f"tokenizer.{key}"]
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in metadata
    }
    if "tokens" not in fields:
        raise UnsupportedModelError(f"{gguf.path.name}: it holds no tokenizer (tokenizer.ggml.*)")
    try:
        backend, _ = convert_gguf_tokenizer(gguf.architecture, fields)
    except (ValueError, KeyError) as exc:
        why = f"{gguf.path.name}: cannot convert its tokenizer ({exc})"
        raise UnsupportedModelError(why) from exc
    sentencepiece = fields.get("tokenizer_type") == "llama"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **_special_tokens(fields),
        add_bos_token=metadata.get("tokenizer.ggml.add_bos_token", sentencepiece),
        add_eos_token=metadata.get("tokenizer.ggml.add_eos_token", False),
        clean_up_tokenization_spaces=False,
        model_max_length=gguf.value("context_length", 4096),
    )
    if metadata.get("tokenizer.chat_template"):
        tokenizer.chat_template = metadata["tokenizer.chat_template"]
    tokenizer.save_pretrained(str(dest))


def _special_tokens(fields: dict[str, Any]) -> dict[str, str]:
    tokens = fields["tokens"]
    return {
        f"{kind}_token": tokens[fields[f"{kind}_token_id"]]
        for kind in ("bos", "eos", "unk", "pad")
        if fields.get(f"{kind}_token_id") is not None and fields[f"{kind}_token_id"] < len(tokens)
    }
