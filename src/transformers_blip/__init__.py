"""transformers-blip: BLIP models, pretraining, CapFilt and fine-tuning on Hugging Face transformers."""

__version__ = "0.1.0"
