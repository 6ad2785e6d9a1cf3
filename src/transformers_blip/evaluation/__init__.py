"""Evaluation of BLIP models: the field's metrics (caption scores, retrieval recall, VQA and NLVR2 accuracy, each
also an offline `evaluate` module), BLIP's retrieval evaluation (ITC, then ITM re-ranking) and the ITC retrieval
check of pretraining."""

from .caption_metrics import CAPTION_METRICS, caption_scores, ptb_tokenize
from .itc_retrieval import itc_features, itc_retrieval_recall, recall_at_k
from .metrics import METRIC_NAMES, metric_path
from .retrieval_eval import UNRANKED_SCORE, evaluate_retrieval, retrieval_scores
from .retrieval_metrics import retrieval_recall
from .vqa_accuracy import nlvr_accuracy, normalize_answer, vqa_accuracy

__all__ = [
    "CAPTION_METRICS",
    "UNRANKED_SCORE",
    "METRIC_NAMES",
    "caption_scores",
    "evaluate_retrieval",
    "itc_features",
    "itc_retrieval_recall",
    "metric_path",
    "nlvr_accuracy",
    "normalize_answer",
    "ptb_tokenize",
    "recall_at_k",
    "retrieval_recall",
    "retrieval_scores",
    "vqa_accuracy",
]
