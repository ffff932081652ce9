"""The engine, the KV cache, sampling, models, the CPU backend, ranks and configuration.

Importing it does no work: the entry points load the BLAS first (core/cpu/startup.py)."""
