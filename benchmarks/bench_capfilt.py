"""CapFilt throughput: our `bootstrap` against what users script today with transformers' own BLIP classes.

BLIP base (ViT-B/16, BERT-base text models, 384px) with random weights, the same tensors in both: the reference
captions each image alone with transformers' `BlipForConditionalGeneration` (beam search, 3 beams, the original's
10 to 30 tokens, prompt "a picture of ") and scores the web caption and the synthetic one with transformers'
`BlipForImageTextRetrieval`, pair by pair (one ITM and one ITC forward each, as its API has it). Ours runs
`transformers_blip.capfilt.bootstrap` on the same images: batched, the image's cross-attention keys/values once for
its beams and for its texts, and writes the parquet shards, scores and manifest. Images are the synthetic benchmark's
web split. The threshold is the median ITM probability of the reference's web captions, so that texts are both kept
and removed. The script checks that both keep the same (image, source, text) records with scores equal to 1e-4, and
exits non-zero otherwise.

    python benchmarks/bench_capfilt.py [--images 4] [--batch-size 8] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from transformers_blip import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, build_processor
from transformers_blip.benchmark import build_synthetic_benchmark
from transformers_blip.capfilt import CapFiltSettings, bootstrap, dataset_shards, iter_scores
from transformers_blip.data.text import pre_caption
from transformers_blip.modeling_blip import replace_first_token
from transformers_blip.processing_blip import build_tokenizer, text_config_token_kwargs

BERT_SPECIAL = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOLERANCE = 1e-4


def full_size_tokenizer(captions: list[str], directory: Path):
    """A tokenizer with bert-base-uncased's size and special ids: the captions' words, then filler words."""
    words = sorted({word for caption in captions for word in pre_caption(caption, 50).split()})
    fillers = [f"tok{index}" for index in range(30522 - len(BERT_SPECIAL) - len(words))]
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join([*BERT_SPECIAL, *words, *fillers]) + "\n", encoding="utf-8")
    return build_tokenizer(vocab_file=str(vocab_file))


def build_models(tokenizer, seed: int = 0):
    config = BlipConfig(text_config=text_config_token_kwargs(tokenizer))  # the base model at 384px
    torch.manual_seed(seed)
    ours = BlipForConditionalGeneration(config).eval(), BlipForImageTextRetrieval(config).eval()
    their_config = transformers.BlipConfig.from_dict(config.to_transformers_dict())
    theirs = (
        transformers.BlipForConditionalGeneration(their_config),
        transformers.BlipForImageTextRetrieval(their_config),
    )
    for our_model, their_model in zip(ours, theirs):
        their_model.load_state_dict(our_model.state_dict(), strict=False)
        their_model.eval()
    return ours, theirs


@torch.inference_mode()
def reference_scores(theirs, processor, web, settings: CapFiltSettings) -> list[dict]:
    """Every (image, text) score as a user's loop with transformers' classes computes it, one image at a time."""
    captioner, filter_model = theirs
    tokenizer = processor.tokenizer
    prompt_ids = tokenizer(["a picture of "], return_tensors="pt").input_ids
    scores = []
    for row in web:
        image, web_caption, key = row["image"], row["caption"], row["image_id"]
        pixel_values = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        generated = captioner.generate(
            pixel_values=pixel_values,
            input_ids=prompt_ids.clone(),
            num_beams=settings.num_beams,
            max_length=settings.max_length,
            min_length=settings.min_length,
        )
        synthetic = processor.decode_captions(generated, prompt="a picture of ")[0]
        for source, text in (("web", pre_caption(web_caption, 30)), ("synthetic", pre_caption(synthetic, 30))):
            tokens = tokenizer([text], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            enc_ids = replace_first_token(tokens.input_ids, tokenizer.convert_tokens_to_ids("[ENC]"))
            itm = filter_model(
                input_ids=enc_ids, pixel_values=pixel_values, attention_mask=tokens.attention_mask, use_itm_head=True
            ).itm_score
            itc = filter_model(
                input_ids=tokens.input_ids, pixel_values=pixel_values, attention_mask=tokens.attention_mask,
                use_itm_head=False,
            ).itm_score  # fmt: skip
            scores.append(
                {"key": str(key), "source": source, "text": text, "itm_score": itm.softmax(-1)[0, 1].item(),
                 "itc_similarity": itc[0, 0].item()}
            )  # fmt: skip
    return scores


def compare(reference: list[dict], ours: list[dict], threshold: float) -> tuple[bool, float]:
    """Whether both keep the same records (scores within TOLERANCE, no score that close to the threshold)."""
    if [(s["key"], s["source"], s["text"]) for s in reference] != [(s["key"], s["source"], s["text"]) for s in ours]:
        return False, float("inf")
    worst = max(
        max(abs(a["itm_score"] - b["itm_score"]), abs(a["itc_similarity"] - b["itc_similarity"]))
        for a, b in zip(reference, ours)
    )
    same_decisions = all((a["itm_score"] >= threshold) == b["kept"] for a, b in zip(reference, ours))
    return worst <= TOLERANCE and same_decisions, worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    web = build_synthetic_benchmark(
        num_human=1, num_web=args.images, num_val=1, num_test=1, num_vqa=3, num_nlvr=1, image_size=64
    )["web"].select_columns(["image", "caption", "image_id"])
    with tempfile.TemporaryDirectory() as scratch:
        processor = build_processor(full_size_tokenizer(list(web["caption"]), Path(scratch)), image_size=384)
        ours, theirs = build_models(processor.tokenizer)
        settings = CapFiltSettings(decoding="beam", num_captions=1)
        print(f"BLIP base, 384px, {args.images} images, beam 3, {torch.get_num_threads()} threads")

        start = time.perf_counter()
        reference = reference_scores(theirs, processor, web, settings)
        their_time = time.perf_counter() - start
        settings.threshold = statistics.median(s["itm_score"] for s in reference if s["source"] == "web")

        start = time.perf_counter()
        summary = bootstrap(
            dataset_shards(web, shard_size=args.images), ours[0], processor, ours[1], processor,
            Path(scratch) / "out", settings, batch_size=args.batch_size, num_workers=args.num_workers,
            progress=False,
        )  # fmt: skip
        our_time = time.perf_counter() - start
        identical, worst = compare(reference, list(iter_scores(Path(scratch) / "out")), settings.threshold)

    their_rate, our_rate = args.images / their_time, args.images / our_time
    print(f"{'':<28} {'images/s':>9} {'seconds':>8}")
    print(f"{'transformers, one by one':<28} {their_rate:>9.3f} {their_time:>8.1f}")
    print(f"{'ours, bootstrap':<28} {our_rate:>9.3f} {our_time:>8.1f}")
    kept = f"kept {summary.records} of {2 * args.images} texts at threshold {settings.threshold:.4f}"
    print(
        f"ratio {our_rate / their_rate:.2f}x; {kept}; identical records: {identical} (largest difference {worst:.1e})"
    )
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
