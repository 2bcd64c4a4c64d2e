"""``python -m harness grid=NAME key=value ...``: the command line of :mod:`harness.cli`."""

from .cli import main

main()
