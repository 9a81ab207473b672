"""MLflow tracking: one run per trial, a parent run per sweep."""
