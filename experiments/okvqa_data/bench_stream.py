"""Stream the full OK-VQA replica through the task's `load` + `prefetch` (decode only, no model).

Reports images/s and whether host memory stays bounded: RSS after the first 100 samples against
the peak over the whole stream (which must not grow with the dataset), plus anonymous RSS
(heap: what the loaders hold) apart from file-backed RSS (page cache of memory-mapped files,
which the kernel can drop; the Hugging Face layout reads images from memory-mapped Arrow data).

Reproduce (generate the replica outside the repository, once):
    python -m sweeper.data.replica --n 5046 --out /tmp/okvqa_replica
    nice -n 10 python experiments/okvqa_data/bench_stream.py --root /tmp/okvqa_replica
    nice -n 10 python experiments/okvqa_data/bench_stream.py --root /tmp/okvqa_replica --layout hf
(`--layout hf` first converts the replica into lmms-lab-style parquet shards under ROOT/hf.)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.data import prefetch
from sweeper.data.okvqa import ANNOTATIONS_FILE, IMAGE_DIR, QUESTIONS_FILE, image_file_name
from sweeper.tasks import task_class
from sweeper.tasks.config import OKVQAConfig, OKVQAHFConfig

MB = 1024 * 1024
WARM_SAMPLES = 100  # the RSS baseline: after the first 100 samples, buffers and queue are full
CHECKPOINT_EVERY = 2500  # RSS is also recorded every this many samples, to show any trend
SHARDS = 8


def _rss() -> tuple[int, int]:
    """(RSS, anonymous RSS) in bytes, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "RssAnon:")):
            name, value, _ = line.split()
            fields[name] = int(value) * 1024
    return fields["VmRSS:"], fields["RssAnon:"]


def _hf_rows(root: Path) -> Iterator[dict[str, Any]]:
    import json

    questions = json.loads((root / QUESTIONS_FILE).read_text())["questions"]
    annotations = json.loads((root / ANNOTATIONS_FILE).read_text())["annotations"]
    by_id = {a["question_id"]: a for a in annotations}
    for question in questions:
        annotation = by_id[question["question_id"]]
        image = root / IMAGE_DIR / image_file_name(question["image_id"])
        yield {
            "question_id": str(question["question_id"]),
            "image": {"bytes": image.read_bytes(), "path": image.name},
            "question": question["question"],
            "answers": [a["answer"] for a in annotation["answers"]],
            "question_type": annotation["question_type"],
            "answer_type": annotation["answer_type"],
        }


def _write_parquet(root: Path) -> Path:
    """lmms-lab-style shards of the replica (written once, streamed: bounded memory)."""
    from datasets import Dataset

    from sweeper.data.okvqa_hf import okvqa_hf_features

    folder = root / "hf" / "data"
    if folder.exists():
        return folder.parent
    features = okvqa_hf_features()
    build_cache = root / "hf-build-cache"
    dataset = Dataset.from_generator(
        _hf_rows, gen_kwargs={"root": root}, features=features, cache_dir=str(build_cache)
    )
    folder.mkdir(parents=True)
    for index in range(SHARDS):
        shard = dataset.shard(SHARDS, index, contiguous=True)
        shard.to_parquet(str(folder / f"val2014-{index:05d}-of-{SHARDS:05d}.parquet"))
    shutil.rmtree(build_cache)
    return folder.parent


@dataclass
class Result:
    layout: str
    samples: int
    load_s: float
    stream_s: float
    decode_ms: float
    rss_100: int
    rss_peak: int
    anon_100: int
    anon_peak: int
    rss_at: dict[int, int]

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("layout", self.layout),
            ("samples streamed", str(self.samples)),
            ("task load (parse + header checks)", f"{self.load_s:.1f} s"),
            ("stream wall time", f"{self.stream_s:.1f} s"),
            ("images/s", f"{self.samples / self.stream_s:.1f}"),
            ("decode per image (mean)", f"{self.decode_ms:.1f} ms"),
            (f"RSS after {WARM_SAMPLES} samples", f"{self.rss_100 / MB:.0f} MiB"),
            ("peak RSS while streaming", f"{self.rss_peak / MB:.0f} MiB"),
            ("RSS growth (peak - after 100)", f"{(self.rss_peak - self.rss_100) / MB:+.0f} MiB"),
            (f"anonymous RSS after {WARM_SAMPLES}", f"{self.anon_100 / MB:.0f} MiB"),
            ("peak anonymous RSS", f"{self.anon_peak / MB:.0f} MiB"),
            ("anonymous growth", f"{(self.anon_peak - self.anon_100) / MB:+.0f} MiB"),
            (
                "RSS at samples " + ", ".join(str(n) for n in self.rss_at),
                ", ".join(f"{rss / MB:.0f}" for rss in self.rss_at.values()) + " MiB",
            ),
        ]


def bench(cfg: Any, layout: str, passes: int) -> Result:
    start = time.perf_counter()
    samples, report = task_class(cfg)(cfg).load()
    load_s = time.perf_counter() - start
    samples = samples * passes  # more passes: a longer stream, to see whether memory creeps
    rss_100 = anon_100 = rss_peak = anon_peak = 0
    rss_at = {}
    decode_s = 0.0
    count = 0
    start = time.perf_counter()
    for item in prefetch(samples, cfg.prefetch, report):
        count += 1
        decode_s += item.decode_s
        rss, anon = _rss()
        rss_peak, anon_peak = max(rss_peak, rss), max(anon_peak, anon)
        if count == WARM_SAMPLES:
            rss_100, anon_100 = rss, anon
        if count == WARM_SAMPLES or count % CHECKPOINT_EVERY == 0:
            rss_at[count] = rss
    stream_s = time.perf_counter() - start
    assert not report.skipped, report.skipped
    return Result(
        layout=layout,
        samples=count,
        load_s=load_s,
        stream_s=stream_s,
        decode_ms=1000 * decode_s / count,
        rss_100=rss_100,
        rss_peak=rss_peak,
        anon_100=anon_100,
        anon_peak=anon_peak,
        rss_at=rss_at,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="replica folder")
    parser.add_argument("--layout", choices=("official", "hf"), default="official")
    parser.add_argument("--prefetch", type=int, default=16, help="decoded images kept ready")
    parser.add_argument("--passes", type=int, default=1, help="stream the dataset this often")
    args = parser.parse_args()
    if args.layout == "official":
        cfg = OKVQAConfig(
            questions_file=str(args.root / QUESTIONS_FILE),
            annotations_file=str(args.root / ANNOTATIONS_FILE),
            image_dir=str(args.root / IMAGE_DIR),
            prefetch=args.prefetch,
        )
    else:
        hf = _write_parquet(args.root)
        cfg = OKVQAHFConfig(
            path=str(hf), cache_dir=str(args.root / "hf-cache"), prefetch=args.prefetch
        )
    result = bench(cfg, args.layout, args.passes)
    cpu = platform.processor() or platform.machine()
    print(f"{args.root}, prefetch {args.prefetch}, {os.cpu_count()} CPUs ({cpu})\n")
    print("| measure | value |\n|---|---|")
    for name, value in result.rows():
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
