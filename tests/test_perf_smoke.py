"""CI guard for issue 6: a whole extraction must run near the speed of the bare backbone forward."""

from __future__ import annotations

import sys

import pytest

from featcache.backbones.models import load_backbone
from featcache.data.sources import open_source
from featcache.extraction.engines import MEASURED_FASTEST

from .conftest import DEMO, REPO

pytestmark = pytest.mark.slow  # timing on real extractions: outside the fast tier


SMOKE_MIN_RATIO = 0.75  # benchmarks/extraction_efficiency.py measures the full figure (target 0.9)
# With the fastest engine the decode's core time is a large share of the machine, and how large depends on the
# machine (on a CPU whose forward is twice as fast the same decode costs twice the share): the guard is against
# the ceiling that share leaves, 2 / (2 + bare / decode) on 2 cores. The runs of benchmarks/engines.py reach
# 0.75-0.95 of it (0.72 on these 200 small photos, where the loader's start-up counts); losing the overlap falls
# below. The decode itself is guarded apart, as a ratio to the same decode done in this process at the same
# time (an absolute rate failed CI on a slower machine: 295 img/s): one loader worker reaches 0.55-0.75 of it
# here (its start-up counts on 200 images); a collate that hands every image tensor over apart reaches
# 0.42-0.49, and the loader that sent every image twice did 125 img/s, about 0.2.
FASTEST_MIN_OF_CEILING = 0.6
MIN_DECODE_OF_INPROCESS = 0.4
FASTEST = MEASURED_FASTEST["efficientnet_lite0"].value


def _efficiency(engine: str):
    sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark's own helper: the docs' figure and this guard agree
    from efficiency import extraction_efficiency

    # best of three alternated runs of all 200 images: noise on a shared machine only ever slows a run
    # down, and 200 images amortize the loader's start-up (0.82 at 240 images vs 0.94 at 1,200 measured)
    return extraction_efficiency(load_backbone("efficientnet_lite0", weights="random"), open_source(DEMO),
                                 n_images=200, batch_size=8, repeats=3, peak=0.0, engine=engine)


def test_extraction_keeps_up_with_the_bare_forward():
    result = _efficiency("torch")
    assert result.ratio >= SMOKE_MIN_RATIO, (
        f"--engine torch: extract {result.extract_ips:.1f} img/s vs bare forward {result.bare_ips:.1f} img/s: "
        f"ratio {result.ratio:.2f} < {SMOKE_MIN_RATIO}; decode, hashing or writes no longer overlap compute")


def test_extraction_with_the_fastest_engine_reaches_the_decode_ceiling():
    from efficiency import ceiling, decode_ips, inprocess_decode_ips

    result = _efficiency(FASTEST)
    backbone, source = load_backbone("efficientnet_lite0", weights="random"), open_source(DEMO)
    rates = [(decode_ips(backbone, source), inprocess_decode_ips(backbone, source)) for _ in range(2)]
    decode, inprocess = max(r[0] for r in rates), max(r[1] for r in rates)
    assert decode >= MIN_DECODE_OF_INPROCESS * inprocess, (
        f"one loader worker decodes {decode:.0f} img/s, {decode / inprocess:.2f} of the same decode in this "
        f"process ({inprocess:.0f} img/s; < {MIN_DECODE_OF_INPROCESS}): the hand-over to the main process costs")
    best = ceiling(result.bare_ips, decode)
    assert result.ratio >= FASTEST_MIN_OF_CEILING * best, (
        f"--engine {FASTEST}: extract {result.extract_ips:.1f} img/s vs bare forward {result.bare_ips:.1f} img/s "
        f"(ratio {result.ratio:.2f}) with a decode of {decode:.0f} img/s (ceiling {best:.2f}): below "
        f"{FASTEST_MIN_OF_CEILING} of the ceiling; decode and forward no longer overlap")
