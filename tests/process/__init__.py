"""Process tests: real processes (``mlxserve serve``, ``mlxserve launch`` and its mlx.launch
ranks, the CLI's commands, fresh Python interpreters). Marker ``process``, set by
tests/conftest.py; ``-m "not process and not browser"`` leaves them out."""
