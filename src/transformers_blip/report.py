"""`make demo`'s report: what the models of a pretraining run do on held-out data of the synthetic benchmark, as an
HTML page with its images, its metrics and plots of the training.

    results = demo_results("outputs/demo/pretrain", "outputs/demo", vqa_dir="outputs/demo/vqa")
    page = write_report(results, "outputs/demo/pretrain/trainer_state.json", "outputs/demo/report")

`demo_results` turns the pretraining run into its task heads (a captioner from its decoder, a retrieval model from
its encoders and, unless a fine-tuned VQA model is given, a VQA model from both), saves each with its processor, and
uses them as a user would: captions through `pipeline("image-to-text")`, answers through
`pipeline("visual-question-answering")` ranking the training answers, and text-to-image search over an
[`ImageIndex`] of the held-out images, queried with each image's first reference caption.

The metrics are numbers a test can hold to thresholds: how many of the colours and shapes a caption names are in
the image (from its references, with the benchmark's own synonyms), together and each kind apart, how many captions
name no wrong colour or shape, VQA accuracy, and text-to-image recall of the queries, beside the pretraining's
held-out ITC recall. Every
file is written atomically; `metrics.json` beside the page holds the same numbers.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .atomic_writes import atomic_directory, write_bytes_atomically, write_text_atomically
from .benchmark.language import COLOR_WORDS, SHAPE_WORDS

# The losses and the learning rate the pretraining logs, plotted in this order.
PRETRAINING_LOSSES = {"loss_itc": "ITC", "loss_itm": "ITM", "loss_lm": "LM"}
SEARCH_HITS = 5  # images listed per retrieval query


@dataclass
class CaptionResult:
    """A held-out image, its generated caption and references; `named` are the canonical colours and shapes the
    caption names, `wrong` those of them no reference names."""

    image: str
    caption: str
    references: list[str]
    named: list[str]
    wrong: list[str]


@dataclass
class AnswerResult:
    """A held-out question, the model's answer, the humans' answers (ten, repeats included: VQA accuracy counts
    them) and the answer's VQA accuracy (0 to 1)."""

    image: str
    question: str
    answer: str
    human_answers: list[str]
    accuracy: float


@dataclass
class RetrievalResult:
    """A text query (an image's first reference), the image it describes, the best hits `(image, ITC score)` and the
    rank of the described image among all held-out images (1 is best)."""

    query: str
    target: str
    hits: list[tuple[str, float]]
    target_rank: int


@dataclass
class DemoResults:
    """Everything the report shows. Image fields are file names relative to the report's folder."""

    captions: list[CaptionResult] = field(default_factory=list)
    answers: list[AnswerResult] = field(default_factory=list)
    retrieval: list[RetrievalResult] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- caption scoring
def _attribute_patterns() -> list[tuple[str, re.Pattern]]:
    """(canonical name, whole-word pattern of one of its words), longest words first so "plus sign" wins."""
    words = [
        (name, word)
        for vocabulary in (COLOR_WORDS, SHAPE_WORDS)
        for name, synonyms in vocabulary.items()
        for word in synonyms
    ]
    words.sort(key=lambda pair: -len(pair[1]))
    return [(name, re.compile(rf"\b{re.escape(word)}(?:e?s)?\b")) for name, word in words]


_ATTRIBUTES = _attribute_patterns()


def named_attributes(text: str) -> set[str]:
    """The colours and shapes `text` names, by their canonical benchmark names ("violet" -> "purple", "plus sign"
    -> "cross"); plurals count."""
    text = text.lower()
    found = set()
    for name, pattern in _ATTRIBUTES:
        if pattern.search(text):
            found.add(name)
            text = pattern.sub(" ", text)  # "plus sign" is not read again as anything shorter
    return found


def score_caption(caption: str, references: Sequence[str]) -> tuple[list[str], list[str]]:
    """`(named, wrong)`: the colours and shapes `caption` names, and those of them no reference names."""
    named = named_attributes(caption)
    in_image = set().union(*(named_attributes(reference) for reference in references))
    return sorted(named), sorted(named - in_image)


# ------------------------------------------------------------------------------------------------------ metrics
def summary_metrics(results: DemoResults, held_out_recall: dict[str, float] | None = None) -> dict[str, float]:
    """The report's numbers (percentages) from its rows, plus the pretraining's held-out ITC recall if given."""
    metrics: dict[str, float] = {}
    if results.captions:
        for kind, vocabulary in (("attribute", None), ("colour", COLOR_WORDS), ("shape", SHAPE_WORDS)):
            named = [_kept(row.named, vocabulary) for row in results.captions]
            wrong = [_kept(row.wrong, vocabulary) for row in results.captions]
            num_named, num_wrong = sum(map(len, named)), sum(map(len, wrong))
            metrics[f"caption_{kind}_precision"] = 100.0 * (num_named - num_wrong) / num_named if num_named else 0.0
            right = sum(1 for image_named, image_wrong in zip(named, wrong) if image_named and not image_wrong)
            label = "captions_without_wrong_attributes" if vocabulary is None else f"captions_with_right_{kind}s"
            metrics[label] = 100.0 * right / len(results.captions)
    if results.answers:
        metrics["vqa_accuracy"] = 100.0 * sum(row.accuracy for row in results.answers) / len(results.answers)
    if results.retrieval:
        ranks = [row.target_rank for row in results.retrieval]
        metrics["text_to_image_r1"] = 100.0 * sum(rank <= 1 for rank in ranks) / len(ranks)
        metrics[f"text_to_image_r{SEARCH_HITS}"] = 100.0 * sum(rank <= SEARCH_HITS for rank in ranks) / len(ranks)
        metrics["text_to_image_chance_r1"] = 100.0 / len(ranks)
    for name, value in (held_out_recall or {}).items():
        metrics[f"pretraining_itc_{name}"] = float(value)
    return metrics


def _kept(attributes: Sequence[str], vocabulary: dict | None) -> list[str]:
    """The attributes of one kind (a vocabulary's canonical names), or all of them."""
    return list(attributes) if vocabulary is None else [name for name in attributes if name in vocabulary]


# ----------------------------------------------------------------------------------------------------- the runs
def demo_results(
    pretrain_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    vqa_dir: str | os.PathLike | None = None,
    num_images: int = 8,
    num_questions: int = 8,
    seed: int = 0,
    image_size: int = 48,
    progress: bool = True,
) -> DemoResults:
    """Runs the heads of the pretraining run in `pretrain_dir` on held-out data (see the module docstring).

    The heads are saved under `output_dir/models/`, the held-out images under `output_dir/report/images/`.
    `vqa_dir` is a fine-tuned VQA run (finetune_vqa.py's output); without one the VQA model is the pretraining's
    encoders and decoder, untrained for questions. The held-out data are the benchmark's first `num_images` test
    images and `num_questions` VQA test questions for `seed` (records depend only on the seed and their index, so
    these are the pretraining's and the VQA run's own held-out data) at `image_size`.
    """
    from transformers import AutoTokenizer

    from .benchmark import build_synthetic_benchmark
    from .processing_blip import build_processor

    pretrain_dir, output_dir = Path(pretrain_dir), Path(output_dir)
    run = _DemoRun(
        pretrain_dir=pretrain_dir,
        models_dir=output_dir / "models",
        report_dir=output_dir / "report",
        processor=build_processor(AutoTokenizer.from_pretrained(pretrain_dir), image_size=image_size),
        progress=progress,
    )
    held_out = build_synthetic_benchmark(
        seed=seed, image_size=image_size, num_human=1, num_web=1, num_val=1, num_test=num_images,
        num_vqa=max(300, num_questions), num_vqa_test=num_questions, num_nlvr=1,
    )  # fmt: skip
    results = DemoResults()
    image_files = [
        _write_png(image, run.report_dir / "images" / f"test_{index:03d}.png")
        for index, image in enumerate(held_out["test"]["image"])
    ]
    results.captions = run.captions(image_files, held_out["test"]["captions"])
    results.answers = run.answers(held_out["vqa_train"], held_out["vqa_test"], vqa_dir)
    results.retrieval = run.searches(image_files, [captions[0] for captions in held_out["test"]["captions"]])

    recall_file = pretrain_dir / "held_out_results.json"
    recall = json.loads(recall_file.read_text()) if recall_file.exists() else None
    results.metrics = summary_metrics(results, recall)
    vqa_metrics = Path(vqa_dir) / "metrics.json" if vqa_dir is not None else None
    if vqa_metrics is not None and vqa_metrics.exists():
        test_accuracy = json.loads(vqa_metrics.read_text()).get("test_accuracy")
        if test_accuracy is not None:
            results.metrics["vqa_fine_tuning_test_accuracy"] = float(test_accuracy)
    return results


@dataclass
class _DemoRun:
    """Where a demo's heads come from and go, and what each task does with them."""

    pretrain_dir: Path
    models_dir: Path
    report_dir: Path
    processor: Any
    progress: bool

    def _saved(self, model: Any, processor: Any, name: str) -> str:
        """Saves a head with its processor under `models_dir/name`, whole or not at all; returns the directory."""
        with atomic_directory(self.models_dir / name, overwrite=True) as staging:
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
        return str(self.models_dir / name)

    def _bar(self, items: Sequence, description: str) -> Any:
        return tqdm(items, desc=description, disable=not self.progress)

    def captions(self, image_files: Sequence[Path], references: Sequence[list[str]]) -> list[CaptionResult]:
        """Each image's caption from the pretraining's decoder, through transformers' `image-to-text` pipeline."""
        from transformers import pipeline

        from .convert.pretraining import task_head_from_pretraining
        from .modeling_blip import BlipForConditionalGeneration

        captioner = task_head_from_pretraining(BlipForConditionalGeneration, self.pretrain_dir)
        captioner_dir = self._saved(captioner, self.processor, "captioner")
        pipe = pipeline("image-to-text", model=captioner_dir, trust_remote_code=True)
        rows = []
        for image_file, image_references in zip(self._bar(image_files, "Captioning held-out images"), references):
            caption = pipe(str(image_file), max_length=40)[0]["generated_text"]
            named, wrong = score_caption(caption, image_references)
            rows.append(CaptionResult(self._relative(image_file), caption, list(image_references), named, wrong))
        return rows

    def answers(self, train: Any, test: Any, vqa_dir: str | os.PathLike | None) -> list[AnswerResult]:
        """Each test question's answer, ranked among the training answers through the `visual-question-answering`
        pipeline, by the fine-tuned model in `vqa_dir` or else by the pretraining's encoders and decoder."""
        from transformers import AutoTokenizer, pipeline

        from .convert.pretraining import task_head_from_pretraining
        from .evaluation.vqa_accuracy import vqa_question_accuracy
        from .modeling_blip import BlipForQuestionAnswering
        from .processing_blip import build_processor
        from .training.vqa import candidate_answers

        if vqa_dir is not None:
            model = BlipForQuestionAnswering.from_pretrained(vqa_dir)
            image_size = self.processor.image_processor.size.height
            processor = build_processor(AutoTokenizer.from_pretrained(vqa_dir), image_size=image_size)
        else:
            model, processor = task_head_from_pretraining(BlipForQuestionAnswering, self.pretrain_dir), self.processor
        pipe = pipeline(
            "visual-question-answering", model=self._saved(model, processor, "vqa"), trust_remote_code=True
        )
        candidates = candidate_answers(None, train)
        rows = []
        for index, row in enumerate(self._bar(test, "Answering held-out questions")):
            image_file = _write_png(row["image"], self.report_dir / "images" / f"vqa_{index:03d}.png")
            answer = pipe(image=str(image_file), question=row["question"], candidates=candidates)[0]["answer"]
            accuracy = vqa_question_accuracy(answer, row["answers"])
            rows.append(AnswerResult(self._relative(image_file), row["question"], answer, row["answers"], accuracy))
        return rows

    def searches(self, image_files: Sequence[Path], queries: Sequence[str]) -> list[RetrievalResult]:
        """Text-to-image search over an index of `image_files` by the pretraining's ITC encoders, one query per
        image (its description), with the rank of the image it describes."""
        from .convert.pretraining import task_head_from_pretraining
        from .modeling_blip import BlipForImageTextRetrieval
        from .retrieval_index import ImageIndex

        model = task_head_from_pretraining(BlipForImageTextRetrieval, self.pretrain_dir)
        self._saved(model, self.processor, "retrieval")
        index_path = self.models_dir / "held_out.index.safetensors"
        paths = [str(path) for path in image_files]
        index = ImageIndex.build(model, self.processor, paths, index_path, progress=self.progress)
        rows = []
        for image_file, query in zip(self._bar(paths, "Searching by text"), queries):
            ranked = index.search(model, self.processor, query, k=len(index))  # every image, best first
            hits = [(self._relative(path), score) for path, score in ranked[:SEARCH_HITS]]
            rank = [path for path, _ in ranked].index(image_file) + 1
            rows.append(RetrievalResult(query, self._relative(image_file), hits, rank))
        return rows

    def _relative(self, path: str | os.PathLike) -> str:
        """`path` as the page links it: relative to the report's folder."""
        return Path(os.path.relpath(Path(path).resolve(), self.report_dir.resolve())).as_posix()


def _write_png(image, path: Path) -> Path:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    write_bytes_atomically(path, buffer.getvalue())
    return path


# --------------------------------------------------------------------------------------------------- the curves
def training_curves(trainer_state: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """`{name: (steps, values)}` of each pretraining loss and the learning rate in a Trainer's `trainer_state.json`
    (its `log_history`, one entry per logging step)."""
    try:
        history = json.loads(Path(trainer_state).read_text())["log_history"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{trainer_state}: not a Trainer state with a log history ({error})") from None
    curves = {}
    for name in (*PRETRAINING_LOSSES, "learning_rate"):
        logged = [(entry["step"], float(entry[name])) for entry in history if name in entry and "step" in entry]
        if not logged:
            raise ValueError(f"{trainer_state}: the log history has no {name!r}")
        curves[name] = ([step for step, _ in logged], [value for _, value in logged])
    return curves


def plot_curves(
    curves: dict[str, tuple[list[int], list[float]]],
    path: str | os.PathLike,
    names: Sequence[str],
    titles: Sequence[str],
) -> Path:
    """A PNG at `path` with one panel per curve of `names`, side by side."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display needed

    figure = Figure(figsize=(4.2 * len(names), 3.2), layout="constrained")
    for position, (name, title) in enumerate(zip(names, titles), start=1):
        axes = figure.add_subplot(1, len(names), position)
        steps, values = curves[name]
        axes.plot(steps, values, marker="o", markersize=3)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return write_bytes_atomically(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------- the page
def write_report(
    results: DemoResults, trainer_state: str | os.PathLike, report_dir: str | os.PathLike, title: str = "BLIP demo"
) -> Path:
    """Writes `index.html`, `metrics.json` and the training plots into `report_dir` (which holds the results'
    images) and returns the page's path."""
    report_dir = Path(report_dir)
    curves = training_curves(trainer_state)
    plot_curves(
        curves,
        report_dir / "losses.png",
        list(PRETRAINING_LOSSES),
        [f"{label} loss" for label in PRETRAINING_LOSSES.values()],
    )
    plot_curves(curves, report_dir / "learning_rate.png", ["learning_rate"], ["learning rate"])
    write_text_atomically(report_dir / "metrics.json", json.dumps(results.metrics, indent=2) + "\n")
    write_text_atomically(report_dir / "results.json", json.dumps(asdict(results), indent=2) + "\n")
    return write_text_atomically(report_dir / "index.html", _page(results, title))


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border-bottom: 1px solid #ddd; padding: .4em .6em; }
th { text-align: left; } img.scene { width: 96px; height: 96px; image-rendering: pixelated; }
.wrong { color: #b00; font-weight: bold; } .target { outline: 3px solid #2a2; } .muted { color: #777; }
.hit { display: inline-block; text-align: center; margin-right: .5em; font-size: .8em; }
"""


def _page(results: DemoResults, title: str) -> str:
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    parts += _metrics_section(results.metrics)
    parts += _captions_section(results.captions)
    parts += _answers_section(results.answers)
    parts += _retrieval_section(results.retrieval)
    parts += [
        "<h2>Pretraining</h2><p>Each loss and the learning rate, as the Trainer logged them.</p>",
        "<img src='losses.png' alt='ITC, ITM and LM losses'><br>",
        "<img src='learning_rate.png' alt='learning rate'>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _image(source: str, css_class: str = "scene") -> str:
    return f"<img class='{css_class}' src='{html.escape(source)}' alt=''>"


def _metrics_section(metrics: dict[str, float]) -> list[str]:
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{value:.1f}</td></tr>" for name, value in metrics.items())
    return ["<h2>Metrics (%)</h2>", f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"]


def _captions_section(captions: Sequence[CaptionResult]) -> list[str]:
    rows = []
    for row in captions:
        wrong = f"<br><span class='wrong'>not in the image: {', '.join(row.wrong)}</span>" if row.wrong else ""
        references = "<br>".join(html.escape(reference) for reference in row.references[:2])
        rows.append(
            f"<tr><td>{_image(row.image)}</td><td>{html.escape(row.caption)}{wrong}</td>"
            f"<td class='muted'>{references}</td></tr>"
        )
    header = "<tr><th>image</th><th>generated caption</th><th>two of its references</th></tr>"
    return ["<h2>Captions of held-out images</h2>", f"<table>{header}{''.join(rows)}</table>"]


def _answers_section(answers: Sequence[AnswerResult]) -> list[str]:
    rows = [
        f"<tr><td>{_image(row.image)}</td><td>{html.escape(row.question)}</td><td>{html.escape(row.answer)}</td>"
        f"<td class='muted'>{html.escape(_counted(row.human_answers))}</td><td>{row.accuracy:.2f}</td></tr>"
        for row in answers
    ]
    header = "<tr><th>image</th><th>question</th><th>answer</th><th>human answers</th><th>accuracy</th></tr>"
    return ["<h2>Questions about held-out images</h2>", f"<table>{header}{''.join(rows)}</table>"]


def _counted(answers: Sequence[str]) -> str:
    """ "red x7, orange x3": each distinct answer with how many gave it, most first."""
    return ", ".join(f"{answer} x{count}" for answer, count in Counter(answers).most_common())


def _retrieval_section(retrieval: Sequence[RetrievalResult]) -> list[str]:
    rows = []
    for row in retrieval:
        hits = "".join(
            f"<span class='hit'>{_image(path, 'scene target' if path == row.target else 'scene')}"
            f"<br>{score:.3f}</span>"
            for path, score in row.hits
        )
        rows.append(
            f"<tr><td>{html.escape(row.query)}</td><td>{_image(row.target)}</td><td>{row.target_rank}</td>"
            f"<td>{hits}</td></tr>"
        )
    header = "<tr><th>query</th><th>described image</th><th>its rank</th><th>best matches (ITC similarity)</th></tr>"
    return ["<h2>Text-to-image search over the held-out images</h2>", f"<table>{header}{''.join(rows)}</table>"]


__all__ = [
    "AnswerResult",
    "CaptionResult",
    "DemoResults",
    "RetrievalResult",
    "demo_results",
    "named_attributes",
    "plot_curves",
    "score_caption",
    "summary_metrics",
    "training_curves",
    "write_report",
]
