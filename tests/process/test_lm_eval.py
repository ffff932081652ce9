"""lm-eval, as its users run it, against ``mlxserve serve``: its loglikelihood tasks (multiple
choice, rolling) through echo and the prompt's log probabilities, and every number it
recorded checked against mlx-lm's own model call on the same checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from ..support.engine import mlx_lm_logprobs
from ..support.processes import served

LM_EVAL = str(Path(sys.executable).parent / "lm_eval")
TOLERANCE = 1e-3
QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "loud"], 0),
    ("Two plus two equals", ["four", "five", "seven"], 0),
    ("A cat says", ["woof", "meow", "moo"], 1),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin", "Rankine"], 0),
    ("The opposite of hot is", ["cold", "warm", "tall"], 0),
    ("Bread is made from", ["stone", "flour", "glass"], 1),
    ("The sun rises in the", ["west", "north", "east"], 2),
    ("Fish live in", ["water", "trees", "clouds"], 0),
]
TEXTS = [
    "Once upon a time there was a small village by the sea.",
    "The quick brown fox jumps over the lazy dog.",
    "Rain fell all night, and in the morning the river was high.",
]
MC_TASK = """task: echo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
ROLLING_TASK = """task: echo_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


def write_tasks(tmp: Path) -> Path:
    tasks = tmp / "tasks"
    tasks.mkdir()
    mc, rolling = tasks / "mc.jsonl", tasks / "rolling.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS
        )
    )
    rolling.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tasks / "echo_mc.yaml").write_text(MC_TASK.format(data=mc))
    (tasks / "echo_rolling.yaml").write_text(ROLLING_TASK.format(data=rolling))
    return tasks


def loglikelihood(checkpoint: Path, context: list[int], continuation: list[int]) -> float:
    """log P(continuation | context) from mlx-lm's model: the reference lm-eval's numbers must
    equal."""
    whole = context + continuation
    logprobs = mlx_lm_logprobs(checkpoint, whole)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(len(context), len(whole))))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:  # noqa: ANN001
    """How lm-eval splits a request into tokens: the context's trailing spaces go to the
    continuation, and the continuation is what the whole adds to the context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    return context_ids, whole[len(context_ids) :]


def samples(output: Path, task: str) -> list[dict]:
    (path,) = output.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_lm_eval_scores_equal_mlx_lm(tmp_path: Path, tiny_checkpoints) -> None:
    checkpoint = tiny_checkpoints["llama"]
    tasks, output = write_tasks(tmp_path), tmp_path / "results"
    with served(tmp_path, checkpoint) as server:
        model_args = (
            f"model=m,base_url={server.url}/v1/completions,tokenizer={checkpoint},"
            "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1"
        )
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf"),
            "NO_PROXY": "127.0.0.1",
        }
        run = subprocess.run(
            [
                LM_EVAL,
                "--model",
                "local-completions",
                "--model_args",
                model_args,
                "--include_path",
                str(tasks),
                "--tasks",
                "echo_mc,echo_rolling",
                "--log_samples",
                "--output_path",
                str(output),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    correct = []
    for sample in samples(output, "echo_mc"):
        question, choices, answer = QUESTIONS[sample["doc_id"]]
        recorded = [float(r[0][0]) for r in sample["resps"]]
        pairs = [(question, " " + choice) for choice in choices]  # lm-eval's target delimiter
        assert [tuple(a.values()) for a in sample["arguments"].values()] == pairs
        expected = [loglikelihood(checkpoint, *encode_pair(tokenizer, *pair)) for pair in pairs]
        assert recorded == pytest.approx(expected, abs=TOLERANCE)
        correct.append(int(np.argmax(expected)) == answer)
        assert sample["acc"] == float(correct[-1])
    assert len(correct) == len(QUESTIONS)

    prefix = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    rolling = samples(output, "echo_rolling")
    assert len(rolling) == len(TEXTS)
    for sample in rolling:
        text = TEXTS[sample["doc_id"]]
        ids = tokenizer(text, add_special_tokens=False).input_ids
        recorded = float(sample["resps"][0][0])
        assert recorded == pytest.approx(loglikelihood(checkpoint, [prefix], ids), abs=TOLERANCE)

    (results,) = output.rglob("results_*.json")
    metrics = json.loads(results.read_text())["results"]
    assert metrics["echo_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
