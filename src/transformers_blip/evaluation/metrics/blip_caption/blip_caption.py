"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) as an `evaluate` module."""

import datasets
import evaluate

from transformers_blip.evaluation.caption_metrics import caption_scores

_DESCRIPTION = """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D as pycocoevalcap computes them, with PTB tokenisation that
runs without Java where Java is absent (METEOR is then left out)."""
_INPUTS = """predictions: one caption per image. references: the image's reference captions.
tokenizer: "auto" (Java's PTBTokenizer where Java is installed), "java" or "python". meteor: None (where Java is
installed), True or False."""


class BlipCaption(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, tokenizer="auto", meteor=None):
        return caption_scores(dict(enumerate(predictions)), dict(enumerate(references)), tokenizer, meteor)
