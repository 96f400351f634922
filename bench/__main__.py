"""`make bench`: run every benchmark that exists and print its Markdown table."""

from __future__ import annotations

from bench import weight_sync


def main() -> int:
    return weight_sync.main([])


if __name__ == "__main__":
    raise SystemExit(main())
