"""Which aggregate rows are model state ("persistent", see aggregate/storage.py): what the managed mode
puts in managed memory while transients stay on the caching allocator. Checked on CPU members, where
the rule is the same and only the memory behind it differs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ms_splatfacto.backend.aggregate import aggregate, parameter, to_plain
from ms_splatfacto.backend.aggregate.storage import is_persistent
from ms_splatfacto.model import GAUSSIAN_PARAMS
from tests.test_model_step import camera_and_image, make_model


@pytest.mark.parametrize("spec", ["cpu", "cpu:3"])
def test_state_is_persistent_and_computations_are_not(spec: str):
    p = parameter(torch.randn(40, 3), spec)
    assert is_persistent(p) and is_persistent(p.detach())
    assert not is_persistent(torch.exp(p.detach())) and not is_persistent(p.detach() * 2)
    assert not is_persistent(aggregate(torch.randn(40, 3), spec, persistent=False))
    assert is_persistent(torch.zeros_like(p)) and is_persistent(p.detach().clone())
    assert is_persistent(p.detach().new_zeros(40))  # statistics made after a parameter
    index = torch.tensor([5, 1, 1, 39, 0])
    assert is_persistent(p.detach()[index]) and is_persistent(p.detach()[torch.arange(40) % 3 == 0])
    assert not is_persistent(torch.cat([p.detach(), p.detach()]))  # e.g. the SH colours of a step
    torch.testing.assert_close(to_plain(p.detach()[index]), to_plain(p.detach())[index])


def test_a_training_run_keeps_parameters_and_moments_persistent_through_refinement():
    model = make_model("cpu:4")
    camera, batch = camera_and_image()
    optimizers = {n: torch.optim.Adam(ps, lr=1e-3) for n, ps in model.get_gaussian_param_groups().items()}
    counts = []
    for step in range(5):  # a refinement at step 4 grows, prunes, re-orders and re-stripes
        model.step_cb(SimpleNamespace(optimizers=optimizers), step)
        outputs = model.get_outputs(camera)
        loss = sum(model.get_loss_dict(outputs, batch).values())
        for o in optimizers.values():
            o.zero_grad()
        loss.backward()
        for o in optimizers.values():
            o.step()
        grads_persistent = [is_persistent(p.grad) for p in model.gauss_params.values()]
        model.step_post_backward(step)
        counts.append(model.num_points)
    assert counts[-1] != counts[0], "the refinement should have changed the model"
    for name in GAUSSIAN_PARAMS:
        param = model.gauss_params[name]
        assert is_persistent(param), name
        state = optimizers[name].state[param]
        assert is_persistent(state["exp_avg"]) and is_persistent(state["exp_avg_sq"]), name
    assert not any(grads_persistent) and not is_persistent(outputs["rgb"])
