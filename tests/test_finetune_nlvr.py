"""NLVR2 fine-tuning: the script end to end on a tiny synthetic benchmark (the best checkpoint by validation
accuracy classifies every test pair once; a resumed run ends where an uninterrupted one does), and the pair batches."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config, make_tokenizer, random_image
from safetensors.torch import load_file

from transformers_blip.data import BlipEvalTransform
from transformers_blip.data.transforms import hflip
from transformers_blip.modeling_nlvr import BlipForVisualReasoning
from transformers_blip.training.nlvr import NlvrCollator, load_nlvr_splits

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "finetune_nlvr.py"
SYNTHETIC = {"image_size": 32, "num_nlvr": 24, "num_nlvr_test": 6}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread for this file's tests: the tiny model's steps run many times faster so on a loaded
    machine (torchrun does the same), and the thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its argument dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def script_arguments(output: Path, model: Path) -> list[str]:
    # Every random choice (the sampler's order, the pair's mirroring, crops and RandAugment, in the main process:
    # no DataLoader workers) is drawn from torch's generator, which Trainer saves in each checkpoint.
    return [
        "--output_dir", str(output), "--model_name_or_path", str(model), "--image_size", "32",
        "--synthetic_num_nlvr", "24", "--synthetic_num_nlvr_test", "6", "--validation_share", "0.25",
        "--num_train_epochs", "2", "--per_device_train_batch_size", "6", "--learning_rate", "1e-3",
        "--disable_tqdm", "true", "--save_total_limit", "3", "--dataloader_num_workers", "0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted two-epoch run, and one resumed from its first epoch's checkpoint."""
    root = tmp_path_factory.mktemp("nlvr")
    torch.manual_seed(0)
    BlipForVisualReasoning(make_config()).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    script = load_script(SCRIPT)
    resumed = root / "resumed"
    script.main(script_arguments(root / "run", root / "model"))
    resumed.mkdir()
    shutil.copytree(root / "run" / "checkpoint-3", resumed / "checkpoint-3")  # as if stopped after epoch 1
    script.main([*script_arguments(resumed, root / "model"), "--resume_from_checkpoint"])
    return {"run": root / "run", "resumed": resumed}


def test_every_test_pair_is_classified_once_by_the_best_checkpoint(runs):
    run = runs["run"]
    test = load_nlvr_splits("synthetic", synthetic_kwargs=SYNTHETIC)["test"]
    results = json.loads((run / "nlvr_result.json").read_text())
    assert [entry["pair"] for entry in results] == list(range(len(test)))
    assert [entry["label"] for entry in results] == test["label"]
    assert [entry["sentence"] for entry in results] == test["sentence"]
    assert all(entry["prediction"] in (0, 1) for entry in results)

    metrics = json.loads((run / "metrics.json").read_text())
    correct = sum(entry["prediction"] == entry["label"] for entry in results)
    assert metrics["test_accuracy"] == pytest.approx(100 * correct / len(results))
    log = json.loads((run / "trainer_state.json").read_text())["log_history"]
    evaluations = [(entry["step"], entry["eval_accuracy"]) for entry in log if "eval_accuracy" in entry]
    assert [step for step, _ in evaluations] == [3, 6]  # every epoch
    best_step, best_accuracy = max(evaluations, key=lambda pair: pair[1])  # the first of equals, as Trainer keeps
    assert metrics["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert metrics["validation_accuracy"] == pytest.approx(best_accuracy)
    best = load_file(Path(metrics["best_checkpoint"]) / "model.safetensors")
    final = load_file(run / "model.safetensors")
    assert all(torch.equal(final[name], tensor) for name, tensor in best.items())
    assert "| test_accuracy |" in (run / "results.md").read_text()


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(runs):
    # It resumed rather than started over: its first epoch's log is the checkpoint's, timings and all.
    logs = [json.loads((runs[name] / "trainer_state.json").read_text())["log_history"] for name in runs]
    first_evaluations = [next(entry for entry in log if "eval_accuracy" in entry) for log in logs]
    assert first_evaluations[0] == first_evaluations[1]
    uninterrupted = load_file(runs["run"] / "checkpoint-6" / "model.safetensors")
    resumed = load_file(runs["resumed"] / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(resumed[name], tensor) for name, tensor in uninterrupted.items())
    assert (runs["resumed"] / "nlvr_result.json").read_text() == (runs["run"] / "nlvr_result.json").read_text()


def test_evaluation_only_of_the_best_checkpoint_measures_what_training_reported(runs, tmp_path):
    run = runs["run"]
    trained = json.loads((run / "metrics.json").read_text())
    script = load_script(SCRIPT)
    metrics = script.main([*script_arguments(tmp_path, run), "--do_train", "false"])  # the saved best weights
    assert metrics["evaluated"] == str(run) and not list(tmp_path.glob("checkpoint-*"))
    assert metrics["validation_accuracy"] == pytest.approx(trained["validation_accuracy"])
    assert metrics["test_accuracy"] == pytest.approx(trained["test_accuracy"])
    assert (tmp_path / "nlvr_result.json").read_text() == (run / "nlvr_result.json").read_text()


def test_the_text_dropout_reaches_the_built_layers(tmp_path):
    from transformers_blip.training.vqa import start_task_model

    torch.manual_seed(0)
    BlipForVisualReasoning(make_config()).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    model, _ = start_task_model(BlipForVisualReasoning, 32, model_name_or_path=str(tmp_path), dropout=0.2)
    layers = [layer for layer in model.text_encoder.modules() if isinstance(layer, torch.nn.Dropout)]
    assert layers and {layer.p for layer in layers} == {0.2}
    assert model.config.text_config.attention_probs_dropout_prob == 0.2


def test_a_mirrored_pair_swaps_and_flips_its_images_and_its_sides():
    transform = BlipEvalTransform(32)
    left, right = random_image(1), random_image(2)
    row = {"image0": left, "image1": right, "sentence": "the left image has more circles", "label": 1}
    tokenizer = make_tokenizer()
    mirrored = NlvrCollator(tokenizer, transform, mirror_probability=1.0)([row])
    assert torch.equal(mirrored["pixel_values"][0, 0], transform(hflip(right)))
    assert torch.equal(mirrored["pixel_values"][0, 1], transform(hflip(left)))
    expected = tokenizer(["the right image has more circles"], return_tensors="pt").input_ids
    assert torch.equal(mirrored["input_ids"], expected) and mirrored["labels"].tolist() == [1]

    plain = NlvrCollator(tokenizer, transform)([row])
    assert plain["pixel_values"].shape == (1, 2, 3, 32, 32)
    assert torch.equal(plain["pixel_values"][0, 0], transform(left))


def test_the_nlvr2_recipe_sets_the_originals_values_and_bad_input_is_named(tmp_path, capsys):
    script = load_script(SCRIPT)
    parsed = script.parse_with_recipe(script.build_parser(), ["--recipe", "nlvr2", "--output_dir", str(tmp_path)])
    model_args, _, optimization_args, training_args = parsed
    assert (model_args.image_size, model_args.max_words) == (384, 40)
    assert (optimization_args.lr_schedule, optimization_args.weight_decay_all) == ("epoch_cosine", True)
    assert (training_args.learning_rate, training_args.num_train_epochs) == (3e-5, 15)
    with pytest.raises(SystemExit):
        script.main(["--output_dir", str(tmp_path), "--source", "nlvr"])
    assert "invalid choice: 'nlvr'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs --train_files, --test_files and --image_root"):
        script.main(["--output_dir", str(tmp_path), "--source", "nlvr_json"])


def test_a_fresh_run_resumes_with_its_own_vocabulary(tmp_path):
    """WordPiece training need not number the tokens alike twice: a resumed fresh run reads its tokenizer back."""
    from transformers_blip.training.vqa import start_task_model

    make_tokenizer().save_pretrained(tmp_path)

    def corpus():
        raise AssertionError("a resumed run must not train its vocabulary anew")

    model, tokenizer = start_task_model(BlipForVisualReasoning, 32, corpus=corpus, resume_checkpoint=str(tmp_path))
    assert tokenizer.get_vocab() == make_tokenizer().get_vocab()
    assert model.config.text_config.vocab_size == len(tokenizer)
