"""engine=hf: HF transformers (config.py: its keys and refusals; engine.py: the engine)."""
