"""sweeper: parameter sweeps for LLM and VLM inference, measured and tracked in MLflow."""

__version__ = "0.1.0"
