"""Caption fine-tuning: the original's prompt masking and loss, the regularisation of a transformers-layout start, and
training_scripts/finetune_caption.py end to end on a tiny synthetic benchmark."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_config, make_tokenizer, random_image
from datasets import Dataset, Features
from safetensors.torch import load_file

from transformers_blip import BlipConfig, BlipForConditionalGeneration
from transformers_blip.benchmark.build import CAPTIONS_FEATURES
from transformers_blip.data import BlipEvalTransform
from transformers_blip.training.captioning import (
    CaptionEvaluation,
    CaptionGeneration,
    CaptionTrainingCollator,
    caption_prompt_length,
    load_captioner,
    result_image_id,
    training_regularisation,
)

PROMPT = "a picture of "
SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "finetune_caption.py"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread for this file's tests: the tiny model's steps run much faster so on a loaded machine, and
    the thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def caption_rows() -> list[dict]:
    """Rows as the decoding step hands them to the collator: image tensors and raw captions."""
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    captions = ["Red square, left.", "a big blue circle on the right", "green triangle"]
    return [{"image": image, "caption": caption} for image, caption in zip(images, captions)]


def original_prompt_length(tokenizer, prompt: str) -> int:
    """models/blip.py, BLIP_Decoder: `len(self.tokenizer(self.prompt).input_ids) - 1`."""
    return len(tokenizer(prompt).input_ids) - 1


def original_targets(input_ids: torch.Tensor, tokenizer, prompt: str) -> torch.Tensor:
    """The original's `decoder_targets`: pads and the first `prompt_length` positions set to -100."""
    targets = input_ids.masked_fill(input_ids == tokenizer.pad_token_id, -100)
    targets[:, : original_prompt_length(tokenizer, prompt)] = -100
    return targets


def label_smoothed_nll(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """BertLMHeadModel's loss written from its formula: position t predicts token t + 1; each kept target costs
    (1 - e) * -log p(target) + e * mean over the vocabulary of -log p(v); the mean over kept targets."""
    log_probs = logits[:, :-1].log_softmax(dim=-1)  # (B, L-1, V)
    next_tokens = targets[:, 1:]  # (B, L-1)
    kept = next_tokens != -100
    nll = -log_probs.gather(-1, next_tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, L-1)
    uniform = -log_probs.mean(dim=-1)  # (B, L-1)
    per_token = (1 - smoothing) * nll + smoothing * uniform
    return per_token[kept].mean()


def test_every_text_starts_with_the_prompt_and_only_dec_and_the_prompt_are_masked():
    tokenizer = make_tokenizer()
    batch = CaptionTrainingCollator(tokenizer, PROMPT)(caption_rows())
    assert batch["prompt_length"] == caption_prompt_length(tokenizer, PROMPT) == 3
    # The model masks `[DEC]` (in place of [CLS]) and `prompt_length` tokens after it: the original's positions.
    masked = batch["prompt_length"] + 1
    assert masked == original_prompt_length(tokenizer, PROMPT) == 4
    for ids in batch["input_ids"]:
        assert tokenizer.convert_ids_to_tokens(ids[:masked].tolist()) == ["[CLS]", "a", "picture", "of"]
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == "a picture of red square left"
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_caption_loss_equals_the_original_formula():
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    config = make_config()
    config.text_config.label_smoothing = 0.1
    model = BlipForConditionalGeneration(config).eval()
    batch = CaptionTrainingCollator(tokenizer, PROMPT)(caption_rows())
    assert (batch["attention_mask"] == 0).any()  # the texts differ in length: pads are in play
    with torch.no_grad():
        output = model(**batch)
    dec_ids = batch["input_ids"].clone()
    dec_ids[:, 0] = tokenizer.bos_token_id  # the original puts [DEC] in place of [CLS]
    targets = original_targets(dec_ids, tokenizer, PROMPT)
    expected = label_smoothed_nll(output.logits, targets, 0.1)
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The docstring's former example (4 tokens after [DEC]) also masked the first caption word: a different loss.
    targets[:, 4] = -100
    assert output.loss.item() != pytest.approx(label_smoothed_nll(output.logits, targets, 0.1).item(), rel=1e-4)


def test_by_default_the_model_masks_the_configured_prompt_where_a_text_starts_with_it():
    """The original's rule (models/blip.py, BLIP_Decoder), written out here: `[DEC]` and the prompt's tokens, the
    first `len(tokenizer(prompt).input_ids) - 1` positions, get no loss; a text without the prompt loses none of its
    caption words."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    config = make_config()
    config.text_config.label_smoothing = 0.1
    config.prompt_token_ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
    model = BlipForConditionalGeneration(config).eval()
    texts = [PROMPT + "red square left", "a big blue circle on the right", PROMPT + "green triangle"]
    encoded = tokenizer(texts, padding="longest", return_tensors="pt")
    ids, mask = encoded.input_ids, encoded.attention_mask
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        output = model(pixels, ids, attention_mask=mask, labels=ids)
        explicit = model(pixels, ids, attention_mask=mask, labels=ids, prompt_length=0)
    dec_ids = ids.clone()
    dec_ids[:, 0] = tokenizer.bos_token_id
    targets = dec_ids.masked_fill(ids == tokenizer.pad_token_id, -100)
    for row, text in enumerate(texts):
        masked = original_prompt_length(tokenizer, PROMPT) if text.startswith(PROMPT) else 1
        targets[row, :masked] = -100
    assert targets[1, 1].item() == tokenizer.convert_tokens_to_ids("a")  # the unprompted text keeps its first word
    assert output.loss.item() == pytest.approx(label_smoothed_nll(output.logits, targets, 0.1).item(), rel=1e-5)
    # An explicit prompt_length wins: 0 leaves every text's words in the loss, the prompts' too.
    unmasked = dec_ids.masked_fill(ids == tokenizer.pad_token_id, -100)
    unmasked[:, 0] = -100
    assert explicit.loss.item() == pytest.approx(label_smoothed_nll(output.logits, unmasked, 0.1).item(), rel=1e-5)
    # A config that names no prompt tokens takes the texts to carry none.
    config.prompt_token_ids = None
    with torch.no_grad():
        assert model(pixels, ids, attention_mask=mask, labels=ids).loss.item() == pytest.approx(explicit.loss.item())


def test_prompt_length_outside_the_text_is_refused():
    model = BlipForConditionalGeneration(make_config()).eval()
    ids = torch.tensor([[101, 104, 105, 102]])
    with pytest.raises(ValueError, match="prompt_length must be in"):
        model(torch.randn(1, 3, 32, 32), ids, labels=ids, prompt_length=4)


def hub_layout_config() -> BlipConfig:
    """A tiny config as transformers' layout gives it: no label smoothing, no dropout."""
    layout = make_config().to_transformers_dict()
    layout["label_smoothing"] = 0.0  # as in the hub's Salesforce/blip-* configs
    layout["text_config"].update(label_smoothing=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = BlipConfig.from_dict(layout)
    assert config.text_config.label_smoothing == 0.0 and config.text_config.hidden_dropout_prob == 0.0
    return config


def text_dropouts(model) -> set[float]:
    return {layer.p for layer in model.text_decoder.modules() if isinstance(layer, torch.nn.Dropout)}


def test_a_transformers_layout_start_gets_blip_training_regularisation():
    model = BlipForConditionalGeneration(hub_layout_config())
    message = training_regularisation(model, "transformers")
    text = model.config.text_config
    assert (text.label_smoothing, text.hidden_dropout_prob, text.attention_probs_dropout_prob) == (0.1, 0.1, 0.1)
    assert text_dropouts(model) == {0.1}  # the layers built from the old value drop too
    assert "no label smoothing and no dropout" in message
    chosen = BlipForConditionalGeneration(hub_layout_config())
    training_regularisation(chosen, "transformers", label_smoothing=0.0, dropout=0.2)
    assert (chosen.config.text_config.label_smoothing, chosen.config.text_config.hidden_dropout_prob) == (0.0, 0.2)
    assert text_dropouts(chosen) == {0.2}
    ours = BlipForConditionalGeneration(make_config())  # our configs carry their own values: kept
    assert training_regularisation(ours, "ours") is None and text_dropouts(ours) == {0.0}


def test_results_name_coco_images_by_their_coco_id():
    coco = {"image": {"path": "/data/coco/val2014/COCO_val2014_000000391895.jpg", "bytes": None}, "image_id": 7}
    assert result_image_id(coco) == 391895
    assert result_image_id({"image": {"path": None, "bytes": b"png"}, "image_id": 7}) == 7


def load_script():
    spec = importlib.util.spec_from_file_location("finetune_caption", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script defines them
    spec.loader.exec_module(module)
    return module


SCRIPT_ARGS = [
    "--image_size", "32", "--synthetic_num_human", "8", "--synthetic_num_val", "3", "--synthetic_num_test", "5",
    "--num_train_epochs", "2", "--per_device_train_batch_size", "20", "--per_device_eval_batch_size", "5",
    "--learning_rate", "1e-3", "--logging_steps", "1", "--disable_tqdm", "true", "--vocab_size", "200",
    "--max_length", "10", "--dataloader_num_workers", "1",
]  # fmt: skip


def test_finetune_script_end_to_end_and_resumed(tmp_path):
    script = load_script()
    output_dir = tmp_path / "run"
    metrics = script.main(["--output_dir", str(output_dir), *SCRIPT_ARGS])
    written = json.loads((output_dir / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    for split in ("val", "test"):
        assert {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"} <= set(written[split])
    # The best checkpoint is the epoch of the highest validation CIDEr (the first such epoch on ties).
    state = json.loads((output_dir / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_CIDEr" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]  # 40 pairs, 20 a step: every epoch
    best = max(evaluations, key=lambda entry: entry["eval_CIDEr"])
    assert written["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert written["val"]["CIDEr"] == best["eval_CIDEr"]
    # The COCO results format, every test image once.
    results = json.loads((output_dir / "test_results.json").read_text())
    assert all(set(entry) == {"image_id", "caption"} and isinstance(entry["caption"], str) for entry in results)
    test_ids = sorted(entry["image_id"] for entry in results)
    assert len(test_ids) == 5 and len(set(test_ids)) == 5
    assert "| test |" in (output_dir / "results.md").read_text()
    # Saved with its processor, so that a pipeline or CapFilt loads the directory as it is.
    processor = transformers.AutoProcessor.from_pretrained(output_dir)
    assert processor.image_processor.size["height"] == 32

    # Stopped after epoch 1 and resumed: the last epoch ends on the same weights.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    script.main(["--output_dir", str(resumed_dir), *SCRIPT_ARGS, "--resume_from_checkpoint"])
    final, resumed = (load_file(path / "checkpoint-4" / "model.safetensors") for path in (output_dir, resumed_dir))
    assert final.keys() == resumed.keys()
    assert all(torch.equal(final[name], resumed[name]) for name in final)


def test_load_captioner_tells_the_starts_apart(tmp_path):
    from transformers_blip.convert.transformers_layout import save_in_transformers_layout
    from transformers_blip.modeling_pretraining import BlipForPreTraining

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    captioner = BlipForConditionalGeneration(make_config())
    save_in_transformers_layout(captioner, tmp_path / "hub")
    captioner.save_pretrained(tmp_path / "ours")
    BlipForPreTraining(make_config(queue_size=8)).save_pretrained(tmp_path / "pretraining")
    for name in ("hub", "ours", "pretraining"):
        tokenizer.save_pretrained(tmp_path / name)
    starts = {name: load_captioner(str(tmp_path / name), image_size=48) for name in ("hub", "ours", "pretraining")}
    assert {name: start[2] for name, start in starts.items()} == {
        "hub": "transformers",
        "ours": "ours",
        "pretraining": "pretraining",
    }
    hub_model, ours_model = starts["hub"][0], starts["ours"][0]
    assert torch.equal(hub_model.text_decoder.cls.predictions.bias, ours_model.text_decoder.cls.predictions.bias)
    assert starts["pretraining"][0].config.vision_config.image_size == 48  # resized for fine-tuning
    assert starts["hub"][1].bos_token == "[DEC]"
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_captioner(str(tmp_path / "model_base.pth"), image_size=48)


def test_the_script_logs_the_regularisation_of_a_transformers_layout_start(tmp_path, caplog):
    from transformers_blip.convert.transformers_layout import save_in_transformers_layout

    save_in_transformers_layout(BlipForConditionalGeneration(make_config()), tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    script = load_script()
    training_args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True)
    model_args = script.ModelArguments(model_name_or_path=str(tmp_path))
    model, tokenizer = script.start_model(model_args, training_args, [], PROMPT, None)
    assert model.training and model.config.text_config.label_smoothing == 0.1
    assert model.config.text_config.hidden_dropout_prob == 0.1 and text_dropouts(model) == {0.1}
    assert "no label smoothing and no dropout" in caplog.text
    # The start learns its prompt's tokens, so that its loss masks the prompt without being told.
    assert model.config.prompt_token_ids == tokenizer(PROMPT, add_special_tokens=False).input_ids


def eval_split(num_images: int = 5) -> Dataset:
    images = [random_image(seed, size=(32, 32)) for seed in range(num_images)]
    rows = {"image": images, "image_id": list(range(10, 10 + num_images)), "captions": [["red square"]] * num_images}
    return Dataset.from_dict(rows, features=Features(CAPTIONS_FEATURES))


@pytest.mark.parametrize("recipe", ["coco_caption", "nocaps"])
def test_the_script_takes_every_value_of_the_captioning_recipes(recipe):
    from transformers_blip.training import RECIPES, parse_with_recipe

    parsed = parse_with_recipe(load_script().build_parser(), ["--recipe", recipe, "--output_dir", "unused"])
    values = {name: value for arguments in parsed for name, value in vars(arguments).items()}
    assert {name: values[name] for name in RECIPES[recipe]} == RECIPES[recipe]
    overridden = parse_with_recipe(load_script().build_parser(), ["--recipe", recipe, "--num_beams", "5"])
    assert overridden[2].num_beams == 5  # the command line still wins


def test_the_script_names_missing_or_wrong_annotation_files(tmp_path):
    script = load_script()
    with pytest.raises(SystemExit, match="needs --val_file, --test_file"):
        script.main(["--output_dir", str(tmp_path), "--source", "coco_karpathy", "--train_file", "train.json"])
    evaluation_file = tmp_path / "val.json"
    evaluation_file.write_text(json.dumps([{"image": "val/COCO_val2014_000000000001.jpg", "caption": ["a cat"]}]))
    arguments = ["--train_file", str(evaluation_file), "--val_file", str(evaluation_file)]
    with pytest.raises(SystemExit, match="val.json has the wrong layout"):
        script.main(["--output_dir", str(tmp_path), "--source", "coco_karpathy", *arguments, "--test_file", "t.json"])


def test_an_image_listed_twice_is_captioned_into_one_result():
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(make_config()).eval()
    evaluation = CaptionEvaluation(make_tokenizer(), BlipEvalTransform(32), CaptionGeneration(max_length=8), 2)
    split = eval_split(3)
    twice = Dataset.from_dict({**split[:3], "image_id": [10, 11, 10]}, features=split.features)
    assert [entry["image_id"] for entry in evaluation.caption(model, twice)] == [10, 11]


def write_nocaps(root: Path, split: str, ids: list[int]) -> Path:
    """A NoCaps annotation file as BLIP releases it, with its images under `root`."""
    (root / split).mkdir(parents=True, exist_ok=True)
    records = []
    for image_id in ids:
        random_image(image_id, size=(40, 32)).save(root / split / f"{image_id}.png")
        records.append({"image": f"{split}/{image_id}.png", "img_id": image_id})
    path = root / f"nocaps_{split}.json"
    path.write_text(json.dumps(records))
    return path


def test_nocaps_files_load_as_images_with_their_ids(tmp_path):
    from transformers_blip.data import SkipReport
    from transformers_blip.data.loaders import load_nocaps

    path = write_nocaps(tmp_path, "val", [4, 9])
    records = json.loads(path.read_text()) + [{"image": "val/x.png"}, {"image": "val/y.png", "img_id": "n/a"}]
    path.write_text(json.dumps(records))
    report = SkipReport()
    split = load_nocaps(path, tmp_path, report=report)
    assert split["image_id"] == [4, 9] and len(report) == 2  # the two bad records are counted, not loaded
    assert split.cast_column("image", split.features["image"])[0]["image"]["path"] == str(tmp_path / "val/4.png")


def test_evaluation_only_captions_nocaps_val_and_test_without_training(tmp_path):
    torch.manual_seed(0)
    BlipForConditionalGeneration(make_config()).save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    files = {"val": write_nocaps(tmp_path, "val", [1, 2, 3]), "test": write_nocaps(tmp_path, "test", [7, 8])}
    output_dir = tmp_path / "run"
    metrics = load_script().main(
        ["--recipe", "nocaps", "--do_train", "false", "--model_name_or_path", str(tmp_path / "model"),
         "--source", "nocaps", "--image_root", str(tmp_path), "--val_file", str(files["val"]),
         "--test_file", str(files["test"]), "--image_size", "32", "--max_length", "8", "--min_length", "3",
         "--output_dir", str(output_dir), "--dataloader_num_workers", "0", "--disable_tqdm", "true"]
    )  # fmt: skip
    assert metrics["evaluated"] == str(tmp_path / "model")
    assert (metrics["val"], metrics["test"]) == ({"captioned": 3}, {"captioned": 2})
    assert metrics["generation"]["num_beams"] == 3  # the recipe's beam search
    for split, ids in (("val", [1, 2, 3]), ("test", [7, 8])):
        results = json.loads((output_dir / f"{split}_results.json").read_text())
        assert sorted(entry["image_id"] for entry in results) == ids
        assert all(isinstance(entry["caption"], str) for entry in results)
    assert "without training" in (output_dir / "results.md").read_text()
    assert not list(output_dir.glob("checkpoint-*"))  # nothing trained, nothing saved


def test_evaluation_only_needs_a_model_and_refuses_to_train_on_nocaps(tmp_path):
    script = load_script()
    with pytest.raises(SystemExit):
        script.main(["--output_dir", str(tmp_path), "--do_train", "false"])
    with pytest.raises(SystemExit, match="NoCaps has no training split"):
        script.main(["--output_dir", str(tmp_path), "--source", "nocaps", "--val_file", "v.json"])
