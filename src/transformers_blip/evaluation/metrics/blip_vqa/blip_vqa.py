"""VQA v2 accuracy by the official evaluation's rules as an `evaluate` module."""

import datasets
import evaluate

from transformers_blip.evaluation.vqa_accuracy import vqa_accuracy

_DESCRIPTION = """VQA accuracy: min(#humans who gave the answer / 3, 1) averaged over the ten leave-one-out subsets,
after the official answer normalisation; the mean over questions, in percent."""
_INPUTS = "predictions: one answer per question. references: the question's human answers (ten in VQA v2)."


class BlipVqa(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        return vqa_accuracy(dict(enumerate(predictions)), dict(enumerate(references)))
