"""Prefix-cache benchmark: time to first token of a long prompt, cold, again and after a restart,
for mlx_lm.server (the reference) and mlxserve on the same checkpoint.

Usage:
    python tests/benchmarks/bench_prefix_cache.py [--size large|small] [--prompt-tokens 2048]
        [--runs 3] [--max-tokens 8] [--openblas [PATH]] [--out FILE.md]
        [--workdir ~/.cache/mlxserve/bench]

It reuses bench_serving.py's checkpoint (a random-weight float32 Llama, written once under
--workdir) and server helpers, and starts one server at a time on 127.0.0.1. Each run gets its own
random-word prompt of at most --prompt-tokens tokens, opening with a fresh random nonce (so no
two prompts, in one invocation or across them, share a cache block); both servers get the same
prompts, and see each one cold, again and after a restart:

1. cold: the first time the server sees it;
2. again: the same prompt (mlxserve's prefix cache; mlx_lm.server's prompt cache, on by
   default), (a) as soon as the cold response has ended, then (b) once mlxserve's disk writes
   have landed (they run on the engine thread right after a request ends, so (a) waits for them;
   mlx_lm.server just gets a one-second pause);
3. after a restart of the server: mlxserve runs with ``[kv_cache] disk_dir`` and
   ``disk_write = "all"``, so its blocks come back from disk; mlx_lm.server has no disk tier, so
   this is a cold request to it.

Requests are streaming, greedy POST /v1/completions with a small max_tokens (EOS and special
tokens suppressed with logit_bias); TTFT is the time to the first content delta, median over
--runs. ``usage.prompt_tokens_details.cached_tokens`` (stream_options.include_usage) is printed
for both servers. mlxserve's disk writes are followed with the counter
``mlxserve_disk_tier_writes_total`` of GET /metrics (without /metrics, the script sleeps).
--openblas preloads a system OpenBLAS into both servers (LD_PRELOAD).
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving as bs  # noqa: E402

MAX_SEQUENCE_LENGTH = 4096  # the checkpoint's max_position_embeddings
SITUATIONS = ("cold", "again_now", "again", "restart")
SITUATION_LABELS = {
    "cold": "1. cold (first time)",
    "again_now": "2a. same prompt again, right after the cold response",
    "again": "2b. same prompt again, once the disk writes have landed",
    "restart": "3. after a server restart",
}
BLOCK_SIZE = 16  # mlxserve's default [kv_cache] block_size
SPECIAL_TOKENS = range(5)  # <|begin_of_text|>, <|eot_id|>, <|end_of_text|>, header ids
SYLLABLES = (
    "ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "in", "que", "pa", "zu", "mar", "el",
    "shi", "no", "bra", "ti", "gon", "ve", "lu", "xa", "or", "fen", "di", "ru", "ste", "ma",
)  # fmt: skip


# ---- prompts ---------------------------------------------------------------------------


def load_tokenizer(checkpoint: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


def random_words(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(count)]


def token_count(tokenizer: Any, words: list[str]) -> int:
    return len(tokenizer.encode(" ".join(words), add_special_tokens=False).ids)


def make_prompt(tokenizer: Any, target: int) -> str:
    """Random words after a fresh nonce (so no two prompts share a block), within ``target``
    tokens."""
    nonce = secrets.token_hex(6)
    rng = random.Random(nonce)
    words = [f"{nonce}: document."]
    while token_count(tokenizer, words) < target:
        words += random_words(rng, max(8, (target - token_count(tokenizer, words)) // 2))
    low, high = 1, len(words)  # the longest prefix of words within target tokens
    while low < high:
        middle = (low + high + 1) // 2
        if token_count(tokenizer, words[:middle]) <= target:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


# ---- requests --------------------------------------------------------------------------


@dataclass
class Timing:
    ttft: float
    prompt_tokens: int | None
    cached_tokens: int | None
    deltas: int


@dataclass
class Client:
    base_url: str
    model: str
    max_tokens: int
    timeout: float
    logit_bias: dict[str, float] = field(default_factory=dict)

    def body(self, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        if self.logit_bias:
            body["logit_bias"] = self.logit_bias
        return body

    def complete(self, prompt: str) -> Timing:
        start = time.perf_counter()
        first: float | None = None
        usage: dict[str, Any] = {}
        deltas = 0
        url = f"{self.base_url}/completions"
        with httpx.stream("POST", url, json=self.body(prompt), timeout=self.timeout) as response:
            if response.status_code != 200:
                response.read()
                raise bs.RequestError(response.status_code, response.text)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        deltas += 1
                        first = first or time.perf_counter()
        end = time.perf_counter()
        details = usage.get("prompt_tokens_details") or {}
        return Timing(
            ttft=(first or end) - start,
            prompt_tokens=usage.get("prompt_tokens"),
            cached_tokens=details.get("cached_tokens"),
            deltas=deltas,
        )

    def first_request(self, prompt: str) -> Timing:
        """complete(), retried without logit_bias if the server rejects it."""
        try:
            return self.complete(prompt)
        except bs.RequestError as exc:
            if not self.logit_bias or exc.status not in (400, 422):
                raise
            print(f"  warning: logit_bias rejected ({exc}); retrying without it", flush=True)
            self.logit_bias = {}
            return self.complete(prompt)


def show(kind: str, situation: str, run: int, timing: Timing) -> None:
    warning = "" if timing.deltas else "  (no content delta: TTFT is the whole request)"
    print(
        f"  {situation:<9} run {run + 1}: ttft {timing.ttft * 1000:7.0f} ms, prompt_tokens "
        f"{timing.prompt_tokens}, cached_tokens {timing.cached_tokens}{warning}",
        flush=True,
    )


# ---- servers ---------------------------------------------------------------------------


def metric_total(root_url: str, name: str) -> float | None:
    """The sum of a Prometheus counter over its labels; None without /metrics."""
    try:
        response = httpx.get(f"{root_url}/metrics", timeout=10.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    total = 0.0
    for line in response.text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def disk_writes(base_url: str) -> float | None:
    return metric_total(base_url.removesuffix("/v1"), "mlxserve_disk_tier_writes_total")


def wait_disk_writes(base_url: str, at_least: float, timeout: float = 120.0) -> None:
    """Wait until mlxserve has written ``at_least`` blocks to disk and stopped writing."""
    last = disk_writes(base_url)
    if last is None:
        print("  no /metrics: sleeping 5 s for the disk writes", flush=True)
        time.sleep(5.0)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = disk_writes(base_url)
        if now is not None and now == last and now >= at_least:
            print(f"  disk tier: {now:.0f} blocks written in all", flush=True)
            return
        last = now
    print(f"  warning: disk writes still under way after {timeout:.0f} s ({last})", flush=True)


def settle(kind: str, base_url: str, before: float | None, timing: Timing) -> None:
    """Let mlxserve's disk writes for the request just made land (mlx_lm.server: a pause)."""
    if kind != "mlxserve":
        time.sleep(1.0)
        return
    wait_disk_writes(base_url, (before or 0) + (timing.prompt_tokens or 0) // BLOCK_SIZE)


def write_config(folder: Path, checkpoint: Path, disk_dir: Path) -> Path:
    """bench_serving's mlxserve config, plus a [kv_cache] table with a disk tier."""
    path = bs.write_mlxserve_config(folder, checkpoint, streams=1)
    with open(path, "a", encoding="utf-8") as f:
        f.write(
            "[kv_cache]\n"
            f"max_sequence_length = {MAX_SEQUENCE_LENGTH}\n"
            f'disk_dir = "{disk_dir}"\n'
            'disk_write = "all"\n'
        )
    return path


def command(kind: str, checkpoint: Path, folder: Path, port: int) -> list[str]:
    if kind == "reference":  # its prompt cache is on by default (--prompt-cache-size 10)
        return bs.server_command(kind, checkpoint, folder, port, streams=1)
    config = write_config(folder, checkpoint, folder / "kv-disk")
    return [bs.mlxserve_executable(), "--config", str(config), "serve", "--port", str(port)]


def make_client(kind: str, base_url: str, args: argparse.Namespace, eos: list[int]) -> Client:
    return Client(
        base_url=base_url,
        model="default_model" if kind == "reference" else "bench",
        max_tokens=args.max_tokens,
        timeout=args.request_timeout,
        logit_bias={str(t): -100.0 for t in sorted({*eos, *SPECIAL_TOKENS})},
    )


# ---- measuring -------------------------------------------------------------------------


@dataclass
class Results:
    timings: dict[str, list[Timing]] = field(default_factory=lambda: {s: [] for s in SITUATIONS})
    seconds: float = 0.0

    def median_ttft(self, situation: str) -> float | None:
        values = [t.ttft for t in self.timings[situation]]
        return statistics.median(values) if values else None

    def cached(self, situation: str) -> str:
        values = [t.cached_tokens for t in self.timings[situation] if t.cached_tokens is not None]
        return f"{statistics.median(values):.0f}" if values else "-"


def session(
    kind: str,
    args: argparse.Namespace,
    checkpoint: Path,
    env: dict[str, str],
    situations: tuple[str, ...],
    prompts: list[str],
    results: Results,
) -> None:
    """Start the server, warm it up, send each prompt once per situation, stop it."""
    port = bs.free_port()
    log = args.folder / f"{kind}-{situations[0]}.log"
    server = bs.running_server(
        command(kind, checkpoint, args.folder, port), port, log, env, args.ready_timeout
    )
    with server as base_url:
        client = make_client(kind, base_url, args, bs.eos_token_ids(checkpoint))
        client.first_request(f"Warm-up {secrets.token_hex(4)}: a short unrelated prompt.")
        for run, prompt in enumerate(prompts):
            before = disk_writes(base_url) if kind == "mlxserve" else None
            for situation in situations:
                if situation == "again":
                    settle(kind, base_url, before, results.timings["cold"][-1])
                timing = client.complete(prompt)
                results.timings[situation].append(timing)
                show(kind, situation, run, timing)


def bench_server(
    kind: str, args: argparse.Namespace, checkpoint: Path, env: dict[str, str], prompts: list[str]
) -> Results:
    print(f"\n== {bs.LABELS[kind]} ==", flush=True)
    start = time.perf_counter()
    results = Results()
    session(kind, args, checkpoint, env, ("cold", "again_now", "again"), prompts, results)
    print("  restarting ...", flush=True)
    session(kind, args, checkpoint, env, ("restart",), prompts, results)
    results.seconds = time.perf_counter() - start
    print(f"  {bs.LABELS[kind]}: done in {results.seconds:.0f} s", flush=True)
    return results


# ---- report ----------------------------------------------------------------------------


def speed_up(cold: float | None, value: float | None) -> str:
    return "-" if cold is None or not value else f"{cold / value:.1f}x"


def table(ref: Results | None, new: Results | None) -> list[str]:
    lines = [
        "| situation | mlx_lm.server TTFT ms | mlxserve TTFT ms "
        "| mlxserve speed-up vs its own cold | ratio mlxserve / reference "
        "| cached tokens (mlx_lm.server / mlxserve) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for situation in SITUATIONS:
        a = ref.median_ttft(situation) if ref else None
        b = new.median_ttft(situation) if new else None
        cold = new.median_ttft("cold") if new else None
        cached = " / ".join(r.cached(situation) if r else "-" for r in (ref, new))
        label = SITUATION_LABELS[situation]
        if situation == "restart":
            label += " (mlx_lm.server: no disk tier, so cold)"
        lines.append(
            f"| {label} | {bs.fmt(a, 1000, 0)} | {bs.fmt(b, 1000, 0)} | {speed_up(cold, b)} "
            f"| {bs.ratio(b, a)} | {cached} |"
        )
    return lines


def header(args: argparse.Namespace, params: int, blas: str, prompt_tokens: str) -> list[str]:
    info = argparse.Namespace(size=args.size, max_tokens=args.max_tokens, runs=args.runs, streams=1)
    return [
        *bs.machine_info(info, params, blas)[:-1],
        f"- requests: streaming POST /v1/completions, a {prompt_tokens}-token random-word "
        f"prompt per run, max_tokens {args.max_tokens}, temperature 0; TTFT = time to the first "
        f"content delta, median of {args.runs} runs",
        '- mlxserve: [kv_cache] block_size 16 (default), disk_dir set, disk_write = "all"; '
        "mlx_lm.server: default prompt cache (--prompt-cache-size 10)",
    ]


def report(
    results: dict[str, Results], failed: list[str], args: argparse.Namespace, params: int, blas: str
) -> str:
    ref, new = results.get("reference"), results.get("mlxserve")
    counted = {t.prompt_tokens for r in results.values() for t in r.timings["cold"]} - {None}
    prompt_tokens = "/".join(map(str, sorted(counted))) or f"~{args.prompt_tokens}"
    lines = [
        "## Prefix-cache benchmark",
        "",
        *header(args, params, blas, prompt_tokens),
        "",
        *table(ref, new),
    ]
    if ref:
        cold = ref.median_ttft("cold")
        lines.append(
            f"\nmlx_lm.server speed-up vs its own cold: again right away "
            f"{speed_up(cold, ref.median_ttft('again_now'))}, again after a pause "
            f"{speed_up(cold, ref.median_ttft('again'))}, after restart "
            f"{speed_up(cold, ref.median_ttft('restart'))}."
        )
    times = ", ".join(f"{bs.LABELS[k]} {r.seconds:.0f} s" for k, r in results.items())
    lines.append(f"\nWall time: {times}." + (f" Failed: {', '.join(failed)}." if failed else ""))
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bs.common_parser(
        __doc__.splitlines()[0], ready_timeout=300.0, max_tokens=8, streams=False
    )
    parser.add_argument("--only", choices=("reference", "mlxserve", "both"), default="both")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    args = bs.checked_args(parser, argv)
    args.folder = args.workdir / "prefix-cache"
    if args.prompt_tokens < 32:
        parser.error("--prompt-tokens must be >= 32")
    if args.prompt_tokens + args.max_tokens > MAX_SEQUENCE_LENGTH:
        parser.error(f"--prompt-tokens + --max-tokens must be <= {MAX_SEQUENCE_LENGTH}")
    return args


def prepare_folder(folder: Path) -> None:
    """This script's own folder under --workdir, with an empty disk tier."""
    shutil.rmtree(folder / "kv-disk", ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    prepare_folder(args.folder)
    env, blas = bs.server_env(args.openblas)
    checkpoint = bs.ensure_checkpoint(args.workdir, args.size)
    params = bs.count_parameters(checkpoint)
    print(f"checkpoint: {checkpoint} ({params:,} parameters)", flush=True)
    tokenizer = load_tokenizer(checkpoint)
    prompts = [make_prompt(tokenizer, args.prompt_tokens) for _ in range(args.runs)]
    kinds = bs.SERVERS if args.only == "both" else (args.only,)
    results: dict[str, Results] = {}
    failed: list[str] = []
    for kind in kinds:
        try:
            results[kind] = bench_server(kind, args, checkpoint, env, prompts)
        except (RuntimeError, httpx.HTTPError) as exc:
            print(f"  error: {bs.LABELS[kind]} failed: {exc}", file=sys.stderr, flush=True)
            failed.append(kind)
    shutil.rmtree(args.folder / "kv-disk", ignore_errors=True)
    bs.publish(report(results, failed, args, params, blas), args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
