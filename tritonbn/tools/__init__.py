"""The user commands, beside the op and importing it (never the reverse): the command line,
tuning sweeps, benchmarks and their reports, the overflow profiler."""
