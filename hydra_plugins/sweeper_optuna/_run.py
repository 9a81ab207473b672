"""The ask-and-tell loop: one Hydra job per Optuna trial, resumable, linked to MLflow.

Any number of workers (the same command, on other GPUs or hosts) may share a study in one
database: each asks its own trials, in batches of n_jobs, until the study holds n_trials; a
trial whose worker died is FAILed and queued again (see _workers.py), and a worker with nothing
left to ask waits for the other workers' running trials, so that it can take over their retries.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from optuna.trial._trial import _CONSTRAINTS_KEY as CONSTRAINTS_KEY

from hydra_plugins.sweeper_optuna._definition import (
    Constraint,
    Objective,
    Outcome,
    check_metrics,
    default_study_name,
    evaluate,
    make_sampler,
    parse_constraint,
    parse_objectives,
    worker_seed,
)
from hydra_plugins.sweeper_optuna._errors import StudyError
from hydra_plugins.sweeper_optuna._space import SearchSpace, parse_space
from hydra_plugins.sweeper_optuna._storage import StudyLock, check_url, display_url, open_storage
from hydra_plugins.sweeper_optuna._tracking import RUN_ATTR, StudyTracking
from hydra_plugins.sweeper_optuna._workers import (
    WORKER_ATTR,
    Heartbeats,
    Worker,
    is_gone,
    this_worker,
)
from hydra_plugins.sweeper_optuna.config import OptunaSweeperConf
from sweeper.tracking.credentials import redact
from sweeper.tracking.store import unreachable_reason
from sweeper.trial import metric_names

# Study user attrs: trial numbers cut short by Ctrl-C or a crash (they do not count toward
# n_trials), and the objectives the study was created with (a resume must not change them).
INTERRUPTED_ATTR = "interrupted_trials"
OBJECTIVES_ATTR = "objectives"
# How many workers have joined the study (each seeds its sampler by its place in that order).
WORKERS_ATTR = "workers_joined"
# Trial user attrs of a rerun of a trial cut short: the trial it reruns, and how many reruns
# of that configuration there have been (max_retry caps them).
RETRY_ATTR = "retry_of"
RETRIES_ATTR = "retries"
# Trial user attr of a trial whose parameters a finished trial already had: it is not run again
# (the same configuration is one finding, not two; repeats=N measures one several times).
DUPLICATE_ATTR = "duplicate_of"


@dataclass(frozen=True)
class StudyPlan:
    space: SearchSpace
    objectives: list[Objective]
    constraints: list[Constraint]
    name: str
    storage: str
    n_trials: int
    n_jobs: int


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


def plan_study(settings: OptunaSweeperConf, config: DictConfig, arguments: list[str]) -> StudyPlan:
    """Everything checked before a study is opened or a model loaded (errors are one line)."""
    settings.check()
    space = parse_space(settings.params, arguments, settings.sampler)
    objectives = parse_objectives(settings.objectives)
    constraints = [parse_constraint(text) for text in settings.constraints]
    check_metrics(objectives, constraints, metric_names())
    name = settings.study_name or default_study_name(
        str(config.experiment_name), settings.sampler, space, objectives, constraints
    )
    storage = settings.storage or f"sqlite:///{study_folder(config) / 'optuna.db'}"
    check_url(storage)
    n_trials = settings.n_trials
    if settings.sampler == "grid":
        n_trials = min(n_trials, space.grid_size)
    n_jobs = settings.n_jobs or launcher_jobs(config)
    return StudyPlan(space, objectives, constraints, name, storage, n_trials, n_jobs)


def launcher_jobs(config: DictConfig) -> int:
    """The launcher's parallel jobs: joblib's n_jobs (-1: every CPU, -2: all but one, ...);
    1 for a launcher without one (basic)."""
    jobs = OmegaConf.select(config, "hydra.launcher.n_jobs", default=None)
    if not isinstance(jobs, int) or jobs == 0:
        return 1
    return jobs if jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + jobs)


def _open_study(
    plan: StudyPlan, settings: OptunaSweeperConf, storage: RDBStorage
) -> tuple[optuna.Study, int | None]:
    """Create the study or load it (under the lock: workers starting together get one study),
    with this worker's sampler; the sampler's seed."""
    directions = [o.direction for o in plan.objectives]
    study = optuna.create_study(
        storage=storage, study_name=plan.name, directions=directions, load_if_exists=True
    )
    # Every worker runs the same command, seed included: each seeds its sampler by the order it
    # joined the study in, or they would all ask for the same parameters.
    worker = int(study.user_attrs.get(WORKERS_ATTR, 0))
    study.set_user_attr(WORKERS_ATTR, worker + 1)
    seed = worker_seed(settings.seed, worker)
    study.sampler = make_sampler(settings.sampler, seed, plan.space)
    created_with = study.user_attrs.get(OBJECTIVES_ATTR)
    wanted = [str(o) for o in plan.objectives]
    if created_with is None:
        study.set_user_attr(OBJECTIVES_ATTR, wanted)
    elif created_with != wanted:
        raise StudyError(
            f"study '{plan.name}' in {display_url(plan.storage)} optimises "
            f"{', '.join(created_with)}, not {', '.join(wanted)}; set another "
            "hydra.sweeper.study_name"
        )
    return study, seed


def _counted(study: optuna.Study) -> int:
    """Trials that count toward n_trials: finished (COMPLETE or FAIL) or RUNNING on some worker;
    trials cut short do not count (their reruns do)."""
    interrupted = set(study.user_attrs.get(INTERRUPTED_ATTR, []))
    taken = study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)
    )
    return sum(t.number not in interrupted for t in taken)


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


def _consecutive(batch: list[optuna.Trial]) -> list[list[optuna.Trial]]:
    """The batch cut where trial numbers jump: Hydra numbers a launch's jobs from one start,
    and a job's number must be its trial's (its output folder, its run's hydra_job_num tag).
    New trials asked under the lock are consecutive; only a rerun popped from the queue jumps."""
    groups: list[list[optuna.Trial]] = []
    for trial in batch:
        if groups and trial.number == groups[-1][-1].number + 1:
            groups[-1].append(trial)
        else:
            groups.append([trial])
    return groups


class StudyWorker:
    """One worker's share of a study: ask under the lock, launch, tell under the lock."""

    def __init__(
        self,
        study: optuna.Study,
        storage: RDBStorage,
        plan: StudyPlan,
        settings: OptunaSweeperConf,
        lock: StudyLock,
        tracking: StudyTracking,
        stale: list[FrozenTrial],
    ) -> None:
        self.study = study
        self.storage = storage
        self.plan = plan
        self.max_retry = settings.max_retry
        self.lock = lock
        self.tracking = tracking
        self.stale = stale  # filled by the storage's stale-trial callback
        self.in_flight: dict[int, optuna.Trial] = {}

    def claim(self, heartbeats: Heartbeats) -> list[optuna.Trial]:
        """Reclaim the trials of dead workers, then ask for as many trials as this worker may
        run at once and the study still needs."""
        with self.lock.held():
            self._reclaim()
            wanted = min(self.plan.n_jobs, self.plan.n_trials - _counted(self.study))
            for _ in range(max(wanted, 0)):
                with warnings.catch_warnings():
                    # "Heartbeat of storage is supposed to be used with Study.optimize": the
                    # Heartbeats thread does for asked trials what optimize does for its own.
                    warnings.simplefilter("ignore", UserWarning)
                    trial = self.study.ask(self.plan.space.distributions)
                self.in_flight[trial.number] = trial
                heartbeats.add([trial._trial_id])  # Optuna's own heartbeat thread uses it too
                trial.set_user_attr(WORKER_ATTR, this_worker().as_dict())
        return list(self.in_flight.values())

    def _reclaim(self) -> None:
        """FAIL the RUNNING trials whose worker is gone, and queue them again. Under the lock,
        a RUNNING trial without a worker attr lost its worker between ask and tagging."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)  # heartbeat stopped: into self.stale
        gone = []
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = Worker.from_dict(trial.user_attrs.get(WORKER_ATTR))
            if trial.number not in self.in_flight and (worker is None or is_gone(worker)):
                gone.append(trial)
        stale, self.stale[:] = list(self.stale), []
        for trial in stale:
            self._retire(trial, f"no heartbeat for {self._grace_period()} s")
        for trial in gone:
            self._retire(trial, "its worker's process is gone")

    def _grace_period(self) -> int:
        assert self.storage.heartbeat_interval is not None
        return self.storage.grace_period or 2 * self.storage.heartbeat_interval

    def _retire(self, trial: FrozenTrial | optuna.Trial, why: str) -> None:
        """FAIL a trial cut short; it does not count toward n_trials and its configuration
        is queued to run again, up to max_retry times. Under the lock."""
        self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        self.study.set_user_attr(
            INTERRUPTED_ATTR, [*self.study.user_attrs.get(INTERRUPTED_ATTR, []), trial.number]
        )
        self.tracking.link(self.study.study_name, trial.number, "FAIL", None)
        retries = int(trial.user_attrs.get(RETRIES_ATTR, 0))
        if retries < self.max_retry:
            self.study.enqueue_trial(
                trial.params, user_attrs={RETRY_ATTR: trial.number, RETRIES_ATTR: retries + 1}
            )
            then = "queued to run again"
        else:
            then = f"not run again (hydra.sweeper.max_retry={self.max_retry})"
        print(f"[study] trial {trial.number} FAIL: {why}; {then}", file=sys.stderr, flush=True)

    def _finished_with(self, trial: optuna.Trial) -> FrozenTrial | None:
        """The COMPLETE trial of the study that had `trial`'s parameters, if any."""
        for done in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if done.params == trial.params and DUPLICATE_ATTR not in done.user_attrs:
                return done
        return None

    def _tell_duplicate(self, trial: optuna.Trial, original: FrozenTrial) -> None:
        """Tell the sampler what the same configuration gave; nothing runs. Under the lock."""
        trial.set_user_attr(DUPLICATE_ATTR, original.number)
        for key, value in original.system_attrs.items():
            if key.startswith(f"{CONSTRAINTS_KEY}:"):
                trial.set_constraint(key.split(":", 1)[1], value)
        self.study.tell(trial, original.values)
        print(
            f"[study] trial {trial.number}: the configuration of trial {original.number}, "
            "not run again (its values told again)",
            flush=True,
        )

    def run(
        self, batch: list[optuna.Trial], launcher: Launcher, heartbeats: Heartbeats
    ) -> list[JobReturn]:
        returns: list[JobReturn] = []
        fresh = []
        for trial in batch:
            with self.lock.held():
                original = self._finished_with(trial)
                if original is not None:
                    self._tell_duplicate(trial, original)
            if original is None:
                fresh.append(trial)
            else:
                heartbeats.remove([trial._trial_id])
                del self.in_flight[trial.number]
        for group in _consecutive(fresh):
            overrides = [self.plan.space.overrides(t.params) for t in group]
            rets = launcher.launch(overrides, group[0].number)
            for trial, ret in zip(group, rets, strict=True):
                with self.lock.held():
                    self._tell(trial, ret)
                heartbeats.remove([trial._trial_id])
                del self.in_flight[trial.number]
                returns.append(ret)
        return returns

    def _tell(self, trial: optuna.Trial, ret: JobReturn) -> None:
        if self.storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
            # Another worker took this one for dead (no heartbeat in time) and queued it again:
            # its rerun is what counts.
            print(
                f"[study] trial {trial.number} finished after another worker failed it; its "
                "rerun counts instead",
                file=sys.stderr,
                flush=True,
            )
            return
        try:
            outcome = _outcome(ret, self.plan)
        except StudyError:
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        state = "COMPLETE" if outcome.values is not None else "FAIL"
        run_id = self.tracking.link(
            self.study.study_name, trial.number, state, outcome.feasible, outcome.failure
        )
        if run_id:
            trial.set_user_attr(RUN_ATTR, run_id)
        if outcome.failure:
            trial.set_user_attr("failure", outcome.failure[:1000])
        for text, violation in outcome.constraints.items():
            trial.set_constraint(text, violation)
        if outcome.values is None:
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            self.study.tell(trial, outcome.values)
        print(_describe(trial.number, state, outcome, self.plan), flush=True)

    def others_running(self) -> list[int]:
        return [
            t.number
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number not in self.in_flight
        ]

    def interrupt(self) -> None:
        """After Ctrl-C, which may land anywhere (even inside ask, once the trial exists): FAIL
        this worker's unfinished trials, queued to run again when the command is rerun."""
        with self.lock.held():
            for trial in self.in_flight.values():
                self._retire(trial, "interrupted; rerun the same command to resume")
            self.in_flight.clear()
            self._reclaim()

    def abandon(self) -> None:
        """After a bad-input error: this worker's other unfinished trials FAIL (not retried)."""
        with self.lock.held():
            for trial in self.in_flight.values():
                self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            self.in_flight.clear()


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
    settings: OptunaSweeperConf, config: DictConfig, launcher: Launcher, arguments: list[str]
) -> list[JobReturn]:
    plan = plan_study(settings, config, arguments)
    problem = unreachable_reason(str(config.tracking.uri))
    if problem:
        raise StudyError(problem)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    # As Hydra's basic sweeper does, with any URL password masked (the command line's are
    # stripped before Hydra starts: sweeper/tracking/credentials.py).
    (sweep_dir / "multirun.yaml").write_text(redact(OmegaConf.to_yaml(config)))
    # One line per trial from us instead of Optuna's INFO line per trial.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    lock = StudyLock(plan.storage)
    stale: list[FrozenTrial] = []
    with lock.held():
        storage = open_storage(
            plan.storage,
            settings.heartbeat_interval,
            settings.grace_period,
            lambda _study, trial: stale.append(trial),
        )
        study, seed = _open_study(plan, settings, storage)
        tracking = StudyTracking(config)
        tracking.open_parent(
            study,
            {
                "optuna_study_name": plan.name,
                "optuna_storage": display_url(plan.storage),
                "optuna_sampler": settings.sampler,
                "objectives": ", ".join(str(o) for o in plan.objectives),
                "constraints": "; ".join(c.text for c in plan.constraints),
                "search_space": " ".join(f"{k}={v}" for k, v in plan.space.distributions.items()),
                "sweep_dir": str(sweep_dir),
                "hydra_overrides": redact(" ".join(arguments)),
            },
        )
    worker = StudyWorker(study, storage, plan, settings, lock, tracking, stale)
    print(
        f"[study] {plan.name}: {_counted(study)}/{plan.n_trials} trials done or running; "
        f"storage {display_url(plan.storage)}; {plan.n_jobs} at a time here"
        f"{'' if seed is None else f', sampler seed {seed}'}; {tracking.view_hint()}",
        flush=True,
    )
    returns: list[JobReturn] = []
    # Often enough that a worker left waiting notices a dead worker's trial soon after its
    # grace period, seldom enough to leave the database alone.
    poll_s = min(settings.heartbeat_interval, 5)
    waited_for: list[int] = []
    with Heartbeats(storage, settings.heartbeat_interval) as heartbeats:
        try:
            while True:
                batch = worker.claim(heartbeats)
                if batch:
                    returns.extend(worker.run(batch, launcher, heartbeats))
                    continue
                running = worker.others_running()
                if not running:
                    break
                if running != waited_for:
                    print(
                        f"[study] waiting for trials {', '.join(map(str, running))} on other "
                        "workers (a dead worker's trial is run again here)",
                        flush=True,
                    )
                    waited_for = running
                time.sleep(poll_s)
        except StudyError as error:
            worker.abandon()
            tracking.close_parent("FAILED", str(error))
            raise
        except KeyboardInterrupt:
            worker.interrupt()  # the CLI then ends the parent run KILLED, exit status 130
            raise
    best = tracking.log_summary(study, plan.objectives, display_url(plan.storage))
    _print_best(study, best, plan)
    return returns
