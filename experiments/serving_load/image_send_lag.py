"""Whether an open load with images keeps its schedule: engine=openai encodes each image as a PNG
data URL (43 ms for a 640x640 image on the 2-core box), which must happen ahead of the request's
send time, not in the request loop.

    python -m sweeper.data.replica --n 64 --out /tmp/replica      # 640x480-sized COCO-like JPEGs
    python experiments/serving_load/image_send_lag.py /tmp/replica [--rates 5 10 20] [--repeats 2]

One `vllm serve` of the tiny VLM (started by sweeper's engine, as bench.py starts it); the
replica's first `--count` questions with their images, 4 tokens each (ignore_eos: the server's
work per request stays small), sent through the open loads' request loop
(`sweeper.loads.load.drive`, as a trial sends them) at each rate on a regular schedule. Prints
per rate: the requests/s achieved, the p99 of how late requests left against the schedule (send
lag), the requests' preprocessing (mean: image decode + the client's encoding) and TTFT p50.
REPO=<checkout> measures another checkout's client with the same script (the before/after in
experiments/serving_load/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(os.environ.get("REPO", Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(REPO))  # tests.* (the trial helpers), or another checkout's sweeper

from sweeper.loads.load import drive  # noqa: E402
from sweeper.requests import DecodingParams, ServingParams  # noqa: E402
from tests.conftest import OPENAI_VLLM, cached_engine, compose_trial, trial_requests  # noqa: E402

TOKENS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("replica", type=Path, help="a folder python -m sweeper.data.replica wrote")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--rates", type=float, nargs="+", default=[5.0, 10.0, 20.0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    trial = compose_trial(
        *OPENAI_VLLM,
        "dataset=okvqa",
        f"dataset.questions_file={args.replica}/OpenEnded_mscoco_val2014_questions.json",
        f"dataset.annotations_file={args.replica}/mscoco_val2014_annotations.json",
        f"dataset.image_dir={args.replica}/val2014",
        f"dataset.limit={args.count}",
        "ignore_eos=true",
        f"max_new_tokens={TOKENS}",
    )
    engine = cached_engine(trial)
    requests = trial_requests(trial, engine)  # images decoded: only the client's encoding is left
    sizes = {request.images[0].size for request in requests}
    print(f"{len(requests)} requests, image sizes {sorted(sizes)[:3]}...", flush=True)
    decoding = DecodingParams(max_new_tokens=TOKENS, ignore_eos=True)

    def measure(rate: float) -> str:
        schedule = [index / rate for index in range(len(requests))]
        run = drive(
            engine, iter(requests), decoding, ServingParams(), schedule, None, lambda n: None
        )
        sent = asyncio.run(run)
        window = max(r.done for r in sent) - min(r.sent for r in sent)
        lag = np.percentile([r.ready - r.due for r in sent], 99)
        timings = [r.completion.timing for r in sent]
        preprocess = np.mean([t.preprocess_s for t in timings])  # decode + encode
        ttft = np.median([t.ttft_s for t in timings])
        return (
            f"{len(sent) / window:5.1f} req/s, send lag p99 {lag:6.3f} s, "
            f"preprocess mean {preprocess * 1000:5.1f} ms, TTFT p50 {ttft:6.3f} s"
        )

    measure(args.rates[0])  # warm-up: connections, the server's first images
    for repeat in range(1, args.repeats + 1):
        for rate in args.rates:
            line = measure(rate)
            load = os.getloadavg()[0]
            print(f"{repeat} | {rate:5.1f}/s | load {load:4.1f} | {line}", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
