"""Hydra sweeper plugin: Optuna (>= 5) studies over `python -m sweeper` trials.

`hydra/sweeper=optuna` (presets: `vram_budget`, `pareto`) asks Optuna for each trial's parameters,
launches the trial through Hydra's launcher, and tells Optuna its metrics (ask-and-tell). Studies
live in SQLite beside the sweep, so an interrupted study resumes with the same command, or in
PostgreSQL, shared by workers on many GPUs and hosts (docs/cluster.md); the study is one MLflow
parent run and its trials are the child runs, cross-linked by trial number and run id. Hydra
imports this package's public modules to discover the plugin, so they import nothing heavy; the
work is in the `_`-prefixed modules, which the plugin scanner skips.
"""
