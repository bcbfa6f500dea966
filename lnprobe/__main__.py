"""``python -m lnprobe``: the same command line as the ``lnprobe`` console script."""
import sys

from .cli import main

if __name__ == "__main__":  # guarded: `lnprobe demo` starts worker processes that re-import __main__
    sys.exit(main())
