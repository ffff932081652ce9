"""Tiny random-weight checkpoints of any family, for tests, plugin authors and the demo.

Each is a real checkpoint: config.json, model.safetensors and a byte-level BPE tokenizer
with the family's chat template, which mlx-lm itself can load. Its weights are random, so
it talks gibberish.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mlxserve.core.errors import UnknownModelTypeError
from mlxserve.core.model.loader import build_model
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.tiny_configs import TINY_CONFIGS

RANDOM_WEIGHTS_NOTE = "random weights: for tests and demos, its output is gibberish"
VOCAB_SIZE = 512

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A server answers requests; a model predicts
the next token. Hello, world! How are you today? I am fine, thank you. What is the capital
of France? Paris is the capital of France. One, two, three, four, five, six, seven, eight.
Continuous batching lets new requests join a running batch between steps. The key and value
cache keeps the attention state of every token so that decoding does not start over.
Pipelines cut a model into stages; each machine runs its own layers and passes the hidden
states on. Tell me a story about a robot who learned to paint the sea at night.
def add(a, b):
    return a + b
print("mlxserve", 42, 3.14, [1, 2, 3], {"key": "value"})
Ünïcödé text, naïve café, 東京, 你好世界, emoji 🙂 and math: x² + y² = z².
"""


def build_tokenizer(special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer: every byte is a token, so any text can be encoded."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return tokenizer


def _special_tokens(family: ModelFamily) -> list[str]:
    bos = [family.bos_token] if family.bos_token else []
    return [*bos, *family.stop_tokens, *family.control_tokens]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_checkpoint(
    family: ModelFamily,
    dest: str | Path,
    *,
    model_type: str | None = None,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    chat_template: str | None = None,
    extra_tokens: Sequence[str] = (),
) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` into ``dest``.

    Args:
        family: the family whose ``tiny_config`` describes the model.
        dest: the folder to write (created if missing).
        model_type: which of the family's model types (default: its first).
        seed: the random seed of the weights; the same seed gives the same checkpoint.
        overrides: config.json values to change, e.g. a bigger ``hidden_size`` for benchmarks.
        chat_template: the tokenizer's chat template (default: the family's).
        extra_tokens: more special tokens, each one token of the vocabulary (e.g. a
            reasoning format's ``<think>`` and ``</think>``).

    Returns:
        ``dest`` as a Path.
    """
    model_type = model_type or family.model_types[0]
    if model_type == "*":
        raise UnknownModelTypeError(
            f"family {family.name!r} serves any model type: name one "
            f"(tiny ones: {', '.join(sorted(TINY_CONFIGS))})"
        )
    if model_type not in family.model_types and "*" not in family.model_types:
        raise ValueError(
            f"family {family.name!r} has no model type {model_type!r} "
            f"(it has: {', '.join(family.model_types)})"
        )
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer([*_special_tokens(family), *extra_tokens])
    tokenizer.save(str(dest / "tokenizer.json"))
    eos = family.stop_tokens[0]
    config = {
        **family.tiny_config(model_type),
        **(overrides or {}),
        "vocab_size": tokenizer.get_vocab_size(),
        "eos_token_id": [tokenizer.token_to_id(t) for t in family.stop_tokens],
        "torch_dtype": "float32",
        "mlxserve": {"tiny": True, "note": RANDOM_WEIGHTS_NOTE},
    }
    if family.bos_token:
        config["bos_token_id"] = tokenizer.token_to_id(family.bos_token)

    if isinstance(config.get("text_config"), dict):  # nested: the text model reads its own
        config["text_config"] = {**config["text_config"], "vocab_size": config["vocab_size"]}

    mx.random.seed(seed)
    model = build_model(family.model_classes, config)
    weights = dict(tree_flatten(model.parameters()))
    if config.get("tie_word_embeddings"):  # some mlx-lm models tie only if the head is absent
        weights.pop("lm_head.weight", None)
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})

    _write_json(dest / "config.json", config)
    _write_json(
        dest / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": family.bos_token,
            "eos_token": eos,
            "pad_token": eos,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": config["max_position_embeddings"],
            "chat_template": chat_template or family.chat_template,
        },
    )
    _write_json(
        dest / "special_tokens_map.json",
        {"bos_token": family.bos_token, "eos_token": eos, "pad_token": eos},
    )
    _write_json(
        dest / "generation_config.json",
        {
            "eos_token_id": config["eos_token_id"],
            **({"bos_token_id": config["bos_token_id"]} if family.bos_token else {}),
        },
    )
    (dest / "README.md").write_text(
        f"# tiny {family.name} ({model_type})\n\nWritten by `mlxserve models tiny`. "
        f"{RANDOM_WEIGHTS_NOTE}.\n",
        encoding="utf-8",
    )
    return dest


def is_tiny_checkpoint(path: Path) -> bool:
    """Whether a folder holds a checkpoint written by :func:`write_tiny_checkpoint`."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(config.get("mlxserve", {}).get("tiny"))
