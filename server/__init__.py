"""The HTTP server, its protocols and the ``mlxserve`` command.

Importing it does no work: the entry points import MLX and mlx_lm (core/cpu/startup.py)."""
