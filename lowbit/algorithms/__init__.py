"""One function per file over (weight, statistics, grid)."""
