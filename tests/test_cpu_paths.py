"""Machines of this kind differ (some AVX-512 with VNNI and BF16, others AVX2 only): what is learned from data
does not depend on the kernel's summation order, and ``RETRIEVE_ISA=avx2`` puts an AVX-512 machine on the
paths an AVX2-only one takes (``CI_ISA=avx2 bash .ci/run`` runs the whole suite so)."""
from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from conftest import PHOTOS, skimage_photo


@pytest.fixture(scope="module")
def rootsift():
    from retrieval.match.verify import Verifier, _root

    v = Verifier()
    return np.concatenate([_root(v.extract(skimage_photo(n)).descriptors) for n in PHOTOS]).astype(np.float32)


def test_projection_does_not_depend_on_the_summation_order(rootsift):
    """The verification subspace is fitted where two eigenvalues of real photos' RootSIFT moments lie ~1e-5
    apart, so a float32 product's rounding (which changes with the BLAS kernel, the thread count and the row
    order) moved its axes by ~4e-5 and a search's re-learned projection disagreed with the stored one. In
    float64 the axes move by at most ~ n·eps·‖M‖ / gap (Davis–Kahan), far below float32's own rounding."""
    from retrieval.match.words import PROJECTION_DIMS, fit_projection

    x = rootsift
    m = x.astype(np.float64).T @ x.astype(np.float64) / len(x)
    w = np.linalg.eigvalsh(m)[::-1]
    gap = w[PROJECTION_DIMS - 1] - w[PROJECTION_DIMS]
    bound = len(x) * np.finfo(np.float64).eps * w[0] / gap + 4 * np.finfo(np.float32).eps
    a = fit_projection(x)
    with threadpool_limits(1):
        b = fit_projection(x[np.random.default_rng(1).permutation(len(x))])
    assert a.shape == (128, PROJECTION_DIMS)
    assert np.allclose(a.T @ a, np.eye(PROJECTION_DIMS), atol=1e-5)  # orthonormal axes
    assert np.abs(a - b).max() <= bound, (np.abs(a - b).max(), bound)
    assert bound < 1e-5  # the tolerance test_catalogue compares a stored and a re-learned projection with


def test_isa_override_hides_what_an_avx2_machine_lacks(monkeypatch):
    from retrieval.errors import RetrieveError
    from retrieval.models import precision

    def flags(isa):
        monkeypatch.setenv("RETRIEVE_ISA", isa)
        precision.cpu_flags.cache_clear()
        try:
            return precision.cpu_flags()
        finally:
            precision.cpu_flags.cache_clear()

    native = flags("native")
    avx2 = flags("avx2")
    assert avx2 <= native and not any(f.startswith(("avx512", "avx_vnni", "amx")) for f in avx2)
    assert ("avx2" in avx2) == ("avx2" in native)
    monkeypatch.setenv("RETRIEVE_ISA", "avx2")
    precision.cpu_flags.cache_clear()
    assert not precision.has_vnni()
    assert precision.quant_variant().startswith("int8r7-")  # 7-bit weights, as on a CPU without VNNI
    precision.cpu_flags.cache_clear()
    with pytest.raises(RetrieveError, match="RETRIEVE_ISA"):
        flags("sse9")
    monkeypatch.undo()
    precision.cpu_flags.cache_clear()  # the flags of this process's own environment again, for later tests
