"""The command-line programs of ``scripts/bench-*``: each script runs
``python -m vhost_iommu.bench.scripts.NAME`` with the project's virtualenv (``scripts/setup`` makes it), so
the benchmarks run from a fresh clone."""
