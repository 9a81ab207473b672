"""engine=hf's own speed work, kept apart from the engine and finished (kept working, not
extended): each piece declares here the architectures and transformers versions it was checked
against, and the HF engine's config refuses it elsewhere before anything loads.

- `graphed`: engine.decode_loop=graphed, a compiled decode step replayed per token;
- `fused`: engine.fuse_projections, q/k/v and gate/up projections each one linear;
- `attention`: engine.attn_implementation=sdpa_gqa, SDPA sharing the KV heads in the kernel;
- `prefix`, `prefix_store`: prefix_caching=true on static batches, M-RoPE-aware.
This module imports nothing heavy: configs read the declarations during preflight.
"""

from __future__ import annotations

from dataclasses import dataclass

# transformers on this project's CPU machines (5.19), its lent GPU hosts (5.17), and by hand 5.20
# to 5.23 (the HF engine's tests; pyproject.toml says which). 5.24 breaks the fused projections.
CHECKED_TRANSFORMERS = ">=5.17,<5.24"


@dataclass(frozen=True)
class Checked:
    setting: str  # the key=value that turns it on
    model_types: frozenset[str]  # HF model_type values it was checked on
    transformers: str = CHECKED_TRANSFORMERS

    def refusal(self, model_type: str) -> str | None:
        """Why it cannot run here (None: it can): another architecture, or another transformers."""
        import transformers
        from packaging.specifiers import SpecifierSet

        checked = ", ".join(sorted(self.model_types))
        if model_type not in self.model_types:
            return f"{self.setting} is checked only on model types {checked}, not {model_type!r}"
        if transformers.__version__ not in SpecifierSet(self.transformers):
            return (
                f"{self.setting} is checked with transformers {self.transformers}; "
                f"{transformers.__version__} is installed"
            )
        return None


# Qwen2.5-VL's M-RoPE positions are laid out by hand (positions per image, 4 rows).
GRAPHED = Checked("engine.decode_loop=graphed", frozenset({"qwen2_5_vl"}))
PREFIX_CACHING = Checked("prefix_caching=true", frozenset({"qwen2_5_vl"}))
# Swaps Qwen2.5-VL decoder layers' projection modules.
FUSED = Checked("engine.fuse_projections=true", frozenset({"qwen2_5_vl"}))
SDPA_GQA = Checked("engine.attn_implementation=sdpa_gqa", frozenset({"qwen2_5_vl"}))
