"""What a training step holds until its backward (issue 14, memory per Gaussian): the pieces removed from
the step's peak must change no value and no gradient, and must really be gone."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from ms_splatfacto.backend.aggregate import aggregate, parameter, to_plain
from ms_splatfacto.backend.ops.per_member import per_member
from ms_splatfacto.backend.ops.sh_parts import offset_clamp_min
from tests.test_model_step import camera_and_image, make_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_offset_clamp_equals_autograds_clamp_bit_for_bit(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g, dtype=dtype)
    x[:7] = -0.5  # exactly at the clamp: autograd's clamp_min passes no gradient there
    x[7:9] = torch.tensor(-0.5, dtype=dtype).nextafter(torch.tensor(0.0, dtype=dtype))  # just above: it passes
    x[9] = float("nan")
    v = torch.randn(4000, 3, generator=g, dtype=dtype)
    v[::5] = -0.0
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = offset_clamp_min(ours, 0.5), torch.clamp_min(theirs + 0.5, 0.0)
    out_ours.backward(v)
    out_theirs.backward(v)
    assert torch.equal(out_ours.nan_to_num(7.0), out_theirs.nan_to_num(7.0))
    assert out_ours[9].isnan().all() and torch.equal(out_ours.signbit(), out_theirs.signbit())
    assert torch.equal(ours.grad, theirs.grad) and torch.equal(ours.grad.signbit(), theirs.grad.signbit())
    assert (ours.grad[:7] == 0).all() and torch.equal(ours.grad[7:9], v[7:9]) and (ours.grad[9] == 0).all()


def test_per_member_keeps_the_graph_not_the_outputs():
    """Where the layout fuses, each member's outputs are copied into the whole; the member's own output
    tensors are then freed (their graph ends are kept), and the backward still gives the gradients."""
    x = torch.randn(50, 3, dtype=torch.float64)
    a = parameter(x.clone(), "cpu:3")
    made = []

    def fn(d, rows):
        out = (rows * rows).transpose(0, 1).exp().transpose(0, 1)  # [n, 3] through a non-trivial graph
        made.append(weakref.ref(out))
        return (out,)

    (y,) = per_member(fn, [a])
    gc.collect()
    assert len(made) == 3 and all(ref() is None for ref in made), "a member's output outlived the forward"
    weights = torch.randn(50, 3, dtype=torch.float64)
    (y * aggregate(weights, "cpu:3")).sum().backward()
    assert torch.equal(to_plain(y), torch.exp(x * x))
    torch.testing.assert_close(to_plain(a.grad), weights * torch.exp(x * x) * 2 * x, rtol=1e-14, atol=0)


@pytest.mark.parametrize("spec", ["cpu", "cpu:3"])
def test_after_the_backward_the_step_keeps_no_intersections_and_no_projected_fields(spec: str):
    model = make_model(spec)
    camera, batch = camera_and_image()
    model.step_cb(SimpleNamespace(optimizers={}), 0)
    outputs = model.get_outputs(camera)
    plan = model.info["tile_plan"]
    assert not {"depths", "conics", "opacities"} & set(model.info), "the model kept fields densification does not read"
    works = [w for w in plan.work if w is not None]
    assert works and all(w.isect_ids is not None and w.flatten_ids.numel() for w in works) and plan.serve
    sum(model.get_loss_dict(outputs, batch).values()).backward()
    assert all(w.isect_ids is None and w.offsets is None and w.flatten_ids is None for w in works) and plan.serve == {}
    assert sum(w.n_records for w in works) > 0 and all(w.sources for w in works), "which records were read stays"
    assert model.info["means2d"].grad is not None and (to_plain(model.info["radii"]) > 0).any()
