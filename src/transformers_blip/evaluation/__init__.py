"""Evaluation of BLIP models: retrieval recall from similarities and the ITC retrieval check of pretraining."""

from .itc_retrieval import itc_features, itc_retrieval_recall, recall_at_k

__all__ = ["itc_features", "itc_retrieval_recall", "recall_at_k"]
