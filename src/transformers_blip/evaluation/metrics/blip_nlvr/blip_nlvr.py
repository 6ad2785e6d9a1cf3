"""NLVR2 accuracy as an `evaluate` module."""

import datasets
import evaluate

from transformers_blip.evaluation.vqa_accuracy import nlvr_accuracy


class BlipNlvr(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="NLVR2 accuracy in percent: the share of statements judged true or false correctly.",
            citation="",
            inputs_description="predictions: 0 or 1 per statement (1 = true of the image pair). references: labels.",
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references):
        return nlvr_accuracy(predictions, references)
