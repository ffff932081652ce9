"""How one request wants its tokens chosen, and when it wants to stop."""

from __future__ import annotations

from dataclasses import dataclass, field

INT32_MAX = 2**31 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300
MAX_TOP_LOGPROBS = 20
TOP_LOGPROBS_RANGE = f"must be between 0 and {MAX_TOP_LOGPROBS}"
# The parameters a model family (plugins' ``sampling_defaults``) may give a default for.
DEFAULTABLE_PARAMS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


class InvalidParameterError(ValueError):
    """A sampling parameter is out of range; ``param`` names it (for the API's error body)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling and stopping rules of one request.

    ``max_tokens`` None means "as many as the context allows". ``temperature`` 0 is greedy.
    ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 switch those filters off. Penalties follow
    OpenAI (presence, frequency: subtracted from logits) and Hugging Face (repetition:
    logits of seen tokens divided, or multiplied when negative). ``logit_bias`` maps token
    ids to values added to their logits. ``top_logprobs`` > 0 implies ``logprobs``.
    ``prompt_logprobs`` N asks for the log probability of each prompt token after the first,
    with the N most likely tokens at its position (None: not wanted); with it, ``max_tokens``
    may be 0: the prompt is scored and nothing generated.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        stop_ok = len(self.stop) <= MAX_STOP_STRINGS and all(
            0 < len(text) <= MAX_STOP_CHARS for text in self.stop
        )
        checks = [
            (
                "max_tokens",
                self.max_tokens is None or self.least_max_tokens <= self.max_tokens <= INT32_MAX,
                f"must be between {self.least_max_tokens} and {INT32_MAX}",
            ),
            ("temperature", 0 <= self.temperature <= 100, "must be between 0 and 100"),
            ("top_p", 0 < self.top_p <= 1, "must be greater than 0 and at most 1"),
            ("top_k", 0 <= self.top_k <= INT32_MAX, f"must be 0 (off) up to {INT32_MAX}"),
            ("min_p", 0 <= self.min_p <= 1, "must be between 0 and 1"),
            (
                "seed",
                self.seed is None or 0 <= self.seed < 2**63,
                "must be a non-negative 64-bit integer",
            ),
            ("repetition_penalty", 0 < self.repetition_penalty <= 10, "must be in (0, 10]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be between -2 and 2"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be between -2 and 2"),
            ("top_logprobs", 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, TOP_LOGPROBS_RANGE),
            (
                "prompt_logprobs",
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
                TOP_LOGPROBS_RANGE,
            ),
            (
                "stop",
                stop_ok,
                f"at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
                "characters",
            ),
            (
                "stop_token_ids",
                len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS
                and all(0 <= token <= INT32_MAX for token in self.stop_token_ids),
                f"at most {MAX_STOP_TOKEN_IDS} token ids",
            ),
            (
                "logit_bias",
                len(self.logit_bias) <= MAX_LOGIT_BIAS,
                f"at most {MAX_LOGIT_BIAS} entries",
            ),
            (
                "logit_bias",
                all(0 <= token <= INT32_MAX for token, _ in self.logit_bias),
                "keys must be token ids",
            ),
            (
                "logit_bias",
                all(-100 <= b <= 100 for _, b in self.logit_bias),
                "values must be between -100 and 100",
            ),
        ]
        for param, ok, message in checks:
            if not ok:
                raise InvalidParameterError(param, message)

    @property
    def least_max_tokens(self) -> int:
        """0 when the prompt is scored (nothing need be generated), else 1."""
        return 0 if self.prompt_logprobs is not None else 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @property
    def penalized(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
