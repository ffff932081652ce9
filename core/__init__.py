"""The engine. Importing it first puts the fastest BLAS available under MLX (see blas.py)."""

from mlxserve.core.cpu.blas import load_fast_blas

load_fast_blas()
