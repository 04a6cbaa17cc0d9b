"""SH colours from the DC and higher-order coefficients kept apart, in row chunks, equal the kernel on
their concatenation bit for bit (colours and the gradients of directions, DC and higher orders), for
every kernel set that runs on the CPU."""

from __future__ import annotations

import pytest
import torch

from ms_splatfacto.backend.kernels import get_kernels
from ms_splatfacto.backend.ops.sh_parts import sh_from_parts


def inputs(C: int = 3, n: int = 50, K: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(C, n, 3, generator=g, dtype=torch.float32)
    dc, rest = torch.randn(n, 3, generator=g), torch.randn(n, K - 1, 3, generator=g)
    masks = torch.rand(C, n, generator=g) > 0.2
    return dirs, dc, rest, masks


@pytest.mark.parametrize("kernels", ["cpu", "reference"])
@pytest.mark.parametrize("degree, chunk", [(3, 7), (3, 50), (1, 16), (0, 1000)])
def test_parts_equal_the_concatenation(kernels: str, degree: int, chunk: int):
    sh = get_kernels(kernels).spherical_harmonics
    dirs, dc, rest, masks = inputs()
    weights = torch.randn(3, 50, 3, generator=torch.Generator().manual_seed(1))

    def run(apart: bool):
        d, a, b = (t.clone().requires_grad_() for t in (dirs, dc, rest))
        out = sh_from_parts(sh, degree, d, a, b, masks, chunk_rows=chunk) if apart else sh(degree, d, torch.cat((a[:, None], b), 1), masks=masks)
        (out * weights).sum().backward()
        return out.detach(), torch.zeros_like(d) if d.grad is None else d.grad, a.grad, b.grad  # degree 0: dirs unread

    for x, y in zip(run(True), run(False)):
        assert torch.equal(x, y)
    _, _, _, v_rest = run(True)
    assert v_rest.is_contiguous()  # the parameter's gradient as it is, no copy for AccumulateGrad


def test_bad_shapes_are_named():
    sh = get_kernels("cpu").spherical_harmonics
    dirs, dc, rest, masks = inputs()
    with pytest.raises(AssertionError, match=r"rest must be \[50, K - 1 >= 15, 3\]"):
        sh_from_parts(sh, 3, dirs, dc, rest[:, :8], masks)
    with pytest.raises(AssertionError, match=r"dc must be \[50, 3\]"):
        sh_from_parts(sh, 3, dirs, dc[:10], rest, masks)
