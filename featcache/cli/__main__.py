"""`python -m featcache.cli`: the featcache command."""

from featcache.cli import main

if __name__ == "__main__":  # not when a documentation tool imports every module
    main()
