"""Test helpers for code that runs on meshes and across processes."""

from jaxinfra.testing.multiprocess import MultiprocessError, free_port, run_multiprocess

__all__ = ["MultiprocessError", "free_port", "run_multiprocess"]
