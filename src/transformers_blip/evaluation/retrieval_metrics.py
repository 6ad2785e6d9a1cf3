"""Image-text retrieval recall from score matrices, as BLIP reports it (`itm_eval` in the original's scripts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _image_to_text_ranks(score_i2t: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """For each image, the best rank (0 = first) among its ground-truth texts."""
    num_images = score_i2t.shape[0]
    own_text = text_to_image[None, :] == torch.arange(num_images, device=score_i2t.device)[:, None]  # (I, T)
    best_own_score = score_i2t.masked_fill(~own_text, float("-inf")).max(dim=1).values  # (I,)
    # Texts of other images that score at least as high as the image's best own text: a tie counts against it.
    return (score_i2t.masked_fill(own_text, float("-inf")) >= best_own_score[:, None]).sum(dim=1)  # (I,)


def _text_to_image_ranks(score_t2i: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """For each text, the rank of its image: the other images that score at least as high (a tie counts against it)."""
    rows = torch.arange(score_t2i.shape[0], device=score_t2i.device)
    own_image_score = score_t2i[rows, text_to_image]  # (T,)
    return (score_t2i >= own_image_score[:, None]).sum(dim=1) - 1  # (T,), the own image itself not counted


def retrieval_recall(
    score_i2t: torch.Tensor,
    score_t2i: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K in percent both ways, with the original's names.

    Args:
        score_i2t: (I, T) scores of every text for every image (image-to-text retrieval).
        score_t2i: (T, I) scores of every image for every text; after ITM re-ranking it is not `score_i2t.T`.
        text_to_image: (T,) the index of each text's image.

    Ties count against the ground truth: after re-ranking every pair outside a query's top `k_test` scores -100, and a
    ground truth among them is not found at any K, also where K exceeds `k_test`.

    Returns:
        `txt_r{k}` (image-to-text: an image counts as found when any of its texts ranks within k), `img_r{k}`
        (text-to-image), `txt_r_mean`, `img_r_mean` and `r_mean`.
    """
    text_to_image = torch.as_tensor(text_to_image, device=score_i2t.device)
    num_images, num_texts = score_i2t.shape
    if score_t2i.shape != (num_texts, num_images):
        raise ValueError(f"score_t2i must be ({num_texts}, {num_images}) for score_i2t {tuple(score_i2t.shape)}")
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image must hold one image index per text ({num_texts}), got {text_to_image.shape}")
    textless = sorted(set(range(num_images)) - set(text_to_image.tolist()))
    if textless:
        raise ValueError(f"images without a text: {textless[:10]}; every image needs at least one")
    i2t_ranks = _image_to_text_ranks(score_i2t, text_to_image)
    t2i_ranks = _text_to_image_ranks(score_t2i, text_to_image)
    metrics = {}
    for k in ks:
        metrics[f"txt_r{k}"] = 100.0 * (i2t_ranks < k).double().mean().item()
    for k in ks:
        metrics[f"img_r{k}"] = 100.0 * (t2i_ranks < k).double().mean().item()
    metrics["txt_r_mean"] = sum(metrics[f"txt_r{k}"] for k in ks) / len(ks)
    metrics["img_r_mean"] = sum(metrics[f"img_r{k}"] for k in ks) / len(ks)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


__all__ = ["retrieval_recall"]
