"""`python -m featcache`: the featcache command."""

from featcache.cli import main

main()
