"""``python -m tfgalflow``: the command line (same as the ``tfgalflow`` script)."""
import sys

from .cli import main

sys.exit(main())
