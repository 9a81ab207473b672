"""What every engine needs and none should write again: prompts rendered and tokenized one way
(`chat`), a request's timing from its clock marks (`timing`), the device and dtype (`devices`),
engine child processes (`processes`), counter deltas of an engine's own metrics
(`prometheus`)."""
