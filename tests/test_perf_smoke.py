"""CI guard for issue 6: a whole extraction must run near the speed of the bare backbone forward."""

from __future__ import annotations

import sys

import pytest

from featcache.backbones import load_backbone
from featcache.engines import MEASURED_FASTEST
from featcache.sources import open_source

from .conftest import DEMO, REPO

SMOKE_MIN_RATIO = 0.75  # benchmarks/extraction_efficiency.py measures the full figure (target 0.9)
# With the fastest engine the forward leaves less time to hide the decode in (measured 0.73 here on
# these 200 images, 0.80 on 1,024 HAM images: benchmarks/engines.py); the guard catches losing the overlap
# (0.63 before the loader stopped sending every image twice).
FASTEST_MIN_RATIO = 0.6
FASTEST = MEASURED_FASTEST["efficientnet_lite0"].value


@pytest.mark.parametrize("engine, minimum", [("torch", SMOKE_MIN_RATIO), (FASTEST, FASTEST_MIN_RATIO)])
def test_extraction_keeps_up_with_the_bare_forward(engine, minimum):
    sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark's own helper: the docs' figure and this guard agree
    from efficiency import extraction_efficiency

    source = open_source(DEMO)
    # best of three alternated runs of all 200 images: noise on a shared machine only ever slows a run
    # down, and 200 images amortize the loader's start-up (0.82 at 240 images vs 0.94 at 1,200 measured)
    result = extraction_efficiency(load_backbone("efficientnet_lite0", weights="random"), source,
                                   n_images=200, batch_size=8, repeats=3, peak=0.0, engine=engine)
    assert result.ratio >= minimum, (
        f"--engine {engine}: extract {result.extract_ips:.1f} img/s vs bare forward {result.bare_ips:.1f} img/s: "
        f"ratio {result.ratio:.2f} < {minimum}; decode, hashing or writes no longer overlap compute")
