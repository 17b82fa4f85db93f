"""Our launchers' knobs, registered where Hydra looks for launchers: `fused`, `fmnist_slurm` (what
hydra/launcher=slurm uses), `joblib`, `submitit_local` and `submitit_slurm` (those plugins' knobs, our launcher
classes)."""
from dataclasses import dataclass
from typing import Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.fmnist_launchers.fused_launcher.FusedLauncher"
    # most jobs trained together as one stacked model; null = as many as fit (device memory decides)
    max_group: Optional[int] = 64
    # groups trained at once, each in a process of its own with cores/n_jobs torch threads; null = one per CPU core
    # when the sweep repays the workers' start (1 on a GPU); 1 = one group after another in this process
    n_jobs: Optional[int] = None


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf,
                             provider="fmnist_launchers")


try:  # hydra/launcher=slurm (conf/hydra/launcher/slurm.yaml) builds on hydra-submitit-launcher, when installed
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    @dataclass
    class FmnistSlurmConf(SlurmQueueConf):
        _target_: str = "hydra_plugins.fmnist_launchers.slurm_launcher.FmnistSlurmLauncher"
        # jobs that can share a training step go as one array task, trained as one stacked model (as `fused`)
        fuse: bool = True
        max_group: Optional[int] = 64

    ConfigStore.instance().store(group="hydra/launcher", name="fmnist_slurm", node=FmnistSlurmConf,
                                 provider="fmnist_launchers")
except ImportError:
    pass


def store_overrides() -> None:
    """hydra/launcher=joblib and hydra/launcher=submitit_local: those plugins' knobs, run by our launchers
    (joblib_launcher.py; submitit_local_launcher.py, which adds fuse/max_group), stored under their names over
    their own entries. Hydra's plugin scan runs every plugin module again, in sys.path order, so theirs may land
    after ours: StoreOverrides stores ours again once the scan is done. (A conf/hydra/launcher/joblib.yaml would
    instead be merged onto their schema, with a deprecation warning each run.)"""
    cs = ConfigStore.instance()
    try:
        from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf

        @dataclass
        class FmnistJoblibConf(JobLibLauncherConf):
            _target_: str = "hydra_plugins.fmnist_launchers.joblib_launcher.FmnistJoblibLauncher"

        cs.store(group="hydra/launcher", name="joblib", node=FmnistJoblibConf, provider="fmnist_launchers")
    except ImportError:
        pass
    try:
        from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf

        @dataclass
        class FmnistLocalConf(LocalQueueConf):
            _target_: str = "hydra_plugins.fmnist_launchers.submitit_local_launcher.FmnistLocalLauncher"
            # jobs that can share a training step go as one task, trained as one stacked model (as `fused`)
            fuse: bool = True
            max_group: Optional[int] = 64

        cs.store(group="hydra/launcher", name="submitit_local", node=FmnistLocalConf,
                 provider="fmnist_launchers")
        # the plugin's SLURM name, as Hydra's docs spell it: our watched launcher (hydra/launcher=slurm) with the
        # plugin's defaults, not a launcher that waits forever on a cancelled job where sacct does not run
        cs.store(group="hydra/launcher", name="submitit_slurm", node=FmnistSlurmConf, provider="fmnist_launchers")
    except ImportError:
        pass


store_overrides()


class StoreOverrides(SearchPathPlugin):
    """Hydra asks its search-path plugins for their paths after the plugin scan and before it composes a config:
    the moment to store our joblib / submitit entries over the ones the scan may have put back."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        store_overrides()
