"""Side-by-side speed and memory comparisons (run as scripts; `models` and `measure` are shared)."""
