"""ekipl benchmarks: `make bench` runs them and prints Markdown tables of ratios."""
