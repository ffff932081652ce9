"""Errors a user can act on; each message says what is wrong and, where it can, what to do."""

from __future__ import annotations


class MlxserveError(Exception):
    """Base of every error mlxserve reports to a user."""


class ModelDoesNotFitError(MlxserveError):
    """The model's layers cannot be placed within the memory the ranks have."""


class UnknownModelTypeError(MlxserveError):
    """No enabled plugin claims a checkpoint's model_type."""


class ModelNotFoundError(MlxserveError):
    """A model name is not in the registry, or its checkpoint cannot be found."""


class HubUnavailableError(MlxserveError):
    """The Hugging Face hub cannot be reached (offline, firewall, or HF_HUB_OFFLINE)."""


class QueueFullError(MlxserveError):
    """Too many requests are waiting; the client should retry later."""


class ContextLengthError(MlxserveError):
    """A prompt (plus the tokens asked for) does not fit the context.

    ``limit`` is the context (tokens), ``prompt_tokens`` the prompt's length (at least that
    many, when only its characters were counted); ``max_tokens`` is set when the prompt fits
    and the tokens asked for do not. An API words the error its own way from these (None:
    only the message says what is wrong).
    """

    def __init__(
        self,
        message: str,
        *,
        limit: int | None = None,
        prompt_tokens: int | None = None,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__(message)
        self.limit = limit
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens


class EngineUnavailableError(MlxserveError):
    """The engine has stopped or failed and cannot take requests."""


class ModelBusyError(MlxserveError):
    """A model cannot be unloaded while requests are running on it."""


class UnsupportedModelError(MlxserveError):
    """A checkpoint is in a form mlxserve cannot serve (e.g. a GGUF tensor type it cannot read)."""
