"""View-dependent colours from SH coefficients kept as splatfacto keeps them: the DC term [N, 3] and the
higher orders [N, K-1, 3], two parameters.

Concatenating them into the [N, K, 3] tensor the kernels take costs, at SH degree 3, 192 B per Gaussian
held through the forward, 192 B more for its gradient in the backward, and 180 B for the copy autograd
makes of the higher orders' gradient (a non-contiguous slice of it): the largest transients of a step
after Adam's. Here the kernel runs on row chunks of that concatenation (at most `chunk_rows` rows at a
time), and the backward recomputes each chunk and writes the two gradients straight into their own
tensors. SH is computed row by row, so the colours and gradients are the unchunked kernel's, bit for bit.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

CHUNK_ROWS = 1 << 16
"""Rows per chunk: 12.6 MB of [rows, 16, 3] float32 coefficients at SH degree 3."""

ShKernel = Callable[[int, Tensor, Tensor, Optional[Tensor]], Tensor]
"""A kernel set's `spherical_harmonics(degree, dirs [C, n, 3], coeffs [n, K, 3], masks [C, n])` -> [C, n, 3]."""
ShBackward = Callable[[int, Tensor, Tensor, Optional[Tensor], Tensor], Tuple[Tensor, Tensor]]
"""A kernel set's `spherical_harmonics_backward(degree, dirs, coeffs, masks, v_colors)` -> (v_dirs, v_coeffs),
where it has one: the backward then calls it per chunk instead of recomputing the chunk under autograd."""


def _spans(n: int, chunk: int):
    return ((a, min(n, a + chunk)) for a in range(0, n, chunk))


class _ShFromParts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: ShKernel, kernel_bwd: Optional[ShBackward], degree: int, chunk: int, means: Tensor, campos: Tensor,
                dc: Tensor, rest: Tensor, masks: Optional[Tensor]) -> Tensor:
        out = means.new_empty(campos.shape[0], dc.shape[0], 3)
        for a, b in _spans(dc.shape[0], chunk):
            coeffs = torch.cat((dc[a:b, None], rest[a:b]), dim=1)
            out[:, a:b] = kernel(degree, _dirs(means[a:b], campos), coeffs, masks=None if masks is None else masks[:, a:b])
        ctx.save_for_backward(means, campos, dc, rest, masks)
        ctx.kernel, ctx.kernel_bwd, ctx.degree, ctx.chunk = kernel, kernel_bwd, degree, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, v_out: Tensor):  # [C, n, 3]
        means, campos, dc, rest, masks = ctx.saved_tensors
        want_means, want_campos = ctx.needs_input_grad[5:7]
        want_dirs = want_means or want_campos
        v_means = torch.empty_like(means) if want_means else None
        v_campos = torch.zeros_like(campos) if want_campos else None
        v_dc, v_rest = torch.empty_like(dc), torch.empty_like(rest)
        for a, b in _spans(dc.shape[0], ctx.chunk):
            chunk_masks = None if masks is None else masks[:, a:b]
            if ctx.kernel_bwd is not None:
                d = _dirs(means[a:b], campos)
                coeffs = torch.cat((dc[a:b, None], rest[a:b]), dim=1)
                v_dirs, v_coeffs = ctx.kernel_bwd(ctx.degree, d, coeffs, chunk_masks, v_out[:, a:b])
                grads = (v_dirs, v_coeffs) if want_dirs else (v_coeffs,)
            else:
                with torch.enable_grad():
                    d = _dirs(means[a:b].detach(), campos.detach()).requires_grad_(want_dirs)
                    coeffs = torch.cat((dc[a:b, None].detach(), rest[a:b].detach()), dim=1).requires_grad_()
                    out = ctx.kernel(ctx.degree, d, coeffs, masks=chunk_masks)
                grads = torch.autograd.grad(out, (d, coeffs) if want_dirs else (coeffs,), v_out[:, a:b], allow_unused=True)
            if want_dirs:  # dirs = means - campos: what autograd's broadcast subtraction hands each
                v_d = grads[0] if grads[0] is not None else torch.zeros_like(d)  # degree 0 may not read them
                if want_means:
                    v_means[a:b] = v_d.sum(0)
                if want_campos:
                    v_campos -= v_d.sum(1)
            v_dc[a:b], v_rest[a:b] = grads[-1][:, 0], grads[-1][:, 1:]
        return None, None, None, None, v_means, v_campos, v_dc, v_rest, None


def _dirs(means: Tensor, campos: Tensor) -> Tensor:  # means [k, 3], campos [C, 3] -> [C, k, 3]
    return means[None, :, :] - campos[:, None, :]


def sh_from_parts(
    kernel: ShKernel,
    degree: int,
    means: Tensor,  # [n, 3]
    campos: Tensor,  # [C, 3] camera centres
    dc: Tensor,  # [n, 3]
    rest: Tensor,  # [n, K - 1, 3], K >= (degree + 1) ** 2
    masks: Optional[Tensor] = None,  # [C, n] bool
    chunk_rows: int = CHUNK_ROWS,
    kernel_bwd: Optional[ShBackward] = None,
) -> Tensor:  # [C, n, 3]
    """`kernel(degree, means[None] - campos[:, None], cat((dc[:, None], rest), 1), masks)` without the
    [n, K, 3] concatenation (see the module docstring) nor the [C, n, 3] view directions, which are made
    and differentiated chunk by chunk (12 B per Gaussian and camera less at the backward's peak);
    differentiable in means, campos, dc and rest."""
    C, n = campos.shape[0], means.shape[0]
    assert means.shape == (n, 3) and campos.shape == (C, 3), f"means must be [n, 3] and campos [C, 3], got {tuple(means.shape)}, {tuple(campos.shape)}"
    assert dc.shape == (n, 3), f"dc must be [{n}, 3], got {tuple(dc.shape)}"
    assert rest.dim() == 3 and rest.shape[0] == n and rest.shape[2] == 3 and rest.shape[1] + 1 >= (degree + 1) ** 2, (
        f"rest must be [{n}, K - 1 >= {(degree + 1) ** 2 - 1}, 3] for degree {degree}, got {tuple(rest.shape)}"
    )
    assert masks is None or masks.shape == (C, n), f"masks must be [{C}, {n}], got {tuple(masks.shape)}"
    assert chunk_rows >= 1, f"chunk_rows must be positive, got {chunk_rows}"
    return _ShFromParts.apply(kernel, kernel_bwd, int(degree), int(chunk_rows), means, campos, dc, rest, masks)


class _OffsetClampMin(torch.autograd.Function):
    """clamp_min(x + offset, 0) keeping a bool mask for backward instead of autograd's saved float input."""

    @staticmethod
    def forward(ctx, x: Tensor, offset: float) -> Tensor:
        shifted = x + offset
        keep = shifted > 0  # autograd's clamp_min passes the gradient where its input > min (not at it, not NaN)
        ctx.save_for_backward(keep)
        return shifted.clamp_min_(0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, v_out: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, v_out, 0.0), None


def offset_clamp_min(x: Tensor, offset: float) -> Tensor:  # x: [...] float
    """`torch.clamp_min(x + offset, 0.0)`, the same values and gradients bit for bit, holding 1 byte per
    element until backward where autograd holds the 4-byte input (12 B per Gaussian and camera for
    SH colours)."""
    return _OffsetClampMin.apply(x, float(offset))
