"""Image-text retrieval recall@1/5/10 both ways as an `evaluate` module."""

import datasets
import evaluate
import torch

from transformers_blip.evaluation.retrieval_metrics import retrieval_recall

_INPUTS = """One example per text. predictions: the text's scores of every image (its row of the (T, I)
text-to-image matrix). references: the index of the text's image. score_i2t (optional, at compute): the (I, T)
image-to-text matrix, which differs from the transpose after ITM re-ranking; the transpose by default."""


class BlipRetrieval(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Recall@K of image-to-text (txt_r*) and text-to-image (img_r*) retrieval, and their means.",
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, score_i2t=None):
        score_t2i = torch.as_tensor(predictions, dtype=torch.float32)
        score_i2t = score_t2i.T if score_i2t is None else torch.as_tensor(score_i2t, dtype=torch.float32)
        return retrieval_recall(score_i2t, score_t2i, torch.as_tensor(references))
