"""streamd benchmarks: ``python -m bench [--quick] [--only SECTION]`` (see docs/benchmarks.md).

One module per section (``engine``, ``daemon``, ``latency``, ``scaling``) plus the shared pieces:
``ticks`` (the one generated tick stream every contender gets), ``harness`` (starting the daemon
in its own session, scraping /metrics, paced load generators, subscribers, raw transport
ceilings) and ``report`` (medians, tables, JSON and the docs page).
"""
