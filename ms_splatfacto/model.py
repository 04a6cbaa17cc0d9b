"""MsSplatfactoModel: splatfacto with a device-agnostic backend.

It subclasses nerfstudio's SplatfactoModel so the viewer, exporter and training loop keep working.
The Gaussian parameters are aggregate parameters striped over the members of `devices` (one layout
for all six), rendering and the loss run split over the members, and the code here stays plain
PyTorch: no loop over members, no transfers. What it replaces: parameter creation (splatfacto's has
a `.cuda()` and downloads LPIPS weights), rendering, the loss, the properties the exporter and viewer
read (ordinary tensors here) and state-dict loading (which re-stripes the loaded rows).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Type, Union

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback
from nerfstudio.models.splatfacto import (
    RGB2SH,
    SplatfactoModel,
    color_correct,
    SplatfactoModelConfig,
    get_viewmat,
    num_sh_bases,
    random_quat_tensor,
    resize_image,
)
from nerfstudio.utils.colors import get_color
from nerfstudio.utils.rich_utils import CONSOLE
from pytorch_msssim import SSIM
from torch import Tensor
from torchmetrics.functional.image.psnr import _psnr_compute
from torchmetrics.image import PeakSignalNoiseRatio

from ms_splatfacto.backend import DeviceSpecError
from ms_splatfacto.backend.aggregate import Members, is_aggregate, members, parameter, to_plain, world
from ms_splatfacto.backend.ops.loss import accumulation_dtype, band_rows, banded_l1_ssim, split_l1_ssim
from ms_splatfacto.backend.ops.render import rasterization
from ms_splatfacto.backend.ops.row_inputs import RowBands, read_bands, split_squared_error
from ms_splatfacto.image_rows import TensorRows
from ms_splatfacto.observability import member_callbacks
from ms_splatfacto.strategy import MsStrategy

GAUSSIAN_PARAMS = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")


@dataclass
class MsSplatfactoModelConfig(SplatfactoModelConfig):
    """Splatfacto whose Gaussians and splatting kernels run on the devices you name."""

    _target: Type = field(default_factory=lambda: MsSplatfactoModel)
    devices: str = "auto"
    """Members of the aggregate device holding the Gaussians: 'auto' (the first GPU, else the CPU), 'cpu', 'cpu:N' (N virtual CPU members), 'cuda' (every visible GPU), 'cuda:0,1', 'cuda:0*4' (four virtual members on GPU 0)."""
    storage: Literal["plain", "managed"] = "plain"
    """Where the rows of several GPUs live: 'plain' (each member's chunk from PyTorch's caching allocator on its GPU, crossing members by explicit copies) or 'managed' (one unified-memory allocation per tensor, striped over the GPUs)."""
    kernels: Literal["auto", "cpu", "cuda", "reference"] = "auto"
    """Splatting kernels: 'auto' picks those of the device; 'reference' is the slow pure-PyTorch specification."""
    tile_size: int = 16
    """Side of the square screen tiles the rasterizer sorts Gaussians into, in pixels."""
    max_gaussians: int = 0
    """Densification stops growing at this many Gaussians in total, keeping the highest-gradient candidates (0: no limit)."""
    memory_budget_bytes: int = 0
    """Bytes each member may use for a refinement's new Gaussians and copies; growth stops (with a log line) when the next would not fit (0: each member's free GPU memory or available RAM)."""


def lpips_weights_path() -> Path:
    """Where torchvision caches the AlexNet weights that torchmetrics' LPIPS loads."""
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(AlexNet_Weights.IMAGENET1K_V1.url).name


class MsSplatfactoModel(SplatfactoModel):
    """Gaussian splatting on any device; see MsSplatfactoModelConfig."""

    config: MsSplatfactoModelConfig

    def populate_modules(self) -> None:
        self.gauss_params = torch.nn.ParameterDict(
            {name: parameter(value, self.members) for name, value in self._initial_gaussians().items()}
        )
        self.camera_optimizer = self.config.camera_optimizer.setup(num_cameras=self.num_train_data, device="cpu")
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = SSIM(data_range=1.0, size_average=True, channel=3)
        self.lpips = self._lpips_if_available()
        self.step = 0
        self.crop_box = None
        # Splatfacto's fixed background for rendering when training uses random ones (viser's colour).
        self.background_color = (
            torch.tensor([0.1490, 0.1647, 0.2157])
            if self.config.background_color == "random"
            else get_color(self.config.background_color)
        )
        if self.config.use_bilateral_grid:
            from nerfstudio.model_components.lib_bilagrid import BilateralGrid

            self.bil_grids = BilateralGrid(self.num_train_data, *self.config.grid_shape)
        self.strategy = MsStrategy(
            prune_opa=self.config.cull_alpha_thresh,
            grow_grad2d=self.config.densify_grad_thresh,
            grow_scale3d=self.config.densify_size_thresh,
            grow_scale2d=self.config.split_screen_size,
            prune_scale3d=self.config.cull_scale_thresh,
            prune_scale2d=self.config.cull_screen_size,
            refine_scale2d_stop_iter=self.config.stop_screen_size_at,
            refine_start_iter=self.config.warmup_length,
            refine_stop_iter=self.config.stop_split_at,
            reset_every=self.config.reset_alpha_every * self.config.refine_every,
            refine_every=self.config.refine_every,
            pause_refine_after_reset=self.num_train_data + self.config.refine_every,
            absgrad=self.config.use_absgrad,
            revised_opacity=False,
            verbose=world.rank() == 0,  # gsplat prints its refinement lines; once per run, not per rank
            max_gaussians=self.config.max_gaussians,
            memory_budget_bytes=self.config.memory_budget_bytes,
        )
        self.strategy_state = self.strategy.initialize_state(scene_scale=1.0)

    @property
    def members(self) -> Members:
        """The aggregate device of the Gaussians. A spec this machine cannot meet (a GPU run's config
        opened on the CPU for viewing or export) falls back to the CPU; the trainer refuses it instead."""
        try:
            return members(self.config.devices, self.config.storage)
        except DeviceSpecError:
            return members("cpu")

    def _initial_gaussians(self) -> Dict[str, Tensor]:
        """Gaussians at the dataset's seed points (SfM), or uniformly random where it has none."""
        has_points = self.seed_points is not None and self.seed_points[0].shape[0] > 0
        if has_points and not self.config.random_init:
            means, rgb = self.seed_points[0].float(), self.seed_points[1]
        else:
            if not self.config.random_init:
                CONSOLE.log(
                    f"[yellow]The dataset has no 3D seed points; initialising {self.config.num_random} random "
                    "Gaussians instead (for COLMAP data, check sparse/0/points3D.bin).[/yellow]"
                )
            means, rgb = (torch.rand(self.config.num_random, 3) - 0.5) * self.config.random_scale, None
        num_points = means.shape[0]
        if num_points < 4:
            raise ValueError(f"Need at least 4 initial Gaussians to estimate their scales, got {num_points}.")
        distances, _ = self.k_nearest_sklearn(means, 3)
        avg_dist = torch.from_numpy(distances).mean(dim=-1, keepdim=True).clamp(min=1e-7)
        shs = torch.zeros(num_points, num_sh_bases(self.config.sh_degree), 3)
        if rgb is not None and rgb.shape[0] == num_points:
            colour = rgb.float() / 255
            shs[:, 0] = RGB2SH(colour) if self.config.sh_degree > 0 else torch.logit(colour, eps=1e-10)
        else:
            shs[:, 0] = torch.rand(num_points, 3)
        return {
            "means": means,
            "scales": torch.log(avg_dist.repeat(1, 3)),
            "quats": random_quat_tensor(num_points),
            "features_dc": shs[:, 0].contiguous(),
            "features_rest": shs[:, 1:].contiguous(),
            "opacities": torch.logit(0.1 * torch.ones(num_points, 1)),
        }

    # The exporter and the viewer read these as ordinary tensors (copies in global row order).
    means = property(lambda self: to_plain(self.gauss_params["means"].detach()))
    scales = property(lambda self: to_plain(self.gauss_params["scales"].detach()))
    quats = property(lambda self: to_plain(self.gauss_params["quats"].detach()))
    features_dc = property(lambda self: to_plain(self.gauss_params["features_dc"].detach()))
    features_rest = property(lambda self: to_plain(self.gauss_params["features_rest"].detach()))
    opacities = property(lambda self: to_plain(self.gauss_params["opacities"].detach()))
    num_points = property(lambda self: self.gauss_params["means"].shape[0])

    def load_state_dict(self, state_dict, **kwargs):  # type: ignore[override]
        """Splatfacto's load (which resizes to the checkpoint's count), then the rows striped over this
        model's members: checkpoints hold global row order, whatever member count wrote them. Gaussians
        that do not fit this model (missing, another SH degree) are refused with one line naming it."""
        from ms_splatfacto.checkpoints import check_gaussians

        check_gaussians(state_dict, {name: self.gauss_params[name].shape for name in GAUSSIAN_PARAMS}, self.config.sh_degree)
        super().load_state_dict(state_dict, **kwargs)
        for name in GAUSSIAN_PARAMS:
            self.gauss_params[name] = parameter(self.gauss_params[name].detach(), self.members)

    def get_training_callbacks(self, training_callback_attributes) -> List[TrainingCallback]:
        """Splatfacto's callbacks plus per-member figures (Gaussians, memory, bytes exchanged) as scalars,
        and a table at each refinement."""
        return super().get_training_callbacks(training_callback_attributes) + member_callbacks(self)

    def step_post_backward(self, step: int) -> None:
        """Splatfacto's, except after a step the trainer skipped for non-finite values (`skip_step`):
        its gradients must not enter the densification statistics."""
        if getattr(self, "skip_step", False):
            return
        super().step_post_backward(step)

    @staticmethod
    def _lpips_if_available() -> Optional[torch.nn.Module]:
        """LPIPS only where its AlexNet weights are already on disk: nothing is downloaded at run time."""
        weights = lpips_weights_path()
        if not weights.exists():
            CONSOLE.log(f"LPIPS left out of the metrics: its AlexNet weights are not at {weights} (no download).")
            return None
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(normalize=True)

    def get_image_metrics_and_images(
        self, outputs: Dict[str, Tensor], batch: Dict[str, Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, Tensor]]:
        if self.lpips is not None:
            return super().get_image_metrics_and_images(outputs, batch)
        self.lpips = _NanMetric()
        try:
            metrics, images = super().get_image_metrics_and_images(outputs, batch)
        finally:
            self.lpips = None
        return {k: v for k, v in metrics.items() if not k.endswith("lpips")}, images

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[Tensor, List]]:
        """Render one camera ([H, W, ...] outputs) or a batch of B cameras sharing one image size ([B, H,
        W, ...]): RGB, expected depth (outside training) and accumulation. In training (without the
        bilateral grid) they are [B * H, W, ...] aggregates over the members' pixel rows instead."""
        if self.training:
            assert camera.shape[0] == 1 or not self.config.use_bilateral_grid, "the bilateral grid takes one camera per step"
            camera_to_world = self.camera_optimizer.apply_to_camera(camera)
        else:
            camera_to_world = camera.camera_to_worlds

        params = {name: self.gauss_params[name] for name in self.gauss_params.keys()}
        if self.crop_box is not None and not self.training:
            inside = self.crop_box.within(params["means"].detach()).squeeze()  # on the members: no gather
            if inside.sum() == 0:
                return self.get_empty_outputs(int(camera.width.item()), int(camera.height.item()), self.background_color)
            params = {name: p[inside] for name, p in params.items()}

        scale_factor = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / scale_factor)
        Ks = camera.get_intrinsics_matrices().to(self.device)  # [B, 3, 3]
        sizes = torch.cat([camera.width.reshape(-1), camera.height.reshape(-1)]).tolist()  # one host read
        widths, heights = sizes[: len(sizes) // 2], sizes[len(sizes) // 2 :]
        assert len(set(widths)) == 1 and len(set(heights)) == 1, f"one image size per batch, got widths {widths}, heights {heights}"
        width, height = widths[0], heights[0]
        camera.rescale_output_resolution(scale_factor)
        self.last_size = (height, width)

        render_mode = "RGB+ED" if self.config.output_depth_during_training or not self.training else "RGB"
        if self.config.sh_degree > 0:  # the DC and higher orders apart: no [N, K, 3] copy (backend/ops/sh_parts.py)
            colors, sh_rest = params["features_dc"], params["features_rest"]
            sh_degree = min(self.step // self.config.sh_degree_interval, self.config.sh_degree)
        else:
            colors = torch.cat((params["features_dc"][:, None, :], params["features_rest"]), dim=1)
            colors, sh_rest, sh_degree = torch.sigmoid(colors).squeeze(1), None, None

        # Training images stay with the members that render them ([C * H, W, ...] over pixel rows); the
        # bilateral grid needs whole images.
        split = self.training and not self.config.use_bilateral_grid
        render, alpha, info = rasterization(
            means=params["means"],
            quats=params["quats"],
            scales=torch.exp(params["scales"]),
            opacities=torch.sigmoid(params["opacities"]).squeeze(-1),
            colors=colors,
            viewmats=eager_viewmat(camera_to_world).to(self.device),
            Ks=Ks,
            width=width,
            height=height,
            tile_size=self.config.tile_size,
            sh_degree=sh_degree,
            render_mode=render_mode,
            absgrad=self.strategy.absgrad,
            rasterize_mode=self.config.rasterize_mode,
            kernels=None if self.config.kernels == "auto" else self.config.kernels,
            split_images=split,
            sh_rest=sh_rest,
        )
        # The info lives through the backward: keep what densification reads, not the projected depths,
        # conics and opacities (20 B per Gaussian and camera at the step's memory peak).
        self.info = {k: v for k, v in info.items() if k not in ("depths", "conics", "opacities")}
        del info
        if self.training:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step, self.info)

        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
        if self.config.use_bilateral_grid and self.training and camera.metadata and "cam_idx" in camera.metadata:
            rgb = self._apply_bilateral_grid(to_plain(rgb).view(-1, height, width, 3), camera.metadata["cam_idx"], height, width)
        depth = None
        if render_mode == "RGB+ED":
            depth = render[..., 3:4]
            depth = torch.where(alpha > 0, depth, depth.detach().max())
        if not self.training:
            background = background.expand(height, width, 3)
        if split:  # already [C * H, W, ...]: the cameras' pixel rows, striped over the members
            return {"rgb": rgb, "depth": depth, "accumulation": alpha, "background": background}
        if rgb.shape[0] == 1:  # nerfstudio's single-camera contract: [H, W, ...]
            rgb, alpha, depth = rgb[0], alpha[0], None if depth is None else depth[0]
        return {"rgb": rgb, "depth": depth, "accumulation": alpha, "background": background}

    def _gt_images(self, batch: Dict[str, Tensor], background: Tensor) -> Tensor:
        """Ground truth as splatfacto prepares it ([H, W, 3]), image by image for a batch ([B, H, W, 3])."""
        images = batch["image"] if "image" in batch else batch["image_rows"].read(0, batch["image_rows"].rows)
        if images.dim() == 3:
            return self.composite_with_background(self.get_gt_img(images), background)
        return torch.stack([self.composite_with_background(self.get_gt_img(image), background) for image in images])

    def _gt_bands(self, outputs: Dict[str, Tensor], batch: Dict) -> Optional[RowBands]:
        """In split training, the ground truth as splatfacto prepares it, but as each member's band of rows
        (its rendered rows and SSIM halo) read on the member from the batch's row source (`image_rows`),
        or, for a batch without one (a camera batch's stacked [B, H, W, 3] images), sliced from the
        prepared images; read once per step (the metrics and the loss share it). None where the image is
        whole."""
        pred = outputs["rgb"]
        if not is_aggregate(pred) or not isinstance(batch, dict):
            return None
        source = batch.get("image_rows")
        background, scale = outputs["background"], self._get_downscale_factor()
        key = (source if source is not None else batch.get("image"), background, tuple(pred._layout.bounds), scale)
        cached = getattr(self, "_bands_cache", None)
        if cached is not None and cached[0][0] is key[0] and cached[0][1] is background and cached[0][2:] == key[2:]:
            return cached[1]
        if source is None:  # whole images on every rank: each member keeps its rows of each camera
            images = self._gt_images(batch, background)  # [H, W, 3] or [B, H, W, 3]
            bands = read_bands(pred, TensorRows(images.reshape(-1, *images.shape[-2:])), image_height=images.shape[-3])
            self._bands_cache = (key, bands)
            return bands

        def prepare(rows: Tensor) -> Tensor:  # splatfacto's get_gt_img, on the member's device
            rows = rows.float() / 255.0 if rows.dtype == torch.uint8 else rows
            if scale == 1 or rows.shape[0] == 0:  # a member without rows (the conv refuses an empty image)
                return rows[:, : rows.shape[1] // scale]
            return resize_image(rows, scale)

        bands = read_bands(pred, source, scale, prepare).map(
            lambda band, background: self.composite_with_background(band, background), shared={"background": background}
        )
        self._bands_cache = (key, bands)
        return bands

    def get_metrics_dict(self, outputs, batch) -> Dict[str, Tensor]:
        predicted_rgb, bands = outputs["rgb"], self._gt_bands(outputs, batch)
        if bands is not None:  # torchmetrics' PSNR from the members' squared-error partials (float64 on the CPU)
            wide = accumulation_dtype(self.members.device, predicted_rgb.dtype)
            sse = split_squared_error(predicted_rgb, bands, wide).to(predicted_rgb.dtype)
            numel = torch.tensor(math.prod(bands.shape), device=sse.device)
            metrics_dict = {"psnr": _psnr_compute(sse, numel, self.psnr.data_range.to(sse.device), base=self.psnr.base)}
        else:
            metrics_dict = {"psnr": self.psnr(predicted_rgb, self._gt_images(batch, outputs["background"]))}
        metrics_dict["gaussian_count"] = self.num_points
        if self.config.color_corrected_metrics:
            gt_rgb = self._gt_images(batch, outputs["background"])
            metrics_dict["cc_psnr"] = self.psnr(color_correct(predicted_rgb, gt_rgb), gt_rgb)
        self.camera_optimizer.get_metrics_dict(metrics_dict)
        return metrics_dict

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        """Splatfacto's losses, with L1 + SSIM computed in bands of tile rows, one per member; in split
        training (one camera or a batch's [B * H, W, 3] rows) the ground truth too stays in the members'
        bands."""
        pred_img, bands = outputs["rgb"], self._gt_bands(outputs, batch)
        gt_img = bands if bands is not None else self._gt_images(batch, outputs["background"])
        wide = accumulation_dtype(self.members.device, pred_img.dtype)  # float64 on the CPU: bit-equal members
        image_height = self.last_size[0] if is_aggregate(pred_img) else None  # a camera batch's [C * H, W, 3]
        mask = None
        if "mask" in batch:
            masks = batch["mask"] if batch["mask"].dim() == 4 else batch["mask"][None]
            mask = torch.stack([self._downscale_if_required(m) for m in masks]).to(self.device).reshape(tuple(gt_img.shape[:-1]) + (1,))
            assert mask.shape[:-1] == tuple(gt_img.shape[:-1]) == pred_img.shape[:-1]
            pred_img = pred_img * mask
        if bands is not None:  # each member's band: masked and widened where it lies
            if mask is None:
                gt_img = bands.map(lambda band: band.to(wide))
            else:
                gt_img = bands.map(lambda band, mask: (band * mask).to(wide), rowed={"mask": mask})
            main = split_l1_ssim(pred_img.to(wide), gt_img, self.config.ssim_lambda, image_height)
        else:
            gt_img = gt_img if mask is None else gt_img * mask
            if is_aggregate(pred_img):  # the members' own rows, with halo rows from the member below
                main = split_l1_ssim(pred_img.to(wide), gt_img.to(wide), self.config.ssim_lambda, image_height)
            else:
                bands_rows = band_rows(pred_img.shape[-3], len(self.members), self.config.tile_size)
                main = banded_l1_ssim(pred_img.to(wide), gt_img.to(wide), self.config.ssim_lambda, bands_rows)
        loss_dict = {"main_loss": main.to(pred_img.dtype)}
        if self.config.use_scale_regularization and self.step % 10 == 0:
            scale_exp = torch.exp(self.gauss_params["scales"])
            ratio = scale_exp.amax(dim=-1) / scale_exp.amin(dim=-1)
            loss_dict["scale_reg"] = 0.1 * (torch.clamp_min(ratio, self.config.max_gauss_ratio) - self.config.max_gauss_ratio).mean()
        else:
            loss_dict["scale_reg"] = torch.tensor(0.0, device=self.device)
        if self.training:
            self.camera_optimizer.get_loss_dict(loss_dict)
            if self.config.use_bilateral_grid:
                from nerfstudio.model_components.lib_bilagrid import total_variation_loss

                loss_dict["tv_loss"] = 10 * total_variation_loss(self.bil_grids.grids)
        return loss_dict


eager_viewmat = inspect.unwrap(get_viewmat)
"""nerfstudio's `get_viewmat` without its torch.compile: the viewer interrupts a stale render by raising
from a trace hook, which inside a compile comes back as InternalTorchDynamoError and kills the viewer's
render thread; four matrix ops gain nothing from compiling."""


class _NanMetric(torch.nn.Module):
    """Stands in for LPIPS inside splatfacto's metric code; its value is dropped afterwards."""

    def forward(self, *_: Tensor) -> Tensor:
        return torch.tensor(math.nan)
