"""What users read after a trial or a sweep: tables, Pareto fronts, plots."""
