"""``python -m adaptnet``: the same as the ``adaptnet`` command."""

from adaptnet.cli.main import entry

if __name__ == "__main__":
    entry()
