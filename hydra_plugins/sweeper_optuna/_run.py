"""The ask-and-tell loop: one Hydra job per Optuna trial, resumable, linked to MLflow."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.sweeper_optuna._definition import (
    Constraint,
    Objective,
    Outcome,
    default_study_name,
    evaluate,
    make_sampler,
    parse_constraint,
    parse_objectives,
)
from hydra_plugins.sweeper_optuna._errors import StudyError
from hydra_plugins.sweeper_optuna._space import SearchSpace, parse_space
from hydra_plugins.sweeper_optuna._tracking import RUN_ATTR, StudyTracking
from hydra_plugins.sweeper_optuna.config import SAMPLERS

# Study user attrs: trial numbers cut short by Ctrl-C or a crash (they do not count toward
# n_trials), and the objectives the study was created with (a resume must not change them).
INTERRUPTED_ATTR = "interrupted_trials"
OBJECTIVES_ATTR = "objectives"
RETRY_ATTR = "retry_of"


@dataclass(frozen=True)
class Settings:
    """hydra.sweeper, as plain values."""

    sampler: str
    n_trials: int
    study_name: str | None
    storage: str | None
    seed: int | None
    objectives: list[str]
    constraints: list[str]
    params: dict[str, Any]


@dataclass(frozen=True)
class StudyPlan:
    space: SearchSpace
    objectives: list[Objective]
    constraints: list[Constraint]
    name: str
    storage: str
    n_trials: int


def study_folder(config: DictConfig) -> Path:
    """Where the default storage goes: the deepest folder of hydra.sweep.dir that is the same on
    every run of a command. Hydra's default sweep dir ends in ${now:...} folders, new on each
    run, and rerunning the command must find the study again (`multirun/optuna.db` then, beside
    the sweeps); a sweep dir without ${now:...} holds its study itself."""
    raw = Path(str(OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"])).parts
    resolved = Path(str(config.hydra.sweep.dir)).parts
    stable = 0
    while stable < len(raw) and "${now:" not in raw[stable]:
        stable += 1
    return Path(*resolved[:stable]).resolve() if stable else Path.cwd()


def plan_study(settings: Settings, config: DictConfig, arguments: list[str]) -> StudyPlan:
    """Everything checked before a study is opened or a model loaded (errors are one line)."""
    if settings.sampler not in SAMPLERS:
        raise StudyError(f"unknown sampler '{settings.sampler}' (allowed: {', '.join(SAMPLERS)})")
    if settings.n_trials < 1:
        raise StudyError(
            f"invalid value for 'hydra.sweeper.n_trials': {settings.n_trials} "
            "(allowed: an integer >= 1)"
        )
    space = parse_space(settings.params, arguments, settings.sampler)
    objectives = parse_objectives(settings.objectives)
    constraints = [parse_constraint(text) for text in settings.constraints]
    name = settings.study_name or default_study_name(
        str(config.experiment_name), settings.sampler, space, objectives, constraints
    )
    storage = settings.storage or f"sqlite:///{study_folder(config) / 'optuna.db'}"
    n_trials = settings.n_trials
    if settings.sampler == "grid":
        n_trials = min(n_trials, space.grid_size)
    return StudyPlan(space, objectives, constraints, name, storage, n_trials)


def _open_study(plan: StudyPlan, settings: Settings) -> optuna.Study:
    sampler = make_sampler(settings.sampler, settings.seed, plan.space)
    directions = [o.direction for o in plan.objectives]
    study = optuna.create_study(
        storage=plan.storage,
        study_name=plan.name,
        sampler=sampler,
        directions=directions,
        load_if_exists=True,
    )
    created_with = study.user_attrs.get(OBJECTIVES_ATTR)
    wanted = [str(o) for o in plan.objectives]
    if created_with is None:
        study.set_user_attr(OBJECTIVES_ATTR, wanted)
    elif created_with != wanted:
        raise StudyError(
            f"study '{plan.name}' in {plan.storage} optimises {', '.join(created_with)}, not "
            f"{', '.join(wanted)}; set another hydra.sweeper.study_name"
        )
    return study


def _counted(study: optuna.Study) -> int:
    """Trials that ran to the end, COMPLETE or FAIL; interrupted ones are not counted."""
    interrupted = set(study.user_attrs.get(INTERRUPTED_ATTR, []))
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    return sum(t.number not in interrupted for t in finished)


def _mark_interrupted(study: optuna.Study, trial: FrozenTrial, tracking: StudyTracking) -> None:
    """FAIL a trial cut short; its configuration is queued to run first on resume (once: a
    configuration that kills the process twice is not tried a third time)."""
    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    study.set_user_attr(
        INTERRUPTED_ATTR, [*study.user_attrs.get(INTERRUPTED_ATTR, []), trial.number]
    )
    tracking.link(study.study_name, trial.number, "FAIL", None)
    if RETRY_ATTR not in trial.user_attrs:
        study.enqueue_trial(trial.params, user_attrs={RETRY_ATTR: trial.number})


def _outcome(ret: JobReturn, plan: StudyPlan) -> Outcome:
    if ret.status != JobStatus.COMPLETED:
        # The task raised past its own error handling: the launcher kept the exception.
        error = ret._return_value
        return Outcome(None, failure=f"{type(error).__name__}: {error}")
    return evaluate(ret.return_value, plan.objectives, plan.constraints)


def _describe(number: int, state: str, outcome: Outcome, plan: StudyPlan) -> str:
    if outcome.values is None:
        return f"[study] trial {number} {state}: {outcome.failure}"
    values = ", ".join(
        f"{o.metric}={v:.4g}" for o, v in zip(plan.objectives, outcome.values, strict=True)
    )
    if not plan.constraints:
        return f"[study] trial {number} {state}: {values}"
    verdict = "feasible" if outcome.feasible else "infeasible"
    return f"[study] trial {number} {state}: {values} ({verdict})"


def _run_trial(
    study: optuna.Study, plan: StudyPlan, launcher: Launcher, tracking: StudyTracking
) -> JobReturn:
    trial = study.ask(plan.space.distributions)
    # job.num = trial number: the trial's output folder and its run's hydra_job_num tag.
    (ret,) = launcher.launch([plan.space.overrides(trial.params)], trial.number)
    try:
        outcome = _outcome(ret, plan)
    except StudyError:
        study.tell(trial, state=TrialState.FAIL)
        raise
    state = "COMPLETE" if outcome.values is not None else "FAIL"
    run_id = tracking.link(study.study_name, trial.number, state, outcome.feasible)
    if run_id:
        trial.set_user_attr(RUN_ATTR, run_id)
    if outcome.failure:
        trial.set_user_attr("failure", outcome.failure[:1000])
    for text, violation in outcome.constraints.items():
        trial.set_constraint(text, violation)
    if outcome.values is None:
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, outcome.values)
    print(_describe(trial.number, state, outcome, plan), flush=True)
    return ret


def _fail_running(study: optuna.Study, tracking: StudyTracking) -> list[int]:
    """FAIL the trials left RUNNING (asked, never told): one process drives a study at a time,
    so after Ctrl-C, or at the start of a run after a crash, they were cut short."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        _mark_interrupted(study, trial, tracking)
    return [t.number for t in stale]


def _print_best(study: optuna.Study, best: list[FrozenTrial], plan: StudyPlan) -> None:
    what = "Pareto set" if len(plan.objectives) > 1 else "best trial"
    what += " (feasible only)" if plan.constraints else ""
    if not best:
        print(f"[study] {study.study_name}: no {'feasible ' if plan.constraints else ''}trial yet")
    for trial in best:
        values = ", ".join(
            f"{o.metric}={v:.4g}" for o, v in zip(plan.objectives, trial.values, strict=True)
        )
        params = " ".join(f"{k}={v}" for k, v in trial.params.items())
        print(f"[study] {what}: trial {trial.number}: {values} | {params}")


def run_study(
    settings: Settings, config: DictConfig, launcher: Launcher, arguments: list[str]
) -> list[JobReturn]:
    plan = plan_study(settings, config, arguments)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")  # as Hydra's basic sweeper does
    # One line per trial from us instead of Optuna's INFO line per trial.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    study = _open_study(plan, settings)

    tracking = StudyTracking(config)
    tracking.open_parent(
        study,
        {
            "optuna_study_name": plan.name,
            "optuna_storage": plan.storage,
            "optuna_sampler": settings.sampler,
            "objectives": ", ".join(str(o) for o in plan.objectives),
            "constraints": "; ".join(c.text for c in plan.constraints),
            "search_space": " ".join(f"{k}={v}" for k, v in plan.space.distributions.items()),
            "sweep_dir": str(sweep_dir),
            "hydra_overrides": " ".join(arguments),
        },
    )
    _fail_running(study, tracking)  # left by a run of this command that was killed
    print(
        f"[study] {plan.name}: {_counted(study)}/{plan.n_trials} trials done; "
        f"storage {plan.storage}; {tracking.view_hint()}",
        flush=True,
    )
    returns: list[JobReturn] = []
    try:
        while _counted(study) < plan.n_trials:
            returns.append(_run_trial(study, plan, launcher, tracking))
    except StudyError as error:
        tracking.close_parent("FAILED", str(error))
        raise
    except KeyboardInterrupt:
        # Ctrl-C may land anywhere, even inside ask() once the trial exists: whatever is RUNNING
        # now was cut short. (The CLI then ends the parent run KILLED, exit status 130.)
        for number in _fail_running(study, tracking):
            print(
                f"[study] trial {number} interrupted: FAIL; rerun the same command to resume",
                file=sys.stderr,
                flush=True,
            )
        raise
    best = tracking.log_summary(study, plan.objectives, plan.storage)
    _print_best(study, best, plan)
    return returns
