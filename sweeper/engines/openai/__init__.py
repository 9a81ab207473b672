"""engine=openai: an OpenAI-compatible server, running or started by sweeper, over HTTP."""
