"""Benchmarks of datalakefs against the demo lake (``make bench`` = ``python -m bench``).

Each suite is a module ``bench.<suite>`` with a ``run() -> SuiteResult`` function and is runnable on
its own (``python -m bench.<suite>``). :data:`SUITES` lists the modules ``python -m bench`` runs, in
order; a new suite adds its module name here. Every suite measures datalakefs and its references side
by side in one run, writes ``bench/results/<date>/<suite>.md`` and ``.json`` (summaries, never raw
data) and prints its table; ``python -m bench`` also writes ``summary.md``, ``summary.json`` and
``summary.png`` for all suites of the run.
"""

SUITES: tuple[str, ...] = ("bench.listing", "bench.read", "bench.dataset", "bench.staging", "bench.outbox")
