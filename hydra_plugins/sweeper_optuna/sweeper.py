"""The Hydra Sweeper class (Hydra finds it by scanning this module)."""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class OptunaSweeper(Sweeper):
    """Instantiated by Hydra from `hydra.sweeper` (see config.OptunaSweeperConf)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = {
            key: OmegaConf.to_container(value, resolve=True)
            if OmegaConf.is_config(value)
            else value
            for key, value in settings.items()
        }
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from hydra_plugins.sweeper_optuna._errors import StudyError
        from hydra_plugins.sweeper_optuna._run import run_study
        from hydra_plugins.sweeper_optuna.config import OptunaSweeperConf

        assert self.config is not None, "Hydra calls setup() before sweep()"
        settings = OptunaSweeperConf(**self.settings)
        try:
            return run_study(settings, self.config, self.launcher, arguments)
        except StudyError as error:
            # Exit here: Hydra would add a line about HYDRA_FULL_ERROR to any exception.
            print(error, file=sys.stderr)
            sys.exit(2)
