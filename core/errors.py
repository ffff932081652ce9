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
    """A prompt (plus the tokens asked for) does not fit the context."""


class EngineUnavailableError(MlxserveError):
    """The engine has stopped or failed and cannot take requests."""


class ModelBusyError(MlxserveError):
    """A model cannot be unloaded while requests are running on it."""


class UnsupportedModelError(MlxserveError):
    """A checkpoint is in a form mlxserve cannot serve (e.g. a GGUF tensor type it cannot read)."""
