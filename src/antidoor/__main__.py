"""``python -m antidoor``: the same command line as ``antidoor`` (for machines where the script is not installed)."""

from antidoor.cli import main

main()
