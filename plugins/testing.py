"""The plugin author kit: checks any family must pass, on its own tiny checkpoint.

Use from pytest in a plugin's own tests::

    from mlxserve.plugins.testing import check_family

    def test_my_family(tmp_path):
        check_family(MyFamily(), tmp_path)

and for a tool-call format, with the checkpoint's tokenizer (needs llguidance and jsonschema)::

    from mlxserve.plugins.testing import check_tool_call_format

    def test_my_format(tmp_path):
        path = write_tiny_checkpoint(MyFamily(), tmp_path)
        check_tool_call_format(MyFamily.tool_call_format, load_tokenizer(path))

Each check raises AssertionError with a message that says what differs.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from mlxserve.core.kv.batching import unbatchable
from mlxserve.core.kv.caches import KVCacheOptions
from mlxserve.core.model.exactness import check_stage
from mlxserve.core.model.layout import SplitError
from mlxserve.core.model.loader import load_stage
from mlxserve.core.model.stages import PipelineStage, split_even, stage_ranges
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.tiny import write_tiny_checkpoint
from mlxserve.plugins.tool_calls import (
    ParsedPiece,
    TextPiece,
    ToolCall,
    ToolCallFormat,
    marker_token_ids,
)

PROMPT = [3, 17, 42, 7, 99, 5, 61, 23, 11, 8, 150, 77, 19, 4, 200, 31, 2, 90, 13, 66] * 3
ATOL = 1e-4


def _tokens(n: int = len(PROMPT)) -> mx.array:
    return mx.array([PROMPT[:n]])


def _assert_close(actual: mx.array, expected: mx.array, what: str, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = float(mx.abs(actual.astype(mx.float32) - expected.astype(mx.float32)).max())
    assert diff <= atol, f"{what}: logits differ by up to {diff:.2e} (allowed {atol:.0e})"


def _load(
    family: ModelFamily,
    path: Path,
    layers: range | None = None,
    first: bool = True,
    last: bool = True,
) -> PipelineStage:
    stage, _ = load_stage(
        path, family.model_classes, family.layout, layers=layers, first=first, last=last
    )
    return stage


def _fresh_cache(family: ModelFamily, stage: PipelineStage, bits: int | None = None) -> list[Any]:
    options = KVCacheOptions(bits=bits)
    return family.make_cache(stage.layout.model, options, list(stage.layers))


def check_loads(family: ModelFamily, path: Path) -> None:
    """The checkpoint loads, and mlxserve's forward pass (the family's layout and caches)
    equals mlx-lm's own: its model call with its own caches."""
    stage = _load(family, path)
    ours = stage.forward(_tokens(), _fresh_cache(family, stage))
    reference, _ = load_model(path, get_model_classes=family.model_classes)
    expected = reference(_tokens(), cache=make_prompt_cache(reference))
    _assert_close(ours, expected, "layout forward vs the model's own forward")
    assert ours.shape[-1] == stage.layout.vocab_size, "logits are not vocab-sized"


def check_kv_cache(family: ModelFamily, path: Path, bits: int | None = None) -> None:
    """Prefill then decode one token at a time with the family's caches equals one pass.

    The prompt is longer than a tiny model's sliding window, so windowed caches rotate.
    With ``bits`` the cache is quantized and the check only bounds the error loosely.
    """
    stage = _load(family, path)
    tokens = _tokens()
    full = stage.forward(tokens, _fresh_cache(family, stage))
    cache = _fresh_cache(family, stage, bits)
    split = tokens.shape[1] - 4
    steps = [stage.forward(tokens[:, :split], cache)[:, -1:]]
    for i in range(split, tokens.shape[1] - 1):
        steps.append(stage.forward(tokens[:, i : i + 1], cache))
    cached = mx.concatenate(steps, axis=1)
    expected = full[:, split - 1 : tokens.shape[1] - 1]
    _assert_close(
        cached, expected, f"cached decode (bits={bits})", atol=ATOL * 10 if bits is None else 0.5
    )


def check_pipeline_split(family: ModelFamily, path: Path, num_stages: int = 2) -> None:
    """Stages that each load only their own layers, run in turn, give the unsplit logits."""
    whole = _load(family, path)
    tokens = _tokens()
    expected = whole.forward(tokens, _fresh_cache(family, whole))
    ranges = stage_ranges(split_even(whole.layout.num_layers, num_stages))
    h = None
    for i, layers in enumerate(ranges):
        stage = _load(family, path, layers, first=i == 0, last=i == len(ranges) - 1)
        present = [j for j, m in enumerate(stage.layout.layer_modules) if m.parameters()]
        assert present == list(layers), f"stage {i} kept layers {present}, not {list(layers)}"
        h = stage.forward(tokens, _fresh_cache(family, stage), hidden=h)
    assert h is not None
    _assert_close(h, expected, f"{num_stages}-stage pipeline vs unsplit")


def splits(family: ModelFamily, path: Path) -> bool:
    """Whether the model can be cut into pipeline stages (else the layout refuses, saying
    why: that is a valid answer, never a wrong split)."""
    layout = _load(family, path).layout
    try:
        layout.check_split([layout.num_layers // 2])
    except SplitError:
        return False
    return True


def check_exactness(family: ModelFamily, path: Path, num_stages: int = 2) -> None:
    """mlxserve's exactness check at load passes: on the whole model, and on each stage of
    a split (chunked prefill, decode steps and a left-padded batch, against mlx-lm)."""
    stages = [_load(family, path)]
    ranges = stage_ranges(split_even(stages[0].layout.num_layers, num_stages))
    if splits(family, path):
        stages += [
            _load(family, path, layers, first=i == 0, last=i == len(ranges) - 1)
            for i, layers in enumerate(ranges)
        ]
    for stage in stages:
        model_type = str(getattr(stage.layout.model, "model_type", family.name))
        make = functools.partial(_fresh_cache, family, stage)
        check_stage(stage, make, model_type=model_type, batchable=not unbatchable(make()))


def check_family(family: ModelFamily, tmp_path: Path, model_types: list[str] | None = None) -> None:
    """Every check, on a tiny checkpoint of each of the family's model types."""
    for model_type in model_types or list(family.model_types):
        path = write_tiny_checkpoint(family, Path(tmp_path) / model_type, model_type=model_type)
        check_loads(family, path)
        check_kv_cache(family, path)
        if splits(family, path):
            check_pipeline_split(family, path)
        check_exactness(family, path)
        weights = family.layer_weights(_load(family, path).layout.model)
        assert len(weights) > 1 and all(w > 0 for w in weights), f"layer weights {weights}"


# ---- tool-call formats ----------------------------------------------------------------

SAMPLE_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "now",
            "description": "The time now.",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    },
]
SAMPLE_CALLS = [
    ToolCall("get_weather", '{"city": "Paris, \\"FR\\" 東京", "days": 3}'),
    ToolCall("now", "{}"),
]


def parse_text(fmt: ToolCallFormat, chunks: list[str]) -> list[ParsedPiece]:
    """What a fresh parser of ``fmt`` gives for a reply streamed as ``chunks``, adjacent text
    joined into one piece."""
    parser = fmt.parser()
    pieces = [piece for chunk in chunks for piece in parser.feed(chunk)] + parser.finish()
    joined: list[ParsedPiece] = []
    for piece in pieces:
        if isinstance(piece, TextPiece) and joined and isinstance(joined[-1], TextPiece):
            joined[-1] = TextPiece(joined[-1].text + piece.text)
        elif not isinstance(piece, TextPiece) or piece.text:
            joined.append(piece)
    return joined


def text_splits(text: str) -> Iterator[list[str]]:
    """The reply whole, one character at a time, and cut in two at every position."""
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]


def parse_every_way(fmt: ToolCallFormat, text: str) -> list[ParsedPiece]:
    """The parse of ``text``, checked to be the same however the text is streamed."""
    whole = parse_text(fmt, [text])
    for chunks in text_splits(text):
        got = parse_text(fmt, chunks)
        assert got == whole, f"{fmt.name}: streamed as {chunks!r} gives {got}, whole {whole}"
    return whole


def _same_calls(pieces: list[ParsedPiece], calls: list[ToolCall]) -> bool:
    got = [(p.name, json.loads(p.arguments)) for p in pieces if isinstance(p, ToolCall)]
    text = "".join(p.text for p in pieces if isinstance(p, TextPiece))
    return not text.strip() and got == [(c.name, json.loads(c.arguments)) for c in calls]


def check_round_trip(fmt: ToolCallFormat, calls: list[ToolCall] = SAMPLE_CALLS) -> None:
    """``render_calls`` then the parser gives back the calls, however the text streams."""
    for some in (calls[:1], calls):
        text = fmt.render_calls(some)
        pieces = parse_every_way(fmt, text)
        assert _same_calls(pieces, some), f"{fmt.name}: {text!r} parses as {pieces}"


def constrained_walk(grammar: str, tokenizer: Any, seed: int, max_tokens: int = 3000) -> str:
    """Text made by picking random tokens the grammar allows until it is done."""
    import llguidance
    import llguidance.hf
    import numpy as np
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    ll_tokenizer = llguidance.hf.from_tokenizer(hf)
    matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar))
    assert not matcher.is_error(), matcher.get_error()
    mask = allocate_token_bitmask(1, ll_tokenizer.vocab_size)
    rng = random.Random(seed)
    ids: list[int] = []
    while not matcher.is_stopped():
        assert len(ids) < max_tokens, f"the walk did not end in {max_tokens} tokens"
        fill_next_token_bitmask(matcher, mask, 0)
        bits = np.unpackbits(mask[0].view(np.uint8), bitorder="little")
        token = int(rng.choice(np.flatnonzero(bits[: ll_tokenizer.vocab_size])))
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
    ends = {ll_tokenizer.eos_token, *getattr(tokenizer, "eos_token_ids", ())}
    return hf.decode([i for i in ids if i not in ends], skip_special_tokens=False)


def check_grammar(
    fmt: ToolCallFormat,
    tokenizer: Any,
    tools: list[dict[str, Any]] = SAMPLE_TOOLS,
    walks: int = 3,
    seed: int = 0,
) -> None:
    """The grammar compiles for ``tokenizer``, and every random walk through it is text the
    parser reads as calls to ``tools`` whose arguments match their schemas."""
    import jsonschema
    import llguidance
    import llguidance.hf

    ll_tokenizer = llguidance.hf.from_tokenizer(getattr(tokenizer, "_tokenizer", tokenizer))
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    special = marker_token_ids(fmt, tokenizer)
    for parallel in (False, True):
        grammar = fmt.grammar(tools, parallel=parallel, special=special)
        compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
        error = llguidance.LLMatcher.validate_grammar(compiled, ll_tokenizer)
        assert not error, f"{fmt.name}: the grammar does not compile: {error}\n{grammar}"
        for i in range(walks):
            text = constrained_walk(grammar, tokenizer, seed + i)
            pieces = parse_text(fmt, [text])
            calls = [p for p in pieces if isinstance(p, ToolCall)]
            stray = "".join(p.text for p in pieces if isinstance(p, TextPiece)).strip()
            assert calls and not stray, f"{fmt.name}: {text!r} parses as {pieces}"
            assert parallel or len(calls) == 1, f"{fmt.name}: {len(calls)} calls in {text!r}"
            for call in calls:
                assert call.name in schemas, f"{fmt.name}: unknown tool {call.name!r}"
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def check_tool_call_format(
    fmt: ToolCallFormat, tokenizer: Any, tools: list[dict[str, Any]] = SAMPLE_TOOLS
) -> None:
    """Every check of a tool-call format: round trips, and its grammar on ``tokenizer``."""
    check_round_trip(fmt)
    check_grammar(fmt, tokenizer, tools)
