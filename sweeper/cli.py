"""`python -m sweeper`: one trial, or a sweep with `-m` (Hydra multirun).

Before Hydra starts, every override (every combination, for a grid) is composed against the
schema, so a typo or a value of the wrong type is one line on stderr and exit status 2, in
seconds, with no model loaded. Ranges and engine support are checked there too for a single
trial; in a sweep they are checked per trial, so one bad trial is recorded FAILED and the others
still run. The exit status is 1 when any trial failed.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import time
from typing import Any

# Quiet by default: no hub progress bars, no telemetry, no tokenizer fork warnings.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow 3.17's telemetry failed trials under the Ray launcher; nothing here needs it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from hydra_plugins.sweeper_optuna.config import register_plugin  # noqa: E402
from sweeper.config import ConfigError, register_configs  # noqa: E402
from sweeper.metrics import HEADLINE_METRICS  # noqa: E402

register_configs()
# The Optuna sweeper plugin, registered by the command that uses it: Hydra's plugin scan cannot
# list the hydra_plugins namespace of an editable install (pip install -e). The plugin imports
# sweeper's tracking; nothing below the CLI imports the plugin.
register_plugin()

CONFIG_MODULE = "sweeper.conf"
# Flags that only print something (help, config, info): no preflight for them.
_INFO_FLAGS = ("-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c", "--version")
_MAX_PREFLIGHT_COMBINATIONS = 1024

# Trial failures in this process (the sweep callback also counts those of other processes).
failed_trials: list[str] = []


class BadInput(Exception):
    """A one-line message for the user; the CLI prints it and exits with status 2."""


def _quiet_libraries() -> None:
    import logging

    import mlflow  # noqa: F401  (configures its loggers on import; quieten them after)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("mlflow", "alembic", "httpx", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Library warnings go to the run's log file (Hydra's job log), not the terminal, where
    # they would bury the progress and the answer.
    logging.captureWarnings(True)
    warned = logging.getLogger("py.warnings")
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    warned.handlers = files
    warned.propagate = False


def _group_options(group: str) -> list[str]:
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    return sorted(loader.get_group_options(group))


def _known_keys(cfg: DictConfig, key: str) -> list[str]:
    parent, _, _ = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return []
    # `_target_` is the class an engine config names, not a key to set.
    return [f"{parent}.{k}" if parent else str(k) for k in node if not str(k).startswith("_")]


def _did_you_mean(wrong: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(wrong, choices, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def _unknown_key(key: str, value: str, cfg: DictConfig) -> str:
    known = _known_keys(cfg, key)
    return (
        f"unknown key '{key}' (value '{value}'); {_did_you_mean(key, known)}known keys here: "
        f"{', '.join(known) or 'none'}"
    )


def _is_dict_entry(key: str, overrides: list[str]) -> bool:
    """Whether `key` is a new entry of a dict-typed key (e.g. engine.server_args.max_num_seqs),
    which Hydra adds only with `+`: its parent, composed without it, is a plain dict."""
    from hydra import compose

    parent, _, _ = key.rpartition(".")
    others = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != key]
    try:
        node = OmegaConf.select(compose("config", overrides=others), parent) if parent else None
    except Exception:  # another override is bad too: its own message comes first
        return False
    return isinstance(node, DictConfig) and node._metadata.object_type is dict


def _explain(error: Exception, overrides: list[str], base: DictConfig) -> str:
    """One line naming the key, the value and what is allowed, from a composition error."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    text = str(error)
    if isinstance(error, MissingConfigException):
        found = re.search(r"Could not find '([^']+)/([^']+)'", text)
        if found:
            group, option = found.groups()
            options = _group_options(group)
            hint = _did_you_mean(option, options)
            return f"invalid value for '{group}': '{option}' ({hint}allowed: {', '.join(options)})"
    if "Ambiguous value for argument" in text:  # a sweep's syntax without -m: Hydra's hint, kept
        found = re.search(r"argument '([^']+)'", text)
        override = found.group(1) if found else "?"
        return (
            f"'{override}' is a sweep: add -m (--multirun) to run a trial per value, or quote "
            "the value to pass it whole"
        )
    cause = error.__cause__ or error
    key = getattr(cause, "full_key", None)
    if not key:
        match = re.search(r"override '?([\w.\-/]+)", text)
        key = match.group(1).split("=", 1)[0] if match else "?"
    values = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    value = values.get(key, "?")
    if isinstance(cause, ConfigKeyError | ConfigAttributeError):
        if _is_dict_entry(key, overrides):
            return f"new entry '{key}' (value '{value}') of a dict: add it with +{key}={value}"
        return _unknown_key(key, value, base)
    if isinstance(cause, ValidationError):
        choices = re.search(r"expected one of \[([^\]]*)\]", str(cause))
        if choices:
            hint = _did_you_mean(value, [c.strip() for c in choices.group(1).split(",")])
            return (
                f"invalid value for '{key}': '{value}' ({hint}allowed: one of {choices.group(1)})"
            )
        if "ListConfig" in str(cause):
            return f"invalid value for '{key}': '{value}' (allowed: a list, e.g. [a,b])"
        expected = re.search(r"converted to (\w+)", str(cause))
        kind = expected.group(1).lower() if expected else "the declared type"
        return f"invalid value for '{key}': '{value}' (allowed: a value of type {kind})"
    return f"invalid overrides {' '.join(overrides)}: {text.splitlines()[0]}"


def _hydra_overrides(overrides: list[str]) -> list[str]:
    """The overrides of Hydra's own config (hydra/sweeper=..., hydra.sweeper.n_trials=...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.input_line for o in parsed if o.is_hydra_override()]


def _combinations(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of the trials a grid expands to (one list for a single trial)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as error:
        raise BadInput(f"cannot parse overrides: {str(error).splitlines()[0]}") from None
    # Hydra's own keys are Hydra's business; interval sweeps belong to the Optuna sweeper.
    own = [o for o in parsed if not o.is_hydra_override() and not o.is_interval_sweep()]
    if not multirun:
        return [[o.input_line for o in own]]
    batches = BasicSweeper.split_arguments(own, None)
    combos = batches[0] if batches else [[]]
    return combos[:_MAX_PREFLIGHT_COMBINATIONS]


def _groups_of(combo: list[str], compose: Any, default: DictConfig) -> DictConfig:
    """The config with the combination's group choices (engine=vllm, ...) and nothing else:
    where an unknown key's neighbours are listed from (the default's when that fails too)."""
    groups = [o for o in combo if "=" in o and "." not in o.split("=", 1)[0]]
    try:
        return compose("config", overrides=groups)
    except Exception:  # noqa: BLE001 - the bad override is itself a group choice
        return default


def preflight(args: list[str]) -> None:
    """Compose every trial the command line asks for; raise BadInput on the first bad one."""
    from hydra import compose, initialize_config_module

    multirun = "-m" in args or "--multirun" in args
    overrides = [a for a in args if not a.startswith("-")]
    with initialize_config_module(CONFIG_MODULE, version_base=None):
        base = compose("config")
        combos = _combinations(overrides, multirun)
        for combo in combos:
            try:
                cfg = compose("config", overrides=combo)
            except Exception as error:
                raise BadInput(_explain(error, combo, _groups_of(combo, compose, base))) from None
            if not multirun:
                check_values(cfg)
        # Hydra's own part (the sweeper and its options), composed once: a typo there would
        # otherwise surface as Hydra's multi-line error, after the sweep has started.
        hydra_part = [*_hydra_overrides(overrides), *combos[0]]
        if _hydra_overrides(overrides):
            try:
                compose("config", overrides=hydra_part, return_hydra_config=True)
            except Exception as error:
                choices = [o for o in hydra_part if "." not in o.split("=", 1)[0]]
                try:  # the keys around the bad one: those of the sweeper chosen
                    around = compose("config", overrides=choices, return_hydra_config=True)
                except Exception:  # noqa: BLE001 - the bad override is the choice itself
                    around = compose("config", return_hydra_config=True)
                raise BadInput(_explain(error, hydra_part, around)) from None
    from sweeper.tracking.store import store_problem, unreachable_reason

    uri = str(cfg.tracking.uri)
    if problem := unreachable_reason(uri) or store_problem(uri, cfg.tracking.artifact_location):
        raise BadInput(problem)


def check_values(cfg: DictConfig) -> Any:
    """Ranges, paths and engine support; returns the validated TrialConfig."""
    from sweeper.trial import check_trial

    try:
        trial = OmegaConf.to_object(cfg)
        check_trial(trial)
    except ConfigError as error:
        raise BadInput(str(error)) from None
    return trial


def _run_name() -> str:
    """A single trial's overrides; a sweep's trial number and the knobs the sweep varies (the
    constants would make every trial's name look the same, cut short)."""
    from sweeper.tracking.store import VARIED_ENV

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return " ".join(overrides) or "defaults"
    varied = set(filter(None, os.environ.get(VARIED_ENV, "").split(",")))
    shown = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] in varied] or overrides
    return f"trial-{hydra_cfg.job.num}: {' '.join(shown) or 'defaults'}"


def _guard_engine_processes() -> None:
    """Engines' processes die with the trial's (a guard kills them if it is killed); those a
    crash left when the guard died too are killed now (sweeper/engines/toolkit/processes.py)."""
    from sweeper.engines.toolkit import processes

    if killed := processes.reap_orphans():
        print(
            f"sweeper: killed {len(killed)} processes left by a trial process that is gone: "
            f"{', '.join(killed)}",
            file=sys.stderr,
        )
    processes.guard_children()


class TrialProgress:
    """The trial's progress on a terminal (nothing in a log file): one bar whose phase is in its
    description, reset at each phase, so its rate and ETA are the phase's own (warm-up's
    compiles never inflate the measured run's ETA)."""

    def __init__(self, name: str, position: str) -> None:
        from tqdm.auto import tqdm

        self.label = " · ".join(filter(None, [position, name[:40]]))
        # disable=None: a bar on a terminal, nothing in a log file.
        self.bar = tqdm(desc=self.label, unit="q", leave=False, dynamic_ncols=True, disable=None)

    def phase(self, name: str, total: int | None = None) -> None:
        from sweeper.engines.toolkit.processes import raise_if_interrupted

        raise_if_interrupted()  # in case a library swallowed the KeyboardInterrupt
        # tqdm redraws at most every 0.1 s: draw the ending phase's last count before the reset,
        # so the last thing a phase shows is where it ended.
        self.bar.refresh()
        self.bar.reset(total=total)
        self.bar.set_description(f"{self.label} · {name}")

    def advance(self, count: int = 1) -> None:
        from sweeper.engines.toolkit.processes import raise_if_interrupted

        raise_if_interrupted()
        self.bar.update(count)

    def close(self) -> None:
        self.bar.refresh()  # the last phase's end, drawn before the bar is cleared
        self.bar.close()


def sweep_position(job: int) -> str:
    """ "trial 3/8 · ETA 2m10s": this trial's place in its sweep (when the sweep knows its size)
    and the sweep's ETA from the trials done so far."""
    from sweeper.tracking.store import SWEEP_SIZE_ENV, SWEEP_START_ENV

    size = os.environ.get(SWEEP_SIZE_ENV)
    if not size:
        return f"trial {job + 1}"
    text = f"trial {job + 1}/{size}"
    started = float(os.environ.get(SWEEP_START_ENV, "0"))
    if job and started:
        each = (time.time() - started) / job
        left = int(each * (int(size) - job))
        text += f" · sweep ETA {left // 60}m{left % 60:02d}s"
    return text


def _show(name: str, metrics: dict[str, float], multirun: bool) -> None:
    from sweeper.reports.tables import show, trial_table

    if multirun:
        headline = ", ".join(f"{k}={metrics[k]:.4g}" for k in HEADLINE_METRICS if k in metrics)
        print(f"[{name}] {headline}", flush=True)
    else:
        show(trial_table(f"sweeper trial: {name}", metrics))


def execute(cfg: DictConfig) -> dict[str, float] | None:
    """The Hydra task: one trial, tracked in MLflow. Returns its metrics, or None if it failed."""
    from sweeper.tracking.credentials import redact
    from sweeper.tracking.log import log_result
    from sweeper.tracking.references import ParentRunReferences
    from sweeper.tracking.store import (
        PARENT_RUN_ENV,
        StoreError,
        flatten,
        git_commit,
        trial_run,
        use_store,
        view_lines,
    )
    from sweeper.trial import run_trial

    _quiet_libraries()
    _guard_engine_processes()
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    name = redact(_run_name())
    try:
        experiment_id = use_store(
            cfg.tracking.uri, cfg.tracking.artifact_location, cfg.experiment_name
        )
    except StoreError as error:  # nowhere to record the trial: one line, and it counts as failed
        failed_trials.append(name)
        print(f"sweeper: trial '{name}' failed: {error}", file=sys.stderr)
        return None
    params = flatten(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    tags = {
        "hydra_overrides": " ".join(hydra_cfg.overrides.task),
        # The command that runs this trial again, on its own.
        "reproduce": " ".join(["python -m sweeper", *hydra_cfg.overrides.task]),
        "git_commit": git_commit(),
        "hydra_job_num": str(hydra_cfg.job.num) if multirun else "",
    }
    bar = None
    try:
        with trial_run(name, params, tags):
            trial = check_values(cfg)
            bar = TrialProgress(name, sweep_position(hydra_cfg.job.num) if multirun else "")
            parent = os.environ.get(PARENT_RUN_ENV)
            references = ParentRunReferences(parent) if parent else None
            result = run_trial(trial, bar, references)
            bar.close()
            # Shown before anything is written: a disk that filled up cannot take them along.
            _show(name, result.metrics, multirun)
            log_result(result, OmegaConf.to_yaml(cfg, resolve=True), cfg.tracking.log_predictions)
    except Exception as error:
        if bar is not None:
            bar.close()
        failed_trials.append(name)
        message = redact(f"{type(error).__name__}: {error}")
        print(f"sweeper: trial '{name}' failed: {message}", file=sys.stderr)
        return None
    if not multirun:
        print(f"MLflow: experiment '{cfg.experiment_name}' in {redact(str(cfg.tracking.uri))}")
        for line in view_lines(str(cfg.tracking.uri), experiment_id):
            print(f"  {redact(line)}")
    return result.metrics


@hydra.main(version_base=None, config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def _hydra_entry(cfg: DictConfig) -> dict[str, float] | None:
    return execute(cfg)


def main() -> None:
    from sweeper.engines.toolkit.processes import catch_interrupts
    from sweeper.tracking.credentials import take_passwords

    # Passwords in URLs go to the environment before Hydra sees the command line: nothing that
    # Hydra or sweeper writes or prints can then hold them (sweeper/tracking/credentials.py).
    args = sys.argv[1:] = take_passwords(sys.argv[1:])
    if not any(a in _INFO_FLAGS or a.startswith("--cfg") for a in args):
        try:
            preflight(args)
        except BadInput as error:
            print(f"sweeper: error: {error}", file=sys.stderr)
            sys.exit(2)
    from sweeper.tracking import callback

    # SIGTERM (`timeout`, Slurm preemption, `kill`) takes Ctrl-C's path: the open runs end
    # KILLED and the Optuna trial is handed back, instead of staying RUNNING for ever; both are
    # remembered where a library swallows them (vLLM's start-up).
    catch_interrupts()
    try:
        _hydra_entry()
    except KeyboardInterrupt:
        callback.interrupt_sweep()
        print("sweeper: interrupted; finished trials are in MLflow", file=sys.stderr)
        sys.exit(130)
    if failed_trials or callback.failed_in_last_sweep:
        sys.exit(1)
