"""`hydra/launcher=fused`: the launcher's knobs, registered where Hydra looks for launchers."""
from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.fmnist_fused_launcher.fused_launcher.FusedLauncher"
    # most jobs trained together as one stacked model; null = as many as fit (device memory decides)
    max_group: Optional[int] = 64


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf,
                             provider="fmnist_fused_launcher")
