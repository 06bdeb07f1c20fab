"""``python -m rvqstore``: the command line (see :mod:`rvqstore.cli`)."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="rvqstore")
