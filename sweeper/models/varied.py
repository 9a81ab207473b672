"""The tiny random Qwen2.5-VL with its weights re-drawn large, for tests and benchmarks.

The default tiny model's small random weights give nearly the same logits whatever the prompt:
it answers every question with one repeated token and never ends early. Re-drawn at
std 2/sqrt(fan_in), every prompt gets its own greedy answer (what equivalence tests need), and
with the end-of-turn token's embedding scaled up (`eos_scale`, tied to the output layer) answers
end at varied lengths (what continuous batching needs to show anything).
"""

from __future__ import annotations

from pathlib import Path


def build_varied_vlm(out: str | Path, eos_scale: float = 1.0, seed: int = 0) -> Path:
    """Write the re-drawn model (weights, processor) to `out`; returns `out`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sweeper.models.tiny import cached_tiny_vlm

    source = cached_tiny_vlm(Path("~/.cache/sweeper/models").expanduser())
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                std = 2.0 / parameter.shape[-1] ** 0.5
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        model.get_input_embeddings().weight[model.generation_config.eos_token_id] *= eos_scale
    out = Path(out)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(source).save_pretrained(out)
    return out
