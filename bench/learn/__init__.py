"""Learning experiments: `make learn` and `make learn-more` (bench/LEARNING.md)."""
