"""``python -m adaptnet``: the same as the ``adaptnet`` command."""

import sys

from adaptnet.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
