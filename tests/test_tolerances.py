"""The tolerance helper: reordered arithmetic passes, a real error does not, and the allowance is what it says."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_fp_close, fp_approx, fp_tol

EPS32 = torch.finfo(torch.float32).eps


def _operands(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 512, generator=g), torch.randn(512, 32, generator=g)


def test_a_reordered_reduction_passes_and_a_dropped_term_fails():
    x, w = _operands()
    expected = x @ w
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(1))
    reordered = x[:, perm] @ w[perm]  # the same sums in another order (what another CPU's kernel does)
    chunked = sum(x[:, i : i + 64] @ w[i : i + 64] for i in range(0, 512, 64))
    assert not torch.equal(reordered, expected) and not torch.equal(chunked, expected)  # they do round differently
    assert_fp_close(reordered, expected)
    assert_fp_close(chunked, expected)
    assert_fp_close(expected, (x.double() @ w.double()).float())
    dropped = x[:, 1:] @ w[1:]  # a real bug: one of 512 terms missing
    with pytest.raises(AssertionError):
        assert_fp_close(dropped, expected)
    with pytest.raises(AssertionError):
        assert_fp_close(expected * (1 + 1e-3), expected)  # a 0.1% error, e.g. a wrong scale


def test_the_allowance_is_ulps_of_the_largest_expected_value():
    expected = torch.tensor([4.0, 0.0])
    ulp = EPS32 * 4.0
    assert_fp_close(torch.tensor([4.0, 200 * ulp]), expected)
    with pytest.raises(AssertionError):
        assert_fp_close(torch.tensor([4.0, 300 * ulp]), expected)
    assert_fp_close(torch.tensor([4.0, 300 * ulp]), expected, ulps=512)
    assert fp_tol(expected) == pytest.approx({"rtol": 256 * EPS32, "atol": 256 * EPS32 * 4.0})
    assert fp_tol(expected, reduction=16)["rtol"] == pytest.approx(4 * fp_tol(expected)["rtol"])
    assert fp_tol(torch.tensor([float("inf"), -2.0]))["atol"] == pytest.approx(256 * EPS32 * 2.0)  # finite only


def test_the_dtype_sets_the_epsilon():
    one = torch.ones(3, dtype=torch.float64)
    assert fp_tol(one)["rtol"] == pytest.approx(256 * torch.finfo(torch.float64).eps)
    assert fp_tol(one, dtype=torch.float32)["rtol"] == pytest.approx(256 * EPS32)  # a float32 result cast up
    assert fp_tol(one.bfloat16())["rtol"] == pytest.approx(8 * torch.finfo(torch.bfloat16).eps)
    assert fp_tol(2.0)["atol"] == pytest.approx(256 * EPS32 * 2.0)  # Python floats count as float32
    assert 2.0 * (1 + 100 * EPS32) == fp_approx(2.0) and 2.0 * (1 + 1e-3) != fp_approx(2.0)
    with pytest.raises(ValueError, match="reduction=0"):
        fp_tol(one, reduction=0)
    with pytest.raises(ValueError, match="no tolerance for torch.complex64"):
        fp_tol(torch.ones(2, dtype=torch.complex64))
