"""`make bench`: run every benchmark and print its Markdown table (figures: bench/RESULTS.md)."""

from __future__ import annotations

import time

from bench.perf import rollout, step, trl_compare, weight_sync


def main() -> int:
    rc, took = 0, {}
    for name, fn in (
        ("rollout", rollout.main),
        ("step", step.main),
        ("trl_compare", trl_compare.main),
        ("weight_sync", weight_sync.main),
    ):
        print(f"\n## bench.{name}\n", flush=True)
        t0 = time.perf_counter()
        rc = fn([]) or rc
        took[name] = time.perf_counter() - t0
    print("\n" + ", ".join(f"bench.perf.{k} {v / 60:.1f} min" for k, v in took.items()), flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
