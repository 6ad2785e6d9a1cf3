"""`blip serve`: the web app (captioning, visual question answering, text-to-image search) on a local port.

blip serve --model Salesforce/blip-image-captioning-base --vqa-model Salesforce/blip-vqa-base
blip serve --model ./captioner --retrieval-model ./retrieval --index photos.safetensors --port 8080

The index is the file `blip retrieve photos/ --model ./retrieval --index photos.safetensors` wrote; build it first.
Needs Gradio: `pip install 'transformers-blip[app]'`.
"""

from __future__ import annotations

import argparse

from .common import DTYPES, CommandError, add_device_options


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the web app: caption images, answer questions about them, search an index by text",
        description=(
            "Serve the Gradio web app: a tab for each model given (captioning with --model, questions with "
            "--vqa-model, text-to-image search with --retrieval-model and --index). Each model is a hub id, a "
            "model directory (ours or transformers' BLIP layout) or an original .pth file (with --vocab_file)."
        ),
    )
    parser.add_argument("--model", help="a captioner, for the Caption tab")
    parser.add_argument("--vqa-model", help="a VQA model, for the Ask tab")
    parser.add_argument("--retrieval-model", help="a retrieval model, for the Search tab (with --index)")
    parser.add_argument("--index", help="the image index `blip retrieve` built with --retrieval-model")
    parser.add_argument("--vocab_file", help="bert-base-uncased's vocab.txt, for original .pth models")
    parser.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1; 0.0.0.0: all)"
    )
    parser.add_argument("--port", type=int, default=7860, help="the port to listen on (default 7860)")
    add_device_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..app import BlipApp, import_gradio, launch_interface

    if not (args.model or args.vqa_model or args.retrieval_model):
        raise CommandError("nothing to serve: give --model, --vqa-model or --retrieval-model (with --index)")
    if (args.retrieval_model is None) != (args.index is None):
        raise CommandError("text-to-image search needs both --retrieval-model and --index")
    if not 0 < args.port < 65536:
        raise CommandError(f"--port {args.port} is not a port number")
    try:
        import_gradio()
    except ImportError as error:
        raise CommandError(str(error)) from None
    try:
        app = BlipApp.load(
            model=args.model,
            vqa_model=args.vqa_model,
            retrieval_model=args.retrieval_model,
            index=args.index,
            vocab_file=args.vocab_file,
            device=args.device,
            dtype=DTYPES[args.dtype],
        )
    except (ValueError, RuntimeError) as error:  # an unreadable index, or one made by another model; a bad device
        raise CommandError(str(error)) from None
    print(f"blip serve: {', '.join(app.services)} on http://{args.host}:{args.port}/ (Ctrl+C stops)", flush=True)
    try:
        launch_interface(app, host=args.host, port=args.port, quiet=True)
    except OSError as error:  # the port is taken, or the address cannot be bound
        raise CommandError(f"cannot serve on {args.host}:{args.port} ({error})") from None
    return 0
