"""The viewer's and evaluation's render (`get_outputs_for_camera`) runs on the members: with a crop box
too, no parameter is gathered (the model's ordinary-tensor properties are not read) and the image
equals one member's."""

from __future__ import annotations

import pytest
import torch
from nerfstudio.data.scene_box import OrientedBox

from ms_splatfacto.backend.aggregate import fallback_counts, reset_fallback_counts
from ms_splatfacto.model import GAUSSIAN_PARAMS, MsSplatfactoModel
from tests.test_model_step import camera_and_image, make_model


def render(spec: str, box, monkeypatch) -> torch.Tensor:
    model = make_model(spec)
    model.eval()
    for name in GAUSSIAN_PARAMS:  # reading a property would gather the whole parameter on one device
        monkeypatch.setattr(MsSplatfactoModel, name, property(lambda self, n=name: pytest.fail(f"{n} was gathered")))
    camera, _ = camera_and_image()
    reset_fallback_counts()
    with torch.no_grad():
        out = model.get_outputs_for_camera(camera, obb_box=box)
    assert fallback_counts() == {}
    monkeypatch.undo()
    return out["rgb"]


@pytest.mark.parametrize("crop", [False, True])
def test_viewer_render_on_members_equals_one_member_without_gathering(crop: bool, monkeypatch):
    box = OrientedBox(R=torch.eye(3), T=torch.tensor([0.0, 0.0, -5.0]), S=torch.tensor([2.0, 1.5, 2.0])) if crop else None
    one = render("cpu", box, monkeypatch)
    four = render("cpu:4", box, monkeypatch)
    assert one.shape == (48, 64, 3)
    torch.testing.assert_close(four, one, rtol=0, atol=0)
    if crop:  # the box keeps some Gaussians and drops others: the picture changes
        uncropped = render("cpu", None, monkeypatch)
        assert not torch.equal(one, uncropped) and one.abs().sum() > 0
