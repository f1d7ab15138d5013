"""``jaxinfra bench NAME``: benchmarks that time every available implementation of
an op on the devices present, print a table and write JSON.

A benchmark is a function ``run(ctx: BenchContext) -> None`` registered with
:func:`register`; it builds its cases (full sizes on a GPU, scaled down on CPU),
times them with :meth:`BenchContext.time`, and records rows with
:meth:`BenchContext.add`. The harness prints the rows as a table and writes
them, with the device and versions, to ``--json``.
"""

from jaxinfra.bench._harness import (BenchContext, BenchSpec, available_impls, environment,
                                     main, register, registered)

__all__ = ["BenchContext", "BenchSpec", "available_impls", "environment", "main", "register",
           "registered"]
