"""BLIP's processor and tokenizer.

The tokenizer is BERT's uncased WordPiece tokenizer plus two special tokens, appended in this order as the last two
ids: `[DEC]` (the decoder's first token, registered as `bos_token`) and `[ENC]` (which replaces `[CLS]` when text is
encoded with cross-attention to the image). With bert-base-uncased's vocabulary they are 30522 and 30523, BLIP's ids.
Text is tokenized as ordinary BERT text, `[CLS] ... [SEP]`: the models put `[DEC]` or `[ENC]` in place of `[CLS]`.

`build_tokenizer` makes one from a `vocab.txt` or trains one on a corpus (nothing is downloaded), `build_processor`
pairs it with the image processor, and `text_config_token_kwargs` gives a `BlipTextConfig` the matching ids.
"""

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from tokenizers import normalizers, pre_tokenizers
from transformers import BertTokenizer, BlipProcessor, PreTrainedTokenizerBase, ProcessorMixin

if TYPE_CHECKING:
    import torch

from .image_processing_blip import BlipImageProcessorAnyMode

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DECODER_BOS_TOKEN = "[DEC]"
ENCODER_TOKEN = "[ENC]"
BERT_MAX_LENGTH = 512  # BERT's position embeddings


def _read_vocab_file(vocab_file: str) -> dict[str, int]:
    """Maps each line of a BERT `vocab.txt` to its line number, which is the token's id."""
    with open(vocab_file, encoding="utf-8") as reader:
        tokens = [line.rstrip("\n") for line in reader]
    while tokens and not tokens[-1]:  # a stray blank line at the end would shift [DEC] and [ENC] by one
        tokens.pop()
    vocab = {}
    for token_id, token in enumerate(tokens):
        if token in vocab:
            raise ValueError(f"{vocab_file} lists {token!r} twice (lines {vocab[token] + 1} and {token_id + 1}).")
        vocab[token] = token_id
    missing = [token for token in BERT_SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise ValueError(f"{vocab_file} lacks BERT's special tokens {missing}.")
    return vocab


def _train_vocab(corpus: Iterable[str], vocab_size: int, lowercase: bool) -> dict[str, int]:
    """A WordPiece vocabulary learnt from `corpus`, the same for the same corpus in every process.

    BERT's special tokens come first (so `[PAD]` is 0), then every character of the corpus, alone and as a `##`
    continuation (so that any word can be spelled), then the corpus's words, the most frequent first (ties in
    alphabetical order), while `vocab_size` allows. `tokenizers`' WordPiece trainer is not used: it breaks ties in
    the order of a hash map seeded per process, so the same command learnt different vocabularies.
    """
    # BertTokenizer's normalisation and pre-tokenisation, so the words counted are the ones it will see.
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in corpus:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({character for word in counts for character in word})
    tokens = list(BERT_SPECIAL_TOKENS) + characters + [f"##{character}" for character in characters]
    known = set(tokens)
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(tokens) >= vocab_size:
            break
        if word not in known:
            tokens.append(word)
            known.add(word)
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer(
    vocab_file: str | None = None,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 30522,
    lowercase: bool = True,
) -> BertTokenizer:
    """Builds BLIP's tokenizer: BERT WordPiece plus `[DEC]` (the `bos_token`) and `[ENC]` as its last two ids.

    Args:
        vocab_file: a BERT `vocab.txt` (one token per line, the line number is the id), e.g. bert-base-uncased's,
            which gives BLIP's own ids ([DEC] = 30522, [ENC] = 30523, 30524 tokens).
        corpus: texts (any iterable of strings, e.g. the captions of a dataset) to train a WordPiece vocabulary on,
            with the `tokenizers` library, when there is no vocab file.
        vocab_size: most tokens the trained vocabulary may have, BERT's five special tokens included and `[DEC]` and
            `[ENC]` not (a small corpus gives fewer). Ignored with `vocab_file`.
        lowercase: lowercase and strip accents, as the uncased BERT does.

    Returns:
        A transformers `BertTokenizer` (backed by `tokenizers`) that saves and loads with `AutoTokenizer`.
    """
    if (vocab_file is None) == (corpus is None):
        raise ValueError("Give exactly one of `vocab_file` (a BERT vocab.txt) or `corpus` (texts to train on).")
    if isinstance(corpus, str):
        raise ValueError("`corpus` must be an iterable of texts, not a single string.")
    if vocab_file is not None:
        vocab = _read_vocab_file(vocab_file)
    else:
        vocab = _train_vocab(corpus, vocab_size, lowercase)
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=lowercase, model_max_length=BERT_MAX_LENGTH)
    tokenizer.add_special_tokens({"bos_token": DECODER_BOS_TOKEN})
    tokenizer.add_special_tokens({"extra_special_tokens": [ENCODER_TOKEN]})
    check_blip_special_tokens(tokenizer)
    return tokenizer


def check_blip_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raises a ValueError unless `[DEC]` and `[ENC]` are the tokenizer's last two ids, as BLIP's configs assume."""
    vocab = tokenizer.get_vocab()
    expected = {DECODER_BOS_TOKEN: len(tokenizer) - 2, ENCODER_TOKEN: len(tokenizer) - 1}
    found = {token: vocab.get(token) for token in expected}
    if found != expected:
        raise ValueError(
            f"BLIP expects {DECODER_BOS_TOKEN} and {ENCODER_TOKEN} to be the last two ids {list(expected.values())} "
            f"of its {len(tokenizer)}-token vocabulary, found {found}. A vocab file may end with them, in this "
            "order, but must not list them anywhere else."
        )


def _tokenizer_of(processor_or_tokenizer: ProcessorMixin | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def text_config_token_kwargs(processor_or_tokenizer: ProcessorMixin | PreTrainedTokenizerBase) -> dict[str, int]:
    """The token ids a `BlipTextConfig` needs to match a tokenizer: `BlipTextConfig(**text_config_token_kwargs(tok))`.

    Returns `vocab_size`, `pad_token_id`, `sep_token_id` (ends generation), `decoder_bos_token_id` (`[DEC]`) and
    `encoder_token_id` (`[ENC]`).
    """
    tokenizer = _tokenizer_of(processor_or_tokenizer)
    vocab = tokenizer.get_vocab()
    missing = [token for token in (DECODER_BOS_TOKEN, ENCODER_TOKEN) if token not in vocab]
    if missing:
        raise ValueError(f"The tokenizer has no {missing}: build it with `build_tokenizer`.")
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "decoder_bos_token_id": vocab[DECODER_BOS_TOKEN],
        "encoder_token_id": vocab[ENCODER_TOKEN],
    }


def decode_captions(
    processor_or_tokenizer: ProcessorMixin | PreTrainedTokenizerBase,
    generated_ids: "torch.Tensor | Sequence[Sequence[int]]",
    prompt: str | None = None,
) -> list[str]:
    """Turns the output of `generate` (`[DEC]`, the prompt, the caption, `[SEP]`, pads) into caption strings.

    Special tokens are dropped and, when a prompt is given, its text is removed from the start of each caption (as
    the tokenizer writes it back: lowercased and with WordPiece's spacing).

    Args:
        processor_or_tokenizer: a processor with a `tokenizer`, or the tokenizer itself.
        generated_ids: a `(B, L)` tensor or array, or a list of id lists.
        prompt: the text the captions were generated from, e.g. "a picture of ".
    """
    tokenizer = _tokenizer_of(processor_or_tokenizer)
    if hasattr(generated_ids, "tolist"):
        generated_ids = generated_ids.tolist()
    captions = [caption.strip() for caption in tokenizer.batch_decode(generated_ids, skip_special_tokens=True)]
    if not prompt:
        return captions
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    decoded_prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True).strip()
    return [_strip_prefix(caption, decoded_prompt) for caption in captions]


def _strip_prefix(caption: str, prefix: str) -> str:
    """`caption` without a leading `prefix`, unless the prefix's last word continues in the caption ("of" in "off")."""
    if not prefix or not caption.startswith(prefix):
        return caption
    rest = caption[len(prefix) :]
    if rest[:1].isalnum() and prefix[-1:].isalnum():
        return caption
    return rest.strip()


def _num_images(images) -> int:
    """How many images `images` holds: a list's length, the first dimension of a (B, C, H, W) array, else one."""
    if isinstance(images, (list, tuple)):
        return len(images)
    if getattr(images, "ndim", 0) == 4:
        return images.shape[0]
    return 1


class BlipImageTextProcessor(BlipProcessor):
    r"""
    BLIP's processor: [`BlipImageProcessorAnyMode`] for images and a BERT WordPiece tokenizer with `[DEC]` and `[ENC]`
    (see [`build_tokenizer`]) for text. It is transformers' [`BlipProcessor`] with three additions: images (PIL images
    of any mode, paths or encoded bytes) go through the package's one decoder, as in training, a call with both images
    and texts checks that there is one text per image, and [`decode_captions`] turns generated ids back into captions
    with the prompt stripped at a word boundary (the rule the pipelines use too).

    `processor(images=..., text=..., return_tensors="pt", padding=..., truncation=..., max_length=...)` returns
    `pixel_values` (B, 3, H, W), `input_ids` (`[CLS] ... [SEP]`) and `attention_mask`. To score every image against
    every text (ITC retrieval), process the images and the texts in two calls.

    Example:

    ```python
    >>> processor = build_processor(build_tokenizer(vocab_file="vocab.txt"), image_size=384)
    >>> inputs = processor(images=[image], text=["a picture of "], return_tensors="pt")
    >>> captions = processor.decode_captions(model.generate(**inputs), prompt="a picture of ")
    ```
    """

    def validate_inputs(self, images=None, text=None, **kwargs) -> None:
        super().validate_inputs(images=images, text=text, **kwargs)
        if images is None or text is None:
            return
        num_images = _num_images(images)
        num_texts = len(text) if isinstance(text, (list, tuple)) else 1
        if num_images != num_texts:
            raise ValueError(
                f"Got {num_images} images and {num_texts} texts: BLIP pairs each image with one text, so pass as "
                "many texts as images (or process images and texts in separate calls to compare all of them)."
            )

    def decode_captions(
        self, generated_ids: "torch.Tensor | Sequence[Sequence[int]]", prompt: str | None = None
    ) -> list[str]:
        """Captions from `generate`'s output, special tokens and the prompt removed (see [`decode_captions`])."""
        return decode_captions(self.tokenizer, generated_ids, prompt=prompt)


def build_processor(tokenizer: PreTrainedTokenizerBase, image_size: int = 384) -> BlipImageTextProcessor:
    """A [`BlipImageTextProcessor`] for `image_size` x `image_size` images (224 pretraining, 384 captioning and
    retrieval, 480 VQA) with `tokenizer`, e.g. `build_tokenizer(vocab_file=...)`."""
    image_processor = BlipImageProcessorAnyMode(size={"height": image_size, "width": image_size})
    return BlipImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer)


# Saved processors carry this file and an `auto_map`, so that they load with `trust_remote_code=True` where this
# package is not installed.
BlipImageTextProcessor.register_for_auto_class()

__all__ = [
    "BlipImageTextProcessor",
    "build_processor",
    "build_tokenizer",
    "check_blip_special_tokens",
    "decode_captions",
    "text_config_token_kwargs",
]
