"""The sweeper's config, `hydra/sweeper=optuna` (the presets in conf/hydra/sweeper extend it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")


@dataclass
class OptunaSweeperConf:
    """hydra.sweeper: the schema Hydra composes, and the settings the sweep runs with."""

    _target_: str = "hydra_plugins.sweeper_optuna.sweeper.OptunaSweeper"

    # One of SAMPLERS. grid needs every parameter discrete (choice or range).
    sampler: str = "tpe"
    # Trials the study runs to the end (COMPLETE or FAIL), counting those of earlier runs of the
    # same study and those of every worker sharing it (RUNNING ones too); an interrupted trial
    # does not count, so a resumed study still gets n_trials.
    n_trials: int = 20
    # null: <experiment_name>-<digest of the study's definition>, the same for the same command.
    study_name: str | None = None
    # null: optuna.db (SQLite) in the deepest folder of hydra.sweep.dir that is the same on every
    # run, so the same command resumes: multirun/optuna.db for Hydra's timestamped default,
    # <hydra.sweep.dir>/optuna.db for a sweep dir without ${now:...}.
    # Any SQLAlchemy URL; postgresql://user@host:5432/db for workers on several hosts (needs
    # `pip install 'sweeper[cluster]'`; docs/cluster.md).
    storage: str | None = None
    seed: int | None = None
    # Trials asked at a time and launched together; null: the launcher's n_jobs (joblib's -1:
    # one per CPU), else 1. Each worker asks its own.
    n_jobs: int | None = None
    # Seconds between a running trial's heartbeats. A trial whose heartbeat stops for
    # grace_period seconds (null: twice the interval) is FAILed by the next worker to look, and
    # queued again. A worker on the same machine as the dead one need not wait for that.
    heartbeat_interval: int = 60
    grace_period: int | None = None
    # How often a trial cut short (its worker killed, or Ctrl-C) runs again with the same
    # parameters; a configuration that kills its worker every time stops there, FAIL.
    max_retry: int = 1
    # "metric:direction" (max/maximize, min/minimize); several make a multi-objective study.
    objectives: list[str] = field(default_factory=lambda: ["accuracy:maximize"])
    # "metric <= number" or "metric >= number", on the metrics a trial returns. They reach Optuna
    # through Trial.set_constraint (Optuna 5 deprecates the samplers' constraints_func for it),
    # so samplers learn from them and only feasible trials can be best.
    constraints: list[str] = field(default_factory=list)
    # key: Hydra sweep syntax, as Hydra's Optuna sweeper reads it: interval(0.1, 1.0),
    # int(interval(1, 8)), range(1, 5), choice(true, false), tag(log, interval(...)).
    params: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        """The settings' own ranges, once, before a study is opened (one line each)."""
        from hydra_plugins.sweeper_optuna._errors import StudyError

        if self.sampler not in SAMPLERS:
            raise StudyError(f"unknown sampler '{self.sampler}' (allowed: {', '.join(SAMPLERS)})")
        least = {"n_trials": 1, "heartbeat_interval": 1, "max_retry": 0, "n_jobs": 1}
        least["grace_period"] = self.heartbeat_interval + 1
        for key, minimum in least.items():
            value = getattr(self, key)
            if value is not None and value < minimum:
                raise StudyError(
                    f"invalid value for 'hydra.sweeper.{key}': {value} "
                    f"(allowed: an integer >= {minimum})"
                )


ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="sweeper"
)


def register_plugin() -> None:
    """Register the sweeper class with Hydra directly, for installs whose hydra_plugins
    namespace Hydra's plugin scan cannot list (setuptools' editable installs)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.sweeper_optuna.sweeper import OptunaSweeper

    Plugins.instance().register(OptunaSweeper)
