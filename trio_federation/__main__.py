"""``python -m trio_federation``: the command line (see ``trio-federation --help``)."""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
