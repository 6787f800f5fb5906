"""Tools that sit beside the op and import it (never the reverse): the command line, tuning
sweeps, benchmarks and their reports, the compile check, the overflow profiler."""
