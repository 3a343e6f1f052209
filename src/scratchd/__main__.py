"""``python -m scratchd``: the same as the ``scratchd`` command."""

from __future__ import annotations

from scratchd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
