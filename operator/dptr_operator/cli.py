"""``dptr-operator``: entry point (not implemented yet)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("dptr-operator: not implemented", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
