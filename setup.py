"""transformers-blip: BLIP (Salesforce, ICML 2022) for Hugging Face transformers, the whole recipe."""

from setuptools import find_packages, setup

# Ranges are what the code is written against; requirements/ci.txt pins the exact versions CI runs.
# torch is installed first by the Makefile from the CPU wheel (torch==2.13.0): an unpinned torch pulls
# a multi-GB CUDA build. Nothing here may depend on torchvision or timm.
install_requires = [
    "torch>=2.4,<2.15",
    "transformers>=5.20,<5.25",
    "tokenizers>=0.22,<0.24",
    "datasets>=4.0,<5.3",
    "accelerate>=1.10,<1.16",
    "evaluate>=0.4.5,<0.5",
    "safetensors>=0.5,<0.9",
    "huggingface-hub>=1.0,<2.5",
    "pillow>=10.0,<14",
    "numpy>=1.26,<3",
    "tqdm>=4.66,<5",
    # The COCO caption scorers (BLEU, METEOR, ROUGE-L, CIDEr-D) that papers report; a large wheel (its Java jars).
    "pycocoevalcap>=1.2,<1.3",
]

extras_require = {
    # The Gradio web app (`blip serve`, app/app.py). Gradio 6 caps pillow below 13.
    "app": ["gradio>=6.0,<7"],
    # `make demo`'s report plots its losses and learning rate.
    "demo": ["matplotlib>=3.8,<4"],
    # selenium drives Debian's chromium (with its chromium-driver) in the browser test of the app.
    "dev": ["pytest>=8,<10", "ruff>=0.6,<0.18", "selenium>=4.20,<5"],
}

setup(
    name="transformers-blip",
    version="0.1.0",
    description="BLIP for Hugging Face transformers: models, pretraining, CapFilt and fine-tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["blip = transformers_blip.cli:main"]},
    license="BSD-3-Clause",
)
