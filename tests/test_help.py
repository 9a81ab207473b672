"""`--help` lists the config groups with their options and every top-level key."""

from __future__ import annotations

from tests.conftest import run_cli


def test_help_lists_groups_and_keys(tmp_path) -> None:
    result = run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "engine: hf, openai, vllm" in text
    assert "model: custom, qwen2_5_vl_7b_arch, tiny_random, tiny_vlm" in text
    assert "dataset: easy_vqa, easy_vqa_text, okvqa, okvqa_hf, text_jsonl" in text
    assert "workload: multi_sample, multi_turn, shared_prefix, single" in text
    assert "schema" not in text  # the structured-config schemas are not options
    for key in (
        "beam_num:",
        "max_new_tokens:",
        "temperature:",
        "top_k:",
        "top_p:",
        "num_samples:",
        "ignore_eos:",
        "batch_size:",
        "prefix_caching:",
        "continuous_batching:",
        "kv_cache:",
        "experiment_name:",
        "uri:",
    ):
        assert key in text, key
    assert not (tmp_path / "mlruns").exists()  # help runs nothing
