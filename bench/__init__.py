"""The gateway's benchmark: `make bench` (or `python -m bench.run --help`).

Measures the gateway under gunicorn against a direct call to the same fake upstream, in one
run, and prints a table of ratios and targets. Timings live here, never in tests/.
"""
