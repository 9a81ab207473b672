"""engine=vllm: vLLM's offline LLM or AsyncLLM (config.py: its keys and refusals; engine.py:
the engine; frontends.py, beam.py). vLLM is imported only when an engine is built."""
