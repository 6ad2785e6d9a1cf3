"""The web app: captioning, visual question answering and text-to-image search in the browser, with Gradio.

    blip serve --model Salesforce/blip-image-captioning-base --vqa-model Salesforce/blip-vqa-base
    blip serve --model ./captioner --retrieval-model ./retrieval --index photos.index.safetensors

The work is done by [`BlipApp`], whose methods are plain functions of their inputs (`caption`, `answer`,
`search`), usable and tested without a browser; [`build_interface`] lays them out as a Gradio page, with one tab per
model given. Images are decoded by the processor's own decoder (any mode to RGB, decompression bombs refused) through
the package's pipelines, which also strip the prompt from captions. Gradio is the `[app]` extra
(`pip install transformers-blip[app]`); it is imported only when the page is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .batch_captioning import CaptionSettings
from .pipelines import BlipImageToTextPipeline, BlipVisualQuestionAnsweringPipeline
from .retrieval_index import ImageIndex, model_fingerprint

if TYPE_CHECKING:
    import gradio

SEARCH_RESULTS = 8  # images shown for a query by default
# The released checkpoints a hub Space serves unless its settings name others (see `BlipApp.from_environment`).
DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-base"
DEFAULT_VQA_MODEL = "Salesforce/blip-vqa-base"


class ModelAndProcessor(NamedTuple):
    """A loaded head and the processor saved with it."""

    model: Any
    processor: Any


class BlipApp:
    """What the web app does, without the web: caption an image, answer a question about it, search an index.

    Each service needs its model: a captioner (`BlipForConditionalGeneration`), a VQA model
    (`BlipForQuestionAnswering`), a retrieval model (`BlipForImageTextRetrieval`, or any model with ITC features)
    with the [`ImageIndex`] it built. Those not given are absent from the page; calling one raises a ValueError.
    Images may be paths, encoded bytes or PIL images; one that cannot be decoded raises a ValueError naming it.
    """

    def __init__(
        self,
        captioner: ModelAndProcessor | None = None,
        vqa: ModelAndProcessor | None = None,
        retrieval: ModelAndProcessor | None = None,
        index: ImageIndex | None = None,
    ):
        if (retrieval is None) != (index is None):
            raise ValueError("text-to-image search needs both a retrieval model and the index it built")
        if retrieval is not None and model_fingerprint(*retrieval) != index.fingerprint:
            raise ValueError("the image index was built by another model (or image size) than the retrieval model")
        if captioner is None and vqa is None and retrieval is None:
            raise ValueError("the app needs at least one model: a captioner, a VQA model or a retrieval model")
        self.retrieval = retrieval
        self.index = index
        self._captioner = None
        if captioner is not None:
            self._captioner = BlipImageToTextPipeline(model=captioner.model.eval(), processor=captioner.processor)
        self._vqa = None
        if vqa is not None:
            self._vqa = BlipVisualQuestionAnsweringPipeline(model=vqa.model.eval(), processor=vqa.processor)

    @property
    def services(self) -> list[str]:
        """The services this app offers: some of "caption", "vqa", "search", in that order."""
        offered = {"caption": self._captioner, "vqa": self._vqa, "search": self.index}
        return [name for name, provider in offered.items() if provider is not None]

    def caption(self, image: Any, options: CaptionSettings | None = None) -> list[str]:
        """`options.num_captions` captions of `image` (default options: beam search, 3 beams, 5 to 20 tokens)."""
        if self._captioner is None:
            raise ValueError("no captioning model was loaded (blip serve --model)")
        options = options if options is not None else CaptionSettings()
        _check_caption_options(options)
        if options.do_sample:
            torch.manual_seed(options.seed)  # the same seed gives the same sampled captions
        outputs = self._captioner(_present(image), prompt=options.prompt or None, **options.generate_kwargs())
        return [output["generated_text"] for output in outputs]

    def answer(self, image: Any, question: str, candidates: Sequence[str] | None = None) -> str:
        """The answer to `question` about `image`: generated, or the most likely of `candidates` when given."""
        if self._vqa is None:
            raise ValueError("no VQA model was loaded (blip serve --vqa-model)")
        if not question or not question.strip():
            raise ValueError("ask a question about the image")
        candidates = [candidate.strip() for candidate in candidates or [] if candidate.strip()]
        outputs = self._vqa(image=_present(image), question=question.strip(), candidates=candidates or None)
        return outputs[0]["answer"]

    def search(self, text: str, k: int = SEARCH_RESULTS, rerank: bool = False) -> list[tuple[str, float]]:
        """The `k` indexed images that best match `text`, best first, as `(path, score)`: ITC similarity, or the ITM
        match probability of the ITC top `k` with `rerank`."""
        if self.index is None:
            raise ValueError("no image index was loaded (blip serve --retrieval-model M --index FILE)")
        if not text or not text.strip():
            raise ValueError("describe the image to search for")
        model, processor = self.retrieval
        return self.index.search(model, processor, text.strip(), k=k, rerank=rerank)

    def image_folders(self) -> list[str]:
        """The folders of the indexed images, which the page must be allowed to serve."""
        if self.index is None:
            return []
        return sorted({str(Path(path).resolve().parent) for path in self.index.paths})

    @classmethod
    def load(
        cls,
        model: str | None = None,
        vqa_model: str | None = None,
        retrieval_model: str | None = None,
        index: str | os.PathLike | None = None,
        vocab_file: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> BlipApp:
        """An app of the models named as `from_pretrained` takes them (hub ids, directories of ours or in
        transformers' layout) or original `.pth` files (with `vocab_file`); `index` is a file `blip retrieve`
        wrote with `retrieval_model`. The models run on `device` in `dtype`. A model that cannot be loaded, or does
        not do its job, raises the command line's `CommandError`, naming it."""
        from .cli.common import load_model

        if (retrieval_model is None) != (index is None):  # before any model is loaded
            raise ValueError("text-to-image search needs both a retrieval model and the index it built")

        def loaded(source: str | None, task: str) -> ModelAndProcessor | None:
            if not source:
                return None
            model, processor = load_model(source, task, vocab_file)
            return ModelAndProcessor(model.to(device=device, dtype=dtype), processor)

        return cls(
            captioner=loaded(model, "captioning"),
            vqa=loaded(vqa_model, "vqa"),
            retrieval=loaded(retrieval_model, "retrieval"),
            index=ImageIndex.load(index) if index is not None else None,
        )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> BlipApp:
        """An app of the models named by environment variables, as a hub Space's settings give them:
        `BLIP_CAPTION_MODEL` and `BLIP_VQA_MODEL` (the released base checkpoints by default; set one empty to leave
        its tab out), `BLIP_RETRIEVAL_MODEL` with `BLIP_INDEX` (search, off unless both are set), and
        `BLIP_VOCAB_FILE` for original `.pth` files."""
        environ = os.environ if environ is None else environ
        return cls.load(
            model=environ.get("BLIP_CAPTION_MODEL", DEFAULT_CAPTION_MODEL) or None,
            vqa_model=environ.get("BLIP_VQA_MODEL", DEFAULT_VQA_MODEL) or None,
            retrieval_model=environ.get("BLIP_RETRIEVAL_MODEL") or None,
            index=environ.get("BLIP_INDEX") or None,
            vocab_file=environ.get("BLIP_VOCAB_FILE") or None,
        )


def _present(image: Any) -> Any:
    if image is None or (isinstance(image, (str, bytes)) and not image):
        raise ValueError("no image: upload one")
    return image


def _check_caption_options(options: CaptionSettings) -> None:
    if options.num_captions < 1:
        raise ValueError(f"ask for at least one caption, not {options.num_captions}")
    if options.min_length > options.max_length:
        raise ValueError(f"the minimum length {options.min_length} exceeds the maximum {options.max_length}")
    if options.do_sample and not 0 < options.top_p <= 1:
        raise ValueError(f"top-p must lie in (0, 1], not {options.top_p}")


DECODING_CHOICES = ("beam search", "nucleus sampling")


def import_gradio() -> Any:
    """The `gradio` module, or an ImportError that says how to install it."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError(f"the web app needs Gradio: pip install 'transformers-blip[app]' ({error})") from None
    return gradio


def build_interface(app: BlipApp, title: str = "BLIP") -> gradio.Blocks:
    """The Gradio page of `app`: a tab for each service it offers. Launch it with `launch_interface`."""
    gr = import_gradio()

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"# {title}\nBootstrapping Language-Image Pre-training: captions, answers and search.")
        if "caption" in app.services:
            with gr.Tab("Caption"):
                _caption_tab(gr, app)
        if "vqa" in app.services:
            with gr.Tab("Ask"):
                _vqa_tab(gr, app)
        if "search" in app.services:
            with gr.Tab("Search"):
                _search_tab(gr, app)
    return page


def _caption_tab(gr: Any, app: BlipApp) -> None:
    defaults = CaptionSettings()
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", label="Image", elem_id="caption-image")
            prompt = gr.Textbox(label="Prompt (the caption continues it)", placeholder="a picture of")
            decoding = gr.Radio(list(DECODING_CHOICES), value=DECODING_CHOICES[0], label="Decoding")
            num_beams = gr.Slider(1, 10, value=defaults.num_beams, step=1, label="Beams (beam search)")
            top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p (nucleus sampling)")
            min_length = gr.Slider(1, 60, value=defaults.min_length, step=1, label="Minimum length (tokens)")
            max_length = gr.Slider(2, 80, value=defaults.max_length, step=1, label="Maximum length (tokens)")
            num_captions = gr.Slider(1, 5, value=1, step=1, label="Captions")
            button = gr.Button("Caption", variant="primary", elem_id="caption-button")
        with gr.Column():
            captions = gr.Textbox(label="Captions", lines=5, elem_id="caption-output", interactive=False)

    def run(image, prompt, decoding, num_beams, top_p, min_length, max_length, num_captions) -> str:
        options = CaptionSettings(
            prompt=prompt or "",
            num_beams=int(num_beams),
            do_sample=decoding == DECODING_CHOICES[1],
            top_p=float(top_p),
            repetition_penalty=1.1 if decoding == DECODING_CHOICES[1] else 1.0,  # BLIP's when sampling
            min_length=int(min_length),
            max_length=int(max_length),
            num_captions=int(num_captions),
        )
        return "\n".join(_shown_errors(gr, app.caption, image, options))

    inputs = [image, prompt, decoding, num_beams, top_p, min_length, max_length, num_captions]
    button.click(run, inputs=inputs, outputs=captions, api_name="caption")


def _vqa_tab(gr: Any, app: BlipApp) -> None:
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", label="Image", elem_id="vqa-image")
            question = gr.Textbox(label="Question", placeholder="what colour is the circle?", elem_id="vqa-question")
            candidates = gr.Textbox(label="Candidate answers, one a line (optional: rank these instead)", lines=3)
            button = gr.Button("Answer", variant="primary", elem_id="vqa-button")
        with gr.Column():
            answer = gr.Textbox(label="Answer", elem_id="vqa-answer", interactive=False)

    def run(image, question, candidates) -> str:
        return _shown_errors(gr, app.answer, image, question, (candidates or "").splitlines())

    button.click(run, inputs=[image, question, candidates], outputs=answer, api_name="answer")


def _search_tab(gr: Any, app: BlipApp) -> None:
    gr.Markdown(f"Search {len(app.index)} indexed images by a description.")
    with gr.Row():
        query = gr.Textbox(label="Description", placeholder="a big red circle", elem_id="search-query", scale=4)
        k = gr.Slider(1, 32, value=SEARCH_RESULTS, step=1, label="Results", scale=1)
        rerank = gr.Checkbox(label="Re-rank with ITM", value=False, scale=1)
    button = gr.Button("Search", variant="primary", elem_id="search-button")
    gallery = gr.Gallery(label="Best matches", columns=4, elem_id="search-results")

    def run(query, k, rerank) -> list[tuple[str, str]]:
        hits = _shown_errors(gr, app.search, query, int(k), bool(rerank))
        return [(path, f"{Path(path).name}: {score:.3f}") for path, score in hits]

    button.click(run, inputs=[query, k, rerank], outputs=gallery, api_name="search")


def _shown_errors(gr: Any, function: Any, *args: Any) -> Any:
    """`function(*args)`, with a bad input's message shown on the page instead of a server error."""
    try:
        return function(*args)
    except ValueError as error:
        raise gr.Error(str(error)) from None


def launch_interface(
    app: BlipApp,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
    page: gradio.Blocks | None = None,
    **launch_kwargs: Any,
) -> gradio.Blocks:
    """Serves the page of `app` (`page`, or one `build_interface` builds) at `host:port`, with access to the indexed
    images' folders and nothing else of the disk; `block=False` returns at once with the server running in the
    background (`page.close()` stops it)."""
    gr = import_gradio()
    page = page if page is not None else build_interface(app)
    # The system's fonts, not web fonts: the page loads nothing from outside the server.
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    page.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        allowed_paths=app.image_folders(),
        theme=theme,
        **launch_kwargs,
    )
    return page


__all__ = ["BlipApp", "ModelAndProcessor", "build_interface", "import_gradio", "launch_interface"]
