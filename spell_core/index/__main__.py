"""``python -m spell_core.index build ...``: the command line of ``spell_core.index.cli``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
