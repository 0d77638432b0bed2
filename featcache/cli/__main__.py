"""`python -m featcache.cli`: the featcache command."""

from featcache.cli import main

main()
