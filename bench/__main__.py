"""`make bench`: run every benchmark and print its Markdown table (figures: bench/RESULTS.md)."""

from __future__ import annotations

from bench import rollout, step, trl_compare, weight_sync


def main() -> int:
    rc = 0
    for name, fn in (
        ("rollout", rollout.main),
        ("step", step.main),
        ("trl_compare", trl_compare.main),
        ("weight_sync", weight_sync.main),
    ):
        print(f"\n## bench.{name}\n", flush=True)
        rc = fn([]) or rc
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
