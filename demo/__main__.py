"""``python -m demo``: the walk-through of ``make demo``."""

from demo.run import main

if __name__ == "__main__":
    raise SystemExit(main())
