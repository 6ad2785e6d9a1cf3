"""`blip retrieve`: index a folder of images by their ITC features, then search it with texts or images.

blip retrieve photos/ --model ./retrieval --index photos.safetensors
blip retrieve --model ./retrieval --index photos.safetensors --text "a red car" --text "two dogs" -k 5 --rerank
blip retrieve photos/ --model ./retrieval --index photos.safetensors --image query.jpg --output hits.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import CommandError, add_device_options, add_model_options, load_model, placed, report_failures


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "retrieve",
        help="index images by their ITC features and search them with texts or images",
        description=(
            "Build or update an image index (ITC features in safetensors; re-running embeds only new or changed "
            "images), then rank its images for each query, optionally re-ranking the top k with ITM."
        ),
    )
    parser.add_argument(
        "inputs", nargs="*", help="image files, folders or .txt lists to index (none: search the index as it is)"
    )
    add_model_options(parser)
    parser.add_argument("--index", required=True, help="the index file (.safetensors), created or updated")
    parser.add_argument("--recursive", action="store_true", help="also index the images in subfolders")
    parser.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    parser.add_argument("--image", action="append", default=[], help="an image query (repeatable)")
    parser.add_argument("-k", "--top-k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument(
        "--rerank",
        action="store_true",
        help="re-rank each text query's top k by ITM; scores become ITM match probabilities",
    )
    parser.add_argument("--output", help="write the ranked lists as JSON lines (one query a line) instead of printing")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward when indexing (default 16)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers that decode (default 2)")
    add_device_options(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _check_options(args: argparse.Namespace) -> None:
    if not args.inputs and not args.text and not args.image:
        raise CommandError("nothing to do: give images to index, or --text / --image queries, or both")
    if not args.inputs and not Path(args.index).exists():
        raise CommandError(f"{args.index}: no such index; give the images to index first")
    if args.top_k < 1 or args.batch_size < 1 or args.num_workers < 0:
        raise CommandError("-k and --batch-size must be at least 1, --num-workers at least 0")
    if args.rerank and args.image and not args.text:
        raise CommandError("--rerank re-ranks text queries by ITM; image queries rank by ITC alone")


def _print_ranked(query: dict) -> None:
    print(f"{query['kind']} query: {query['query']}")
    for rank, hit in enumerate(query["results"], start=1):
        print(f"  {rank:3d}  {hit['score']:.4f}  {hit['image']}")


def run(args: argparse.Namespace) -> int:
    from ..atomic_writes import write_text_atomically
    from ..image_processing_blip import ImageDecodeError
    from ..retrieval_index import ImageIndex

    _check_options(args)
    model, processor = load_model(args.model, "retrieval", args.vocab_file)
    placed(model, args)
    failed: list[tuple[str, str]] = []
    try:
        if args.inputs:
            index = ImageIndex.build(
                model,
                processor,
                args.inputs,
                args.index,
                recursive=args.recursive,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                progress=not args.quiet,
            )
            failed += index.failed
            report_failures("retrieve", index.failed)
            summary = f"indexed {len(index)} image(s), {index.embedded} embedded now"
            print(f"blip retrieve: {summary}" + (f", {len(failed)} failed" if failed else "") + f" -> {args.index}")
        else:
            index = ImageIndex.load(args.index)
        queries = []
        for text in args.text:
            hits = index.search(model, processor, text, k=args.top_k, rerank=args.rerank)
            queries.append({"query": text, "kind": "text", "results": [{"image": p, "score": s} for p, s in hits]})
        for image in args.image:
            try:
                hits = index.search_image(model, processor, image, k=args.top_k)
            except (ImageDecodeError, OSError) as error:
                failed.append((image, str(error)))
                report_failures("retrieve", failed[-1:])
                continue
            queries.append({"query": image, "kind": "image", "results": [{"image": p, "score": s} for p, s in hits]})
    except ValueError as error:  # an index of another model, a file that is not an index
        raise CommandError(str(error)) from None
    if args.output is not None:
        write_text_atomically(args.output, "".join(json.dumps(query, ensure_ascii=False) + "\n" for query in queries))
        print(f"blip retrieve: {len(queries)} ranked list(s) -> {args.output}")
    else:
        for query in queries:
            _print_ranked(query)
    sys.stdout.flush()
    return 1 if failed else 0
