"""Fixed presets' logits must not move: refactors and speed-ups are checked against a recorded run.

The fixture (``tests/golden/golden_logits.npz``) was produced by ``tests/golden/make_golden.py`` from
an earlier commit; see that script for when and how to regenerate a case.
"""

from __future__ import annotations

import numpy as np
import pytest

from golden.make_golden import CASES, GOLDEN, compute


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    assert GOLDEN.exists(), f"missing regression fixture {GOLDEN}: run tests/golden/make_golden.py"
    return dict(np.load(GOLDEN))


def test_every_case_is_recorded(golden):
    assert set(golden) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_unchanged(name, golden):
    got = compute(name)
    want = golden[name]
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"preset case {name!r} moved")
