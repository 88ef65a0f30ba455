"""bonefrac benchmarks: one command each (``python -m benchmarks.<name>``), a table and a JSON result.

``python -m benchmarks.run_all [--quick]`` runs every benchmark present and
rewrites the sections of ``BENCHMARKS.md`` from the JSON in ``benchmarks/results/``.
"""
