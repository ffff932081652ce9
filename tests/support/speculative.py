"""Requests for the speculative decoding tests: greedy completions of token prompts, with the
tokens' log probabilities, so runs with and without speculation compare token for token."""

from __future__ import annotations

from .server import post


def completion(server: object, prompt: list[int], **extra: object) -> dict:
    """A completion of ``prompt`` by model "m" (greedy, 24 tokens, EOS ignored, unless
    ``extra`` says otherwise): the response's JSON."""
    body = {"model": "m", "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 1}
    body.update(extra)
    body.setdefault("ignore_eos", True)
    response = post(server, "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()
