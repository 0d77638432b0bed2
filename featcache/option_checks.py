"""The option checks that need a layer above :mod:`featcache.options`: which head names exist (the heads
module) and which image filters (the data layer). An option names its check (``check="heads"``); every door
that checks options (the API, studies, the command line through the API) passes :data:`CHECKS`, so a value is
checked the same way whichever door it came through, and the option table at the bottom imports nothing above
it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _heads(value: tuple[str, ...]) -> tuple[str, ...]:
    from featcache.evaluation.head_registry import parse_heads  # scikit-learn and more: imported when heads are checked

    return tuple(parse_heads(",".join(value)))


def _filters(value: tuple[str, ...]) -> tuple[str, ...]:
    from featcache.data.preprocessing import checked_filters

    return checked_filters(value)


CHECKS: dict[str, Callable[[Any], Any]] = {"heads": _heads, "preprocess": _filters}
