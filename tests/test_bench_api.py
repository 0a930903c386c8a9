"""What bench/speed/bench_api.py relies on to time plain decoding: a plain generation through
Model.generate does no DySCO work, whatever ran before it on the same context. The benchmark it
replaced (bench_decode.py) drove the runtime loop itself and left fast mode's score capture on,
so its "plain" passes also computed the QR-head scores (issue 24)."""
from __future__ import annotations

import pytest

import models
from dysco_edge import Model
from dysco_edge.errors import DyscoError


def test_plain_after_fast_computes_no_scores():
    with Model(models.smollm2_q4_1(), n_ctx=1024) as model:
        fast = model.resolve_dysco("auto").replace(mode="fast")
        model.generate("Name three colours.", dysco=fast, max_new_tokens=4)
        # the oracle sees scoring: fast's last full pass scored its token
        assert model.engine.native.scores().size > 0
        model.generate("Name three colours.", dysco=None, max_new_tokens=4)
        with pytest.raises(DyscoError, match="captured no scores"):
            model.engine.native.scores()
