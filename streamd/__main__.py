"""``python -m streamd`` is the ``streamd`` command."""

import sys

from streamd.cli import main

if __name__ == "__main__":
    sys.exit(main())
