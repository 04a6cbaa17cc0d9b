"""The `ms-splatfacto` method registered with nerfstudio (entry point `nerfstudio.method_configs`)."""

from __future__ import annotations

import copy

from nerfstudio.configs.method_configs import method_configs
from nerfstudio.plugins.types import MethodSpecification

from ms_splatfacto.datamanager import MsDatamanagerConfig
from ms_splatfacto.model import MsSplatfactoModelConfig
from ms_splatfacto.trainer import MsTrainerConfig


def ms_splatfacto_trainer_config() -> MsTrainerConfig:
    """Splatfacto's training recipe (datamanager, schedule, optimizers) with our model and trainer."""
    splatfacto = method_configs["splatfacto"]
    shared = {name: copy.deepcopy(getattr(splatfacto, name)) for name in splatfacto.__dataclass_fields__ if name != "_target"}
    config = MsTrainerConfig(**shared)
    config.method_name = "ms-splatfacto"
    config.pipeline.model = MsSplatfactoModelConfig()
    datamanager = config.pipeline.datamanager
    config.pipeline.datamanager = MsDatamanagerConfig(
        **{name: getattr(datamanager, name) for name in datamanager.__dataclass_fields__ if name != "_target"}
    )
    return config


ms_splatfacto = MethodSpecification(
    config=ms_splatfacto_trainer_config(),
    description="Splatfacto on an aggregate device: several GPUs as one (or the CPU).",
)
