"""The plugin contract: hook markers, the ModelFamily base class, and the built-in families."""

from .family import ModelFamily
from .hookspecs import hookimpl, hookspec

__all__ = ["ModelFamily", "hookimpl", "hookspec"]
