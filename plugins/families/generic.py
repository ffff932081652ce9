"""Any model mlx-lm can build that no other family claims, served from mlx-lm's own model.

Everything family-specific comes from mlx-lm's model file: its classes, its ``make_cache``,
its forward pass. Its chat template is the checkpoint's own; the exactness check at load
(core/model/exactness.py) refuses it if mlxserve's path would not give mlx-lm's logits.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import mlx.nn as nn
from mlx_lm.utils import _get_classes

from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.hookspecs import hookimpl
from mlxserve.plugins.tiny_configs import TINY_CONFIGS

ANY_MODEL_TYPE = "*"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def mlx_lm_module(config: dict[str, Any]) -> str | None:
    """The mlx-lm module that builds a config's model, or None if mlx-lm has none."""
    try:
        module = _get_classes(config)[0].__module__
    except (ValueError, ImportError, KeyError):
        return None
    return module if importlib.util.find_spec(module) else None


class MlxLm(ModelFamily):
    name = "generic"
    model_types = (ANY_MODEL_TYPE,)
    chat_template = CHAT_TEMPLATE
    stop_tokens = ("<|im_end|>", "<|endoftext|>")
    control_tokens = ("<|im_start|>",)
    tool_call_format = None  # each model writes calls its own way; none is assumed

    def model_classes(self, config: dict[str, Any]) -> tuple[type[nn.Module], type[Any]]:
        model_class, args_class = _get_classes(config)
        return model_class, args_class

    def tiny_config(self, model_type: str) -> dict[str, Any]:
        if model_type not in TINY_CONFIGS:
            raise NotImplementedError(f"no tiny checkpoint of {model_type!r} is described")
        return TINY_CONFIGS[model_type]


@hookimpl
def mlxserve_families() -> list[ModelFamily]:
    return [MlxLm()]
