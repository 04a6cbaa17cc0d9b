"""SH colours from the DC and higher-order coefficients kept apart, in row chunks with the view
directions made per chunk, equal the kernel on their concatenation and on `means - campos` bit for bit
(colours and the gradients of means, DC and higher orders; the camera centres' gradient, summed chunk by
chunk, to rounding), for every kernel set that runs on the CPU."""

from __future__ import annotations

import pytest
import torch

from ms_splatfacto.backend.kernels import get_kernels
from ms_splatfacto.backend.ops.sh_parts import sh_from_parts


def inputs(C: int = 3, n: int = 50, K: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means, campos = torch.randn(n, 3, generator=g), torch.randn(C, 3, generator=g)
    dc, rest = torch.randn(n, 3, generator=g), torch.randn(n, K - 1, 3, generator=g)
    masks = torch.rand(C, n, generator=g) > 0.2
    return means, campos, dc, rest, masks


@pytest.mark.parametrize("kernels, direct", [("cpu", True), ("cpu", False), ("reference", False)])
@pytest.mark.parametrize("degree, chunk, C", [(3, 7, 3), (3, 50, 3), (3, 7, 1), (1, 16, 2), (0, 1000, 3)])
def test_parts_equal_the_concatenation(kernels: str, direct: bool, degree: int, chunk: int, C: int):
    """`direct`: the backward calls the kernel set's own SH backward per chunk instead of autograd."""
    sh = get_kernels(kernels).spherical_harmonics
    sh_bwd = get_kernels(kernels).spherical_harmonics_backward if direct else None
    means, campos, dc, rest, masks = inputs(C=C)
    weights = torch.randn(C, 50, 3, generator=torch.Generator().manual_seed(1))

    def run(apart: bool):
        m, c, a, b = (t.clone().requires_grad_() for t in (means, campos, dc, rest))
        if apart:
            out = sh_from_parts(sh, degree, m, c, a, b, masks, chunk_rows=chunk, kernel_bwd=sh_bwd)
        else:
            out = sh(degree, m[None] - c[:, None], torch.cat((a[:, None], b), 1), masks=masks)
        (out * weights).sum().backward()
        zero = torch.zeros_like  # degree 0: the directions are not read
        return out.detach(), zero(m) if m.grad is None else m.grad, a.grad, b.grad, zero(c) if c.grad is None else c.grad

    got, want = run(True), run(False)
    for x, y in zip(got[:4], want[:4]):
        assert torch.equal(x, y)
    torch.testing.assert_close(got[4], want[4], rtol=1e-5, atol=1e-5)
    if degree > 0:
        assert got[4].abs().sum() > 0
    v_rest = got[3]
    assert v_rest.is_contiguous()  # the parameter's gradient as it is, no copy for AccumulateGrad


def test_bad_shapes_are_named():
    sh = get_kernels("cpu").spherical_harmonics
    means, campos, dc, rest, masks = inputs()
    with pytest.raises(AssertionError, match=r"rest must be \[50, K - 1 >= 15, 3\]"):
        sh_from_parts(sh, 3, means, campos, dc, rest[:, :8], masks)
    with pytest.raises(AssertionError, match=r"dc must be \[50, 3\]"):
        sh_from_parts(sh, 3, means, campos, dc[:10], rest, masks)
    with pytest.raises(AssertionError, match=r"campos \[C, 3\]"):
        sh_from_parts(sh, 3, means, campos[:, :2], dc, rest, masks)
