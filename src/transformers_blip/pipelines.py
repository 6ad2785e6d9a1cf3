"""Pipelines for BLIP: `image-to-text` (captioning) and `visual-question-answering`.

transformers 5.x redirects `image-to-text` to `image-text-to-text`, which demands a text prompt, and has removed
`visual-question-answering`. A model saved by this package names these classes in its config's `custom_pipelines`
and carries this file beside its weights, so both tasks work again:

    pipeline("image-to-text", model=path, trust_remote_code=True)(image)
    pipeline("visual-question-answering", model=path, trust_remote_code=True)(image=image, question="...")

With the package installed and imported, `trust_remote_code` is not needed: `installed_pipelines.py` serves both
tasks on our models with the classes below, from the installed package. This file imports nothing from the package,
so that it works where the package is not installed: it reaches the package's image decoder and caption decoding
through the processor it is given (`processor.image_processor.load_image`, `processor.decode_captions`), which a
saved model carries as source files.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline

CUSTOM_PIPELINES = {
    "image-to-text": {
        "impl": "pipelines.BlipImageToTextPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "type": "multimodal",
    },
    "visual-question-answering": {
        "impl": "pipelines.BlipVisualQuestionAnsweringPipeline",
        "pt": ["AutoModelForVisualQuestionAnswering"],
        "type": "multimodal",
    },
}


def _processor_method(owner: Any, name: str) -> Any:
    """`owner.name`, or a TypeError saying which processor BLIP's pipelines need."""
    method = getattr(owner, name, None)
    if method is None:
        raise TypeError(
            "BLIP's pipelines decode images and captions with the processor that transformers_blip saves beside its "
            f"models (BlipImageTextProcessor); {type(owner).__name__} has no `{name}`. Save "
            "`transformers_blip.build_processor(tokenizer, image_size=...)` beside the model."
        )
    return method


def _load_image(pipeline: Pipeline, image: Any, timeout: float | None) -> Any:
    """The image decoded by the processor's own decoder: any mode to RGB, bombs refused, the file named in errors."""
    return _processor_method(pipeline.processor.image_processor, "load_image")(image, timeout=timeout)


class BlipImageToTextPipeline(Pipeline):
    """Captions images: `pipe(image_or_images, prompt=None, **generate_kwargs)` -> `[{"generated_text": ...}]`.

    Images may be PIL images, local paths, encoded bytes or URLs, decoded as in training (see docs/processing.md).
    `prompt` (e.g. "a picture of") is continued by the decoder and stripped from the result at a word boundary, by
    the processor's `decode_captions`: "a picture offering a view" keeps its first word whole. Generation defaults
    come from the model's generation config (beam search, 3 beams, 5 to 20 tokens for BLIP captioners); any
    `generate` option may be passed, e.g. `num_beams=1` or `do_sample=True`.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True

    def _sanitize_parameters(self, prompt: str | None = None, timeout: float | None = None, **generate_kwargs):
        preprocess_params = {"prompt": prompt, "timeout": timeout}
        postprocess_params = {"prompt": prompt}
        return preprocess_params, {"generate_kwargs": generate_kwargs}, postprocess_params

    def __call__(self, images: Any, **kwargs) -> list[dict[str, str]] | list[list[dict[str, str]]]:
        return super().__call__(images, **kwargs)

    def preprocess(self, image: Any, prompt: str | None = None, timeout: float | None = None) -> dict:
        image = _load_image(self, image, timeout)
        if prompt:
            inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        else:
            inputs = self.processor(images=image, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def _forward(self, model_inputs: dict, generate_kwargs: dict | None = None) -> dict:
        generated_ids = self.model.generate(**model_inputs, **(generate_kwargs or {}))
        return {"generated_ids": generated_ids}

    def postprocess(self, model_outputs: dict, prompt: str | None = None) -> list[dict[str, str]]:
        decode_captions = _processor_method(self.processor, "decode_captions")
        return [{"generated_text": text} for text in decode_captions(model_outputs["generated_ids"], prompt=prompt)]


class BlipVisualQuestionAnsweringPipeline(Pipeline):
    """Answers questions about images: `pipe(image=..., question=..., top_k=1)` -> `[{"answer": ..., "score": ...}]`.

    Without `candidates` the answer is generated (beam search; `score` is the beam's probability). With
    `candidates` (a list of answer strings) the answers are ranked as BLIP's `rank` inference does and `score` is
    the whole answer's probability.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        candidates: list[str] | None = None,
        timeout: float | None = None,
        **generate_kwargs,
    ):
        preprocess_params = {"timeout": timeout}
        forward_params = {"top_k": top_k or 1, "candidates": candidates, "generate_kwargs": generate_kwargs}
        return preprocess_params, forward_params, {}

    def __call__(self, image: Any = None, question: str | None = None, **kwargs) -> list[dict[str, Any]]:
        if isinstance(image, dict):
            return super().__call__(image, **kwargs)
        if image is None or question is None:
            raise ValueError("visual-question-answering needs both image=... and question=...")
        return super().__call__({"image": image, "question": question}, **kwargs)

    def preprocess(self, inputs: dict, timeout: float | None = None) -> dict:
        image = _load_image(self, inputs["image"], timeout)
        model_inputs = self.processor(images=image, text=inputs["question"], return_tensors="pt")
        model_inputs["pixel_values"] = model_inputs["pixel_values"].to(self.dtype)
        return model_inputs

    def _forward(
        self,
        model_inputs: dict,
        top_k: int = 1,
        candidates: list[str] | None = None,
        generate_kwargs: dict | None = None,
    ) -> dict:
        if candidates:
            return self._rank(model_inputs, top_k, candidates)
        generate_kwargs = dict(generate_kwargs or {})
        generate_kwargs.setdefault("num_beams", max(top_k, self.model.generation_config.num_beams or 1))
        output = self.model.generate(
            **model_inputs,
            num_return_sequences=top_k,
            return_dict_in_generate=True,
            output_scores=True,
            **generate_kwargs,
        )
        scores = getattr(output, "sequences_scores", None)
        if scores is None:  # greedy search returns no sequence score
            scores = torch.zeros(output.sequences.shape[0])
        answers = _processor_method(self.processor, "decode_captions")(output.sequences)
        return {"answers": answers, "scores": scores.exp().tolist()}

    def _rank(self, model_inputs: dict, top_k: int, candidates: list[str]) -> dict:
        tokenized = self.processor.tokenizer(candidates, padding="longest", return_tensors="pt")
        ranking = self.model.rank(
            input_ids=model_inputs["input_ids"],
            pixel_values=model_inputs["pixel_values"],
            attention_mask=model_inputs.get("attention_mask"),
            candidate_input_ids=tokenized["input_ids"].to(self.device),
            candidate_attention_mask=tokenized["attention_mask"].to(self.device),
            k=len(candidates),
        )
        log_probs, order = ranking.topk_log_probs[0].sort(descending=True)
        best = ranking.topk_indices[0][order][:top_k]
        return {"answers": [candidates[i] for i in best.tolist()], "scores": log_probs[:top_k].exp().tolist()}

    def postprocess(self, model_outputs: dict) -> list[dict[str, Any]]:
        return [
            {"answer": answer, "score": score}
            for answer, score in zip(model_outputs["answers"], model_outputs["scores"])
        ]


__all__ = ["BlipImageToTextPipeline", "BlipVisualQuestionAnsweringPipeline", "CUSTOM_PIPELINES"]
