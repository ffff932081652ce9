"""Unit tests: in-process, no server and no subprocess (pure functions, the engine's parts,
the registry, plugins, GGUF reading). Marker ``unit``, set by tests/conftest.py."""
