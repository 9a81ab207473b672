"""Train the tiny Qwen2.5-VL shipped in `sweeper/assets/tiny_vlm` on easy-VQA (issue 4).

The model is built by `sweeper.models.tiny.build_tiny_vlm` (random weights, BPE tokenizer and
processor), trained on easy-VQA's train split with exactly the prompt the inference engines send
(`sweeper.tasks.base.qa_messages`, answer + `<|im_end|>` as target, loss on the answer tokens only),
then reloaded from disk with `AutoProcessor` + `AutoModelForImageTextToText` and evaluated on all
easy-VQA test questions through `model.generate` with left padding, as the engines call it.

    python experiments/tiny_vlm/train.py --device cuda            # the recorded GPU recipe
    python experiments/tiny_vlm/train.py --eval-only --device cpu --out /tmp/eval
                                                # re-measure the shipped model's table on CPU
    python experiments/tiny_vlm/train.py --device cpu --steps 20 --train-images 64 \
        --eval-limit 64 --out /tmp/tiny --checkpoint /tmp/tiny/ckpt   # a CPU smoke test

Writes `metrics.json`, `training_curve.png` and `eval_table.md` to --out and the checkpoint
(model, generation config, processor, `sweeper_spec.json`) to --checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from sweeper.metrics.vqa import vqa_accuracy
from sweeper.models.tiny import TinyVLMSpec, build_tiny_vlm
from sweeper.tasks.base import extract_answer, qa_messages

QUESTION_TYPES = ("colour", "shape", "yes/no")
MAX_NEW_TOKENS = 8  # every easy-VQA answer is one token + <|im_end|>; slack shows rambling


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="experiments/tiny_vlm", help="metrics, plot and table")
    p.add_argument("--checkpoint", default="sweeper/assets/tiny_vlm", help="trained model dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--images-per-step", type=int, default=48, help="all their questions go along")
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=250, help="steps between curve points")
    p.add_argument("--monitor-size", type=int, default=2000, help="test questions on the curve")
    p.add_argument("--train-images", type=int, default=None, help="use only the first N images")
    p.add_argument("--eval-limit", type=int, default=None, help="final eval on first N questions")
    p.add_argument("--eval-batch", type=int, default=512)
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--eval-only", action="store_true", help="only evaluate the model in --checkpoint"
    )
    shape = TinyVLMSpec()
    p.add_argument("--text-hidden", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--text-intermediate", type=int, default=512)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-depth", type=int, default=6)
    p.add_argument("--vision-intermediate", type=int, default=384)
    p.add_argument("--image-size", type=int, default=shape.image_size)
    p.add_argument("--bpe-vocab-size", type=int, default=shape.bpe_vocab_size)
    return p.parse_args(argv)


def question_type(question: str) -> str:
    """easy-VQA has three kinds of question; the accuracy table is split by them."""
    if not question.startswith("what"):
        return "yes/no"
    return "colour" if "color" in question else "shape"


def load_split(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    import easy_vqa

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        return questions, answers, image_ids, easy_vqa.get_train_image_paths()
    questions, answers, image_ids = easy_vqa.get_test_questions()
    return questions, answers, image_ids, easy_vqa.get_test_image_paths()


@dataclass
class Encoded:
    """Left-padded prompt + answer sequences, ready for the language model (all on one device)."""

    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    labels: torch.Tensor  # (N, L), -100 except on the answer tokens and <|im_end|>
    position_ids: torch.Tensor  # (3, N, L) M-RoPE positions from the model's own get_rope_index

    def to(self, device: str) -> Encoded:
        return Encoded(*(t.to(device) for t in asdict(self).values()))


class Data:
    """Questions of one split with their images preprocessed once by the real image processor.

    Training runs the vision tower once per image (not once per question) and scatters its
    features into every question about that image, so the processor's per-question output is
    rebuilt here: the prompt with `<|image_pad|>` expanded, `mm_token_type_ids`, M-RoPE
    positions. `check_against_processor` asserts it equals what the processor gives.
    """

    def __init__(self, split: str, processor, model, image_limit: int | None, flips: bool):
        questions, answers, image_ids, paths = load_split(split)
        keep = [i for i, img in enumerate(image_ids) if image_limit is None or img < image_limit]
        self.questions = [questions[i] for i in keep]
        self.answers = [answers[i] for i in keep]
        used = sorted({image_ids[i] for i in keep})
        slot = {img: n for n, img in enumerate(used)}
        self.image_slot = torch.tensor([slot[image_ids[i]] for i in keep])
        self.images = [Image.open(paths[img]).convert("RGB") for img in used]
        self.processor = processor
        self.image_token_id = model.config.image_token_id

        # Horizontal mirrors are valid easy-VQA images (the answer never depends on left/right;
        # triangles always point up, so no vertical flips); they ride along as slots n..2n-1.
        pil = self.images + (
            [im.transpose(Image.FLIP_LEFT_RIGHT) for im in self.images] if flips else []
        )
        out = processor.image_processor(images=pil, return_tensors="pt")
        self.grid_thw = out["image_grid_thw"][0]
        self.pixel_values = out["pixel_values"].reshape(len(pil), int(self.grid_thw.prod()), -1)
        self.encoded = self._encode(model)

    def prompt(self, question: str) -> str:
        return self.processor.apply_chat_template(
            qa_messages(question, image=True), add_generation_prompt=True
        )

    def _encode(self, model) -> Encoded:
        tok = self.processor.tokenizer
        merge = model.config.vision_config.spatial_merge_size
        n_image_tokens = int(self.grid_thw.prod()) // merge**2
        pad = "<|image_pad|>"
        rows, label_lens = [], []
        for question, answer in zip(self.questions, self.answers, strict=True):
            prompt = self.prompt(question).replace(pad, pad * n_image_tokens)
            target = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
            rows.append(tok(prompt, add_special_tokens=False)["input_ids"] + target)
            label_lens.append(len(target))
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for n, (row, k) in enumerate(zip(rows, label_lens, strict=True)):
            ids[n, length - len(row) :] = torch.tensor(row)  # left padding, as the engines use
            mask[n, length - len(row) :] = 1
            labels[n, length - k :] = ids[n, length - k :]
        token_types = (ids == self.image_token_id).long()
        grid = self.grid_thw.expand(len(rows), 3)
        positions, _ = model.model.get_rope_index(
            ids, token_types, image_grid_thw=grid, attention_mask=mask
        )
        return Encoded(ids, mask, labels, positions)

    def check_against_processor(self, model, n: int = 4) -> None:
        """The hand-built prompt ids and M-RoPE positions equal the real processor's."""
        for i in range(min(n, len(self.questions))):
            real = self.processor(
                text=[self.prompt(self.questions[i])],
                images=[self.images[int(self.image_slot[i])]],
                return_tensors="pt",
            )
            ids = self.encoded.input_ids[i][self.encoded.labels[i] == -100]
            ids = ids[self.encoded.attention_mask[i][: len(ids)].bool()]
            assert torch.equal(ids, real["input_ids"][0]), "prompt ids differ from the processor's"
            assert torch.equal(
                real["mm_token_type_ids"][0], (real["input_ids"][0] == self.image_token_id).long()
            )
            assert torch.allclose(
                real["pixel_values"], self.pixel_values[int(self.image_slot[i])], atol=1e-6
            )
            pos, _ = model.model.get_rope_index(
                real["input_ids"], real["mm_token_type_ids"], image_grid_thw=real["image_grid_thw"]
            )
            mine = self.encoded.position_ids[:, i][:, self.encoded.attention_mask[i].bool()]
            assert torch.equal(pos[:, 0], mine[:, : pos.shape[-1]]), "M-RoPE positions differ"


def answer_logits(model, pixel_values, grid_thw, slots, enc: Encoded, rows: torch.Tensor):
    """Forward pass of questions `rows`; vision runs once per distinct image in `pixel_values`.

    Mirrors `Qwen2_5_VLModel.forward`: image features replace the `<|image_pad|>` embeddings,
    then the language model runs with the 3-D M-RoPE positions the processor path would give.
    """
    grid = grid_thw.to(pixel_values.device).expand(len(pixel_values), 3)
    features = model.get_image_features(pixel_values.flatten(0, 1), grid).pooler_output
    features = torch.stack(features)[slots]  # (rows, image tokens, hidden)
    ids = enc.input_ids[rows]
    embeds = model.get_input_embeddings()(ids)
    image_mask = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_mask, features.to(embeds.dtype))
    return model(
        inputs_embeds=embeds,
        attention_mask=enc.attention_mask[rows],
        position_ids=enc.position_ids[:, rows],
        labels=enc.labels[rows],
    )


@torch.no_grad()
def monitor_accuracy(
    model,
    pixels: torch.Tensor,
    grid_thw: torch.Tensor,
    image_slot: torch.Tensor,
    enc: Encoded,
    rows: torch.Tensor,
    device: str,
) -> float:
    """Teacher-forced accuracy: every answer token and <|im_end|> is the argmax (= greedy)."""
    model.eval()
    correct = 0
    for chunk in rows.to(device).split(512):
        used, slots = torch.unique(image_slot[chunk], return_inverse=True)
        out = answer_logits(model, pixels[used], grid_thw, slots, enc, chunk)
        labels = enc.labels[chunk][:, 1:]
        hit = (out.logits[:, :-1].argmax(-1) == labels) | (labels == -100)
        correct += int(hit.all(-1).sum())
    model.train()
    return correct / len(rows)


def train(model, train_data: Data, test_data: Data, args: argparse.Namespace) -> dict:
    device = args.device
    enc = train_data.encoded.to(device)
    test_enc = test_data.encoded.to(device)
    test_pixels = test_data.pixel_values.to(device)
    test_slot = test_data.image_slot.to(device)
    pixels = train_data.pixel_values.to(device)
    n_images = len(train_data.images)
    # Questions grouped by image, so a step takes whole images and all their questions.
    order = torch.argsort(train_data.image_slot, stable=True)
    counts = torch.bincount(train_data.image_slot, minlength=n_images)
    starts = torch.cumsum(counts, 0) - counts

    gen = torch.Generator().manual_seed(args.seed)
    monitor_rows = torch.randperm(len(test_data.questions), generator=gen)[: args.monitor_size]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay}],
        lr=args.lr,
        betas=(0.9, 0.98),
        weight_decay=0.0,
    )

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 5% of the peak
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    curve: dict[str, list] = {
        "step": [],
        "loss": [],
        "eval_step": [],
        "monitor_acc": [],
        "elapsed_s": [],
    }
    model.train()
    queue: list[int] = []
    skipped = 0
    start = time.perf_counter()
    for step in range(args.steps):
        if len(queue) < args.images_per_step:
            queue += torch.randperm(n_images, generator=gen).tolist()
        images, queue = queue[: args.images_per_step], queue[args.images_per_step :]
        rows = torch.cat([order[starts[i] : starts[i] + counts[i]] for i in images])
        slots = torch.repeat_interleave(torch.arange(len(images)), counts[images])
        flip = torch.randint(0, 2, (len(images),), generator=gen) * n_images
        chosen = (torch.tensor(images) + flip).to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        out = answer_logits(
            model, pixels[chosen], train_data.grid_thw, slots.to(device), enc, rows.to(device)
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # One non-finite gradient would turn every weight into NaN through Adam's moments
        # (a bf16 first run did exactly that at lr 1e-3); such a step is skipped and counted.
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:
            skipped += 1
        if step % 10 == 0 or step == args.steps - 1:
            curve["step"].append(step)
            curve["loss"].append(out.loss.item())
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            acc = monitor_accuracy(
                model, test_pixels, test_data.grid_thw, test_slot, test_enc, monitor_rows, device
            )
            curve["eval_step"].append(step + 1)
            curve["monitor_acc"].append(acc)
            elapsed = time.perf_counter() - start
            curve["elapsed_s"].append(elapsed)
            print(
                f"step {step + 1:5d}  loss {out.loss.item():.4f}  grad norm {grad_norm:.3f}  "
                f"test acc {acc:.4f}  skipped {skipped}  {elapsed:.0f}s",
                flush=True,
            )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    curve["train_seconds"] = time.perf_counter() - start
    curve["skipped_steps"] = skipped
    return curve


@torch.no_grad()
def generate_answers(model, processor, batches: list, device: str, **generate_kwargs) -> list[str]:
    """Answers through `model.generate` on processor outputs (left padded), as engines do."""
    answers: list[str] = []
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, **generate_kwargs)
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = processor.batch_decode(new, skip_special_tokens=True)
        answers.extend(extract_answer(t) for t in texts)
    return answers


def score(predictions: Sequence[str], answers: Sequence[str], types: Sequence[str]) -> dict:
    """VQA accuracy overall and per question type (one answer: exact match after normalising)."""
    hits = [vqa_accuracy(p, [a]) for p, a in zip(predictions, answers, strict=True)]
    result = {"overall": sum(hits) / len(hits), "n": len(hits)}
    for kind in QUESTION_TYPES:
        kind_hits = [h for h, t in zip(hits, types, strict=True) if t == kind]
        result[kind] = sum(kind_hits) / len(kind_hits) if kind_hits else float("nan")
    return result


def evaluate(checkpoint: Path, args: argparse.Namespace) -> dict:
    """Greedy, temperature 1.5, 3 beams and blank images on the test split, from disk."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
    model.to(args.device).eval()

    questions, answers, image_ids, paths = load_split("test")
    limit = args.eval_limit or len(questions)
    questions, answers, image_ids = questions[:limit], answers[:limit], image_ids[:limit]
    types = [question_type(q) for q in questions]
    images = {i: Image.open(paths[i]).convert("RGB") for i in sorted(set(image_ids))}
    blank = {c: Image.new("RGB", (64, 64), c) for c in ("white", "black")}

    def batches(image_for) -> list:
        out = []
        for s in range(0, len(questions), args.eval_batch):
            idx = range(s, min(s + args.eval_batch, len(questions)))
            text = [
                processor.apply_chat_template(
                    qa_messages(questions[i], image=True), add_generation_prompt=True
                )
                for i in idx
            ]
            out.append(
                processor(
                    text=text, images=[image_for(i) for i in idx], return_tensors="pt", padding=True
                )
            )
        return out

    real = batches(lambda i: images[image_ids[i]])
    greedy = dict(do_sample=False, num_beams=1)
    modes = {
        "greedy": (real, greedy),
        # Pure temperature sampling: top-k/top-p off so only the temperature changes.
        "temperature=1.5 (sampled)": (
            real,
            dict(do_sample=True, temperature=1.5, top_k=0, top_p=1.0),
        ),
        "beam_num=3": (real, dict(do_sample=False, num_beams=3)),
        "greedy, all-white images": (batches(lambda i: blank["white"]), greedy),
        "greedy, all-black images": (batches(lambda i: blank["black"]), greedy),
    }
    results: dict[str, dict] = {}
    for name, (data, kwargs) in modes.items():
        torch.manual_seed(args.seed)  # the sampled row is reproducible too
        start = time.perf_counter()
        predictions = generate_answers(model, processor, data, args.device, **kwargs)
        results[name] = score(predictions, answers, types) | {
            "seconds": time.perf_counter() - start
        }
        print(f"{name:28s} {results[name]['overall']:.4f}", flush=True)

    # Reference rows without the model: what the question text alone can give.
    train_q, train_a, _, _ = load_split("train")
    prior: dict[str, dict[str, int]] = {}
    for q, a in zip(train_q, train_a, strict=True):
        prior.setdefault(q, {}).setdefault(a, 0)
        prior[q][a] += 1
    majority = [max(prior[q], key=prior[q].get) if q in prior else "yes" for q in questions]
    results["question-only prior (no model)"] = score(majority, answers, types)
    results['always "yes" (no model)'] = score(["yes"] * len(questions), answers, types)
    results["counts"] = {kind: types.count(kind) for kind in QUESTION_TYPES}
    return results


def write_table(results: dict, path: Path) -> None:
    counts = results["counts"]
    head = ["decoding", f"overall ({sum(counts.values())})"]
    head += [f"{kind} ({counts[kind]})" for kind in QUESTION_TYPES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results.items():
        if name == "counts":
            continue
        cells = [name] + [f"{row[k]:.4f}" for k in ("overall", *QUESTION_TYPES)]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot_curve(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, loss_ax = plt.subplots(figsize=(7, 4))
    loss_ax.plot(curve["step"], curve["loss"], color="tab:blue", lw=0.8)
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("train loss (answer tokens)", color="tab:blue")
    acc_ax = loss_ax.twinx()
    acc_ax.plot(curve["eval_step"], curve["monitor_acc"], color="tab:red", marker="o", ms=3)
    acc_ax.set_ylabel("test answer accuracy (teacher-forced subset)", color="tab:red")
    acc_ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_and_train(args: argparse.Namespace, checkpoint: Path, out: Path) -> dict:
    """Build the random-weight model, train it and save it to `checkpoint`; the run's record."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    spec = TinyVLMSpec(
        text_hidden=args.text_hidden,
        text_layers=args.text_layers,
        text_intermediate=args.text_intermediate,
        vision_hidden=args.vision_hidden,
        vision_depth=args.vision_depth,
        vision_intermediate=args.vision_intermediate,
        image_size=args.image_size,
        bpe_vocab_size=args.bpe_vocab_size,
        seed=args.seed,
    )
    if checkpoint.exists():
        shutil.rmtree(checkpoint)  # a stale file from another shape must not ship
    build_tiny_vlm(checkpoint, spec)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params:,} parameters, {spec}", flush=True)

    prep = time.perf_counter()
    train_data = Data("train", processor, model, args.train_images, flips=True)
    test_data = Data("test", processor, model, None, flips=False)
    train_data.check_against_processor(model)
    test_data.check_against_processor(model)
    prep_seconds = time.perf_counter() - prep
    print(
        f"{len(train_data.questions)} train questions, prepared in {prep_seconds:.0f}s", flush=True
    )

    model.to(args.device)
    curve = train(model, train_data, test_data, args)
    model.to("cpu").to(getattr(torch, args.save_dtype))
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    plot_curve(curve, out / "training_curve.png")
    return {
        "parameters": params,
        "spec": asdict(spec),
        "prep_seconds": prep_seconds,
        "train_seconds": curve.pop("train_seconds"),
        "skipped_steps": curve.pop("skipped_steps"),
        "curve": curve,
    }


def main(argv: Sequence[str] | None = None) -> None:
    import transformers

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # fp32 weights and activations; TF32 matmuls on the GPU (the model is tiny, so steps are
    # bound by kernel launches, not arithmetic).
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    out, checkpoint = Path(args.out), Path(args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "args": vars(args),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if not args.eval_only:
        record |= build_and_train(args, checkpoint, out)

    start = time.perf_counter()
    results = evaluate(checkpoint, args)
    record |= {
        "checkpoint_bytes": sum(f.stat().st_size for f in checkpoint.iterdir()),
        "eval_seconds": time.perf_counter() - start,
        "results": results,
    }
    write_table(results, out / "eval_table.md")
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    print((out / "eval_table.md").read_text())


if __name__ == "__main__":
    main()
