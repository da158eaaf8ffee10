"""How close two floating-point computations of the same quantity must be to count as equal.

Two computations that agree in exact arithmetic but not in the order of their operations (another kernel, a
fused path beside an unfused one, a CPU whose vector width sums in another order) differ by rounding error.
That error scales with the magnitude of the values combined and with the dtype's machine epsilon, not with
what one machine happened to print, so the allowance is a number of ulps of the largest expected value:

    rtol = ulps * sqrt(reduction) * eps(dtype)        atol = rtol * max|expected|

- ``ulps``: the budget for the chain of operations behind each value. The default, 256 for float32 / float64
  ("a few hundred ulps"), covers the tiny test models (sums of up to a few hundred terms, whose reordering
  moves them by a few tens of ulps, through a few layers). bfloat16 / float16 values are themselves rounded
  to 8 / 11 bits, so there the default is a few ulps (8).
- ``reduction``: the length of one unusually long sum behind each value (a loss or gradient accumulated
  over many thousands of terms); reordering a sum of n terms moves it by about sqrt(n) roundings, so the
  allowance grows with sqrt(reduction). Leave it at 1 for the tiny configurations.
- ``dtype``: the precision the computations ran in, when the tensors compared were cast afterwards (a
  float32 result compared in float64, a bfloat16 one upcast to float32).
- ``scale``: the magnitude to measure ulps of, when ``max|expected|`` is not it (an expected tensor of
  zeros).

Where the claim is bit-identity (a resumed run, a reloaded checkpoint, the same kernels on the same inputs)
tests compare exactly (``torch.equal`` or ``rtol=atol=0``) instead.
"""

from __future__ import annotations

import math

import pytest
import torch

DEFAULT_ULPS = {torch.float64: 256, torch.float32: 256, torch.bfloat16: 8, torch.float16: 8}


def fp_tol(expected: torch.Tensor | float, *, ulps: float | None = None, reduction: int = 1,
           dtype: torch.dtype | None = None, scale: float | None = None) -> dict[str, float]:
    """``{"rtol": ..., "atol": ...}`` for ``torch.testing.assert_close`` (``rel`` / ``abs`` for ``pytest.approx``
    are the same numbers) allowing ``ulps`` ulps of ``max|expected|`` in ``dtype`` (the module docstring)."""
    expected = torch.as_tensor(expected)
    dtype = dtype or (torch.float32 if not (expected.is_floating_point() or expected.is_complex()) else expected.dtype)
    if dtype not in DEFAULT_ULPS:
        raise ValueError(f"fp_tol: no tolerance for {dtype}; pass a floating dtype (float64/32, bfloat16/16)")
    if reduction < 1:
        raise ValueError(f"fp_tol: reduction={reduction} must be the length of a sum (>= 1)")
    ulps = DEFAULT_ULPS[dtype] if ulps is None else ulps
    rtol = ulps * math.sqrt(reduction) * torch.finfo(dtype).eps
    if scale is None:
        finite = expected.detach()[torch.isfinite(expected.detach())]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
    return {"rtol": rtol, "atol": rtol * scale}


def assert_fp_close(actual: torch.Tensor, expected: torch.Tensor, *, ulps: float | None = None, reduction: int = 1,
                    dtype: torch.dtype | None = None, scale: float | None = None, msg: str | None = None) -> None:
    """``torch.testing.assert_close(actual, expected)`` within :func:`fp_tol`'s allowance."""
    tol = fp_tol(expected, ulps=ulps, reduction=reduction, dtype=dtype, scale=scale)
    torch.testing.assert_close(actual, expected, **tol, msg=msg)


def fp_approx(expected: float, *, ulps: float | None = None, reduction: int = 1, dtype: torch.dtype | None = None):
    """``pytest.approx(expected)`` within :func:`fp_tol`'s allowance; a Python float counts as float32 (what the
    losses and metrics it is used for were computed in) unless ``dtype`` says otherwise."""
    tol = fp_tol(expected, ulps=ulps, reduction=reduction, dtype=dtype)
    return pytest.approx(expected, rel=tol["rtol"], abs=tol["atol"])
