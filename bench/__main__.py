"""`make bench`: run every benchmark that exists and print its Markdown table."""

from __future__ import annotations

from bench import rollout, weight_sync


def main() -> int:
    rc = rollout.main([])
    print()
    return rc or weight_sync.main([])


if __name__ == "__main__":
    raise SystemExit(main())
