"""``python -m influence.datasets fetch|verify|list [NAME...] [--data-dir DIR]``."""
import sys

from .manifest import main

sys.exit(main())
