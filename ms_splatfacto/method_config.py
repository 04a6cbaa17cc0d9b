"""The `ms-splatfacto` method registered with nerfstudio (entry point `nerfstudio.method_configs`)."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field

import tyro
from nerfstudio.configs.dataparser_configs import all_dataparsers
from nerfstudio.configs.method_configs import method_configs
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.plugins.types import MethodSpecification

from ms_splatfacto.dataparsers import AutoDataParserConfig
from ms_splatfacto.datamanager import MsDatamanagerConfig
from ms_splatfacto.model import MsSplatfactoModelConfig
from ms_splatfacto.trainer import MsTrainerConfig, restart_with_passive_waits

DataParsers = tyro.conf.OmitSubcommandPrefixes[
    tyro.extras.subcommand_type_from_defaults(
        {"auto": AutoDataParserConfig(),
         **{name: c for name, c in all_dataparsers.items() if not isinstance(c, AutoDataParserConfig)}},
        prefix_names=False,
    )
]
"""nerfstudio's dataparser subcommands plus `auto` (also there when the `auto` entry point is installed)."""


@dataclass
class MsSplatfactoDatamanagerConfig(MsDatamanagerConfig):
    """The method's datamanager: with no dataparser subcommand, `--data` is loaded by the `auto` dataparser."""

    dataparser: DataParsers = field(default_factory=AutoDataParserConfig)
    """How --data is read: `auto` (default) recognises transforms.json or a COLMAP model; or name the parser."""


GAUSSIAN_PARAMETERS = ("means", "features_dc", "features_rest", "opacities", "scales", "quats")


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """splatfacto's Adam for the Gaussian parameters, run as torch's one-kernel (fused) Adam."""

    fused: bool = True
    """torch's fused Adam: no temporaries of the parameter's size (torch's per-op Adam makes two, the largest
    transient of a CPU step at SH 3: 1,412 against 1,333 B per Gaussian at 1M) and one pass over the rows.
    Member counts still change no bit. False: torch's per-op Adam."""


def ms_splatfacto_trainer_config() -> MsTrainerConfig:
    """Splatfacto's training recipe (datamanager, schedule, optimizers) with our model, trainer and `auto` data."""
    splatfacto = method_configs["splatfacto"]
    shared = {name: copy.deepcopy(getattr(splatfacto, name)) for name in splatfacto.__dataclass_fields__ if name != "_target"}
    config = MsTrainerConfig(**shared)
    config.method_name = "ms-splatfacto"
    config.pipeline.model = MsSplatfactoModelConfig()
    for name in GAUSSIAN_PARAMETERS:
        adam = config.optimizers[name]["optimizer"]
        config.optimizers[name]["optimizer"] = FusedAdamOptimizerConfig(
            **{k: getattr(adam, k) for k in adam.__dataclass_fields__ if k != "_target"})
    datamanager = config.pipeline.datamanager
    config.pipeline.datamanager = MsSplatfactoDatamanagerConfig(
        **{name: getattr(datamanager, name) for name in datamanager.__dataclass_fields__ if name not in ("_target", "dataparser")}
    )
    return config


ms_splatfacto = MethodSpecification(
    config=ms_splatfacto_trainer_config(),
    description="Splatfacto on an aggregate device: several GPUs as one (or the CPU).",
)

restart_with_passive_waits(sys.argv)  # `ns-train ms-splatfacto` only: see there
