"""gpt-oss's reasoning in the open: a tiny gpt_oss checkpoint whose chat template opens the
analysis channel (as a harmony prompt may), served on loopback and asked through the official
openai and anthropic clients. Every generated token is analysis until the channel ends, so
its text is ``reasoning_content`` / a thinking block, never content; a thinking budget ends
the analysis message, opens the final one, and the answer goes on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
from mlx_lm.utils import load_tokenizer

from mlxserve.plugins.families.gpt_oss import GptOss
from mlxserve.plugins.tiny import write_tiny_checkpoint

from ..support.server import RunningServer, running_server, write_config

TEMPLATE = (
    "{% for message in messages %}"
    "<|start|>{{ message['role'] }}<|message|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|channel|>analysis<|message|>{% endif %}"
)
ASK = [{"role": "user", "content": "What is the capital of France?"}]
NEVER_END = ("<|end|>", "<|return|>", "<|call|>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("harmony-model") / "gpt-oss"
    return write_tiny_checkpoint(GptOss(), dest, model_type="gpt_oss", chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("harmony")
    config = write_config(
        tmp,
        f'[registry]\ndefault_model = "oss"\ncache_dir = "{tmp / "cache"}"\n'
        f'[models.oss]\nsource = "{checkpoint}"\n[kv_cache]\nmax_sequence_length = 1024\n',
    )
    with running_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def never_ends(checkpoint: Path) -> dict[str, int]:
    """A logit bias that keeps the model in its analysis message."""
    vocab = load_tokenizer(checkpoint).get_vocab()
    return {str(vocab[t]): -100 for t in NEVER_END}


def test_the_analysis_channel_is_reasoning_content(
    server: RunningServer, never_ends: dict[str, int]
) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="oss", messages=ASK, max_tokens=10, temperature=0, logit_bias=never_ends
    )
    message = reply.choices[0].message
    reasoning = getattr(message, "reasoning_content", None) or message.model_extra.get(
        "reasoning_content"
    )
    assert reasoning and not message.content
    assert "<|" not in reasoning

    stream = client.chat.completions.create(
        model="oss",
        messages=ASK,
        max_tokens=10,
        temperature=0,
        logit_bias=never_ends,
        stream=True,
    )
    parts = [c.choices[0].delta for c in stream if c.choices]
    streamed = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in parts)
    assert streamed == reasoning and not "".join(d.content or "" for d in parts)


def test_a_thinking_budget_ends_the_analysis_and_the_final_answer_goes_on(
    server: RunningServer,
) -> None:
    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    message = claude.messages.create(
        model="oss",
        messages=ASK,
        max_tokens=24,
        thinking={"type": "enabled", "budget_tokens": 4},
        extra_body={"temperature": 0},
    )
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking and "<|" not in message.content[0].thinking
    assert message.content[1].text and "<|channel|>" not in message.content[1].text
