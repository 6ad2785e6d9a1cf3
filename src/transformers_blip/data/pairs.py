"""From images with several references to image-text pairs, one caption per row, as training wants them."""

from __future__ import annotations

from datasets import Dataset, Value
from datasets import Image as ImageFeature


def flatten_captions(dataset: Dataset, captions_column: str = "captions", caption_column: str = "caption") -> Dataset:
    """One row per (image, caption) pair, for caption training and pretraining.

    The list column `captions_column` becomes the string column `caption_column`; every other column (the image, its
    id) is repeated for each caption. Images are carried as their stored bytes, never decoded and re-encoded.
    """
    image_columns = [name for name, f in dataset.features.items() if isinstance(f, ImageFeature) and f.decode]
    for name in image_columns:
        dataset = dataset.cast_column(name, ImageFeature(decode=False))

    def explode(batch: dict[str, list]) -> dict[str, list]:
        repeats = [len(captions) for captions in batch[captions_column]]
        rows = {
            name: [value for value, count in zip(values, repeats) for _ in range(count)]
            for name, values in batch.items()
            if name != captions_column
        }
        rows[caption_column] = [caption for captions in batch[captions_column] for caption in captions]
        return rows

    # Schema out: every input column except `captions_column`, in order, then `caption_column` (string).
    features = dataset.features.copy()
    del features[captions_column]
    features[caption_column] = Value("string")
    pairs = dataset.map(
        explode, batched=True, remove_columns=dataset.column_names, features=features, desc="Flattening captions"
    )
    for name in image_columns:
        pairs = pairs.cast_column(name, ImageFeature())
    return pairs
