"""VQA fine-tuning: the script end to end on a tiny synthetic benchmark, the training loss against the original's
formula written out, the rank inference's two scoring rules against a direct computation."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config, make_tokenizer, random_image
from datasets import Dataset
from safetensors.torch import load_file

from transformers_blip.data import BlipEvalTransform, vqa_answer_list
from transformers_blip.data.loaders import VG_ANSWER_WEIGHT, vqa_answer_weights
from transformers_blip.modeling_blip import BlipForQuestionAnswering
from transformers_blip.training.vqa import (
    AnswerPredictor,
    VqaCollator,
    answer_accuracy,
    held_out_split,
    load_vqa_splits,
    rank_answers,
    start_task_model,
)

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "finetune_vqa.py"
SMOOTHING = 0.1  # the original decoder's label smoothing


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


def tiny_model() -> BlipForQuestionAnswering:
    torch.manual_seed(0)
    return BlipForQuestionAnswering(make_config()).eval()


def run_arguments(output: Path, model: Path) -> list[str]:
    # Random crops, flips and RandAugment, decoded in the main process (no DataLoader workers, the default).
    return [
        "--output_dir", str(output), "--model_name_or_path", str(model), "--image_size", "32",
        "--synthetic_num_vqa", "48", "--synthetic_num_vqa_test", "9", "--validation_share", "0.25",
        "--num_train_epochs", "2", "--per_device_train_batch_size", "12", "--learning_rate", "1e-3",
        "--k_test", "8", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vqa_model")
    tiny_model().save_pretrained(root)
    make_tokenizer().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_dir) -> Path:
    """Two epochs of the script from a saved tiny model: 36 training questions, 12 held out, 9 test questions."""
    output = tmp_path_factory.mktemp("vqa") / "run"
    load_script(SCRIPT).main(run_arguments(output, model_dir))
    return output


def test_the_script_writes_metrics_results_and_one_answer_per_test_question(run):
    metrics = json.loads((run / "metrics.json").read_text())
    test = load_vqa_splits("synthetic", synthetic_kwargs={"image_size": 32, "num_vqa": 48, "num_vqa_test": 9})["test"]
    results = json.loads((run / "vqa_result.json").read_text())
    assert sorted(entry["question_id"] for entry in results) == sorted(test["question_id"])  # each once
    assert all(set(entry) == {"question_id", "answer"} and isinstance(entry["answer"], str) for entry in results)
    assert metrics["test_questions"] == 9 and 0.0 <= metrics["test_accuracy"] <= 100.0
    assert "| test_accuracy |" in (run / "results.md").read_text()


def test_the_best_checkpoint_is_chosen_by_validation_accuracy_and_answers_the_test(run):
    metrics = json.loads((run / "metrics.json").read_text())
    state = json.loads((run / "trainer_state.json").read_text())
    evaluations = [
        (entry["step"], entry["eval_accuracy"]) for entry in state["log_history"] if "eval_accuracy" in entry
    ]
    assert len(evaluations) == 2  # every epoch
    best_step, best_accuracy = max(evaluations, key=lambda pair: pair[1])  # the first of equals, as Trainer keeps
    assert metrics["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert metrics["validation_accuracy"] == pytest.approx(best_accuracy)
    best = load_file(Path(metrics["best_checkpoint"]) / "model.safetensors")
    final = load_file(run / "model.safetensors")
    assert all(torch.equal(final[name], tensor) for name, tensor in best.items())  # the test used the best one


def test_a_run_resumed_without_workers_ends_where_the_uninterrupted_one_does(run, model_dir, tmp_path):
    """Augmentations in the main process draw from torch's generator, which the checkpoint restores; they once
    drew from a stream of their own that restarted on resume, so the resumed epoch repeated the first one's."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoint-3", resumed / "checkpoint-3")  # as if stopped after epoch 1 (3 steps)
    load_script(SCRIPT).main([*run_arguments(resumed, model_dir), "--resume_from_checkpoint"])
    final, again = (load_file(path / "checkpoint-6" / "model.safetensors") for path in (run, resumed))
    assert final.keys() == again.keys()
    assert all(torch.equal(final[name], again[name]) for name in final)
    before = load_file(run / "checkpoint-3" / "model.safetensors")
    assert not all(torch.equal(before[name], final[name]) for name in final)  # epoch 2 trained something


def test_evaluation_only_scores_the_given_weights_without_training(model_dir, tmp_path):
    arguments = run_arguments(tmp_path / "evaluated", model_dir)
    metrics = load_script(SCRIPT).main([*arguments, "--do_train", "false"])
    splits = load_vqa_splits(
        "synthetic",
        validation_share=0.25,
        seed=42,
        synthetic_kwargs={"image_size": 32, "num_vqa": 48, "num_vqa_test": 9},
    )
    predictor = AnswerPredictor(make_tokenizer(), 32, "rank", vqa_answer_list(splits["train"]), k=8)
    expected = answer_accuracy(predictor(tiny_model(), splits["validation"]), splits["validation"])["accuracy"]
    assert metrics["evaluated"] == str(model_dir)
    assert metrics["validation_accuracy"] == pytest.approx(expected)
    answers = json.loads((tmp_path / "evaluated" / "vqa_result.json").read_text())
    assert sorted(entry["question_id"] for entry in answers) == sorted(splits["test"]["question_id"])
    assert not list((tmp_path / "evaluated").glob("checkpoint-*"))
    with pytest.raises(SystemExit):  # nothing to evaluate
        load_script(SCRIPT).main(["--output_dir", str(tmp_path), "--do_train", "false"])


def hub_layout_head(path: Path) -> Path:
    """A tiny VQA head saved in transformers' layout, with the hub's inference config: no smoothing, no dropout."""
    from transformers_blip.convert.transformers_layout import save_in_transformers_layout

    save_in_transformers_layout(tiny_model(), path)
    config = json.loads((path / "config.json").read_text())
    config["label_smoothing"] = 0.0
    config["text_config"].update(label_smoothing=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    make_tokenizer().save_pretrained(path)
    return path


def text_regularisation(model) -> tuple[set[float], set[float], set[float]]:
    """(label smoothings, dropout probabilities of the configs, of the built dropout layers) of the text models."""
    configs = [model.text_encoder.config, model.text_decoder.config]
    layers = [layer for text in (model.text_encoder, model.text_decoder) for layer in text.modules()]
    return (
        {config.label_smoothing for config in configs},
        {p for config in configs for p in (config.hidden_dropout_prob, config.attention_probs_dropout_prob)},
        {layer.p for layer in layers if isinstance(layer, torch.nn.Dropout)},
    )


def test_a_transformers_layout_start_trains_with_blips_regularisation_unless_told(tmp_path, caplog):
    hub = hub_layout_head(tmp_path / "hub")
    with caplog.at_level(logging.WARNING):
        model, _ = start_task_model(BlipForQuestionAnswering, 32, model_name_or_path=str(hub))
    assert text_regularisation(model) == ({0.1}, {0.1}, {0.1})  # the answer decoder's own config too
    assert "no label smoothing and no dropout" in caplog.text
    chosen, _ = start_task_model(BlipForQuestionAnswering, 32, model_name_or_path=str(hub), label_smoothing=0.0,
                                 dropout=0.2)  # fmt: skip
    assert text_regularisation(chosen) == ({0.0}, {0.2}, {0.2})
    caplog.clear()
    tiny_model().save_pretrained(tmp_path / "ours")
    make_tokenizer().save_pretrained(tmp_path / "ours")
    ours, _ = start_task_model(BlipForQuestionAnswering, 32, model_name_or_path=str(tmp_path / "ours"))
    assert text_regularisation(ours) == ({0.1}, {0.0}, {0.0})  # our config's own values are kept
    assert "no label smoothing" not in caplog.text


def token_loss(log_probs: torch.Tensor, target: int) -> torch.Tensor:
    """Cross entropy of one token under label smoothing: (1 - e) * -log p(target) + e * mean over the vocabulary."""
    return (1 - SMOOTHING) * -log_probs[target] + SMOOTHING * -log_probs.mean()


def answer_loss(model, tokenizer, question: str, answer: str, pixels: torch.Tensor) -> torch.Tensor:
    """The original's loss of one answer: its tokens' smoothed cross entropies summed, from the decoder's logits."""
    question_ids = tokenizer([question], return_tensors="pt").input_ids
    answer_ids = tokenizer([answer], return_tensors="pt").input_ids  # [CLS] answer [SEP]; [DEC] replaces [CLS]
    logits = model(question_ids, pixels[None], answer_input_ids=answer_ids).logits[0]  # (L_a, V)
    log_probs = logits.log_softmax(-1)
    return sum(token_loss(log_probs[i], answer_ids[0, i + 1]) for i in range(answer_ids.shape[1] - 1))


def test_the_training_loss_is_the_originals_weighted_answer_loss():
    """loss = sum over questions and their distinct answers of weight x answer loss, / questions; VQA weights are
    count / 10, a Visual Genome answer weighs 0.2 (the original's vqa_dataset and blip_vqa)."""
    model, tokenizer = tiny_model(), make_tokenizer()
    vqa_answers = ["red"] * 6 + ["blue"] * 3 + ["red square"]
    questions = [("what colour is the square ?", vqa_answers), ("how many ?", None)]  # None: Visual Genome
    transform = BlipEvalTransform(32)
    rows = []
    for index, (question, answers) in enumerate(questions):
        unique, weights = vqa_answer_weights(answers) if answers else (["two"], [VG_ANSWER_WEIGHT])
        rows.append({"image": transform(random_image(index)), "question": question, "unique_answers": unique,
                     "answer_weights": weights})  # fmt: skip
    batch = VqaCollator(tokenizer)(rows)
    loss = model(**batch).loss

    counts = {answer: vqa_answers.count(answer) for answer in set(vqa_answers)}
    expected = 0.0
    for row in rows:
        for answer in row["unique_answers"]:
            weight = counts[answer] / 10 if row["question"].startswith("what") else 0.2
            expected = expected + weight * answer_loss(model, tokenizer, row["question"], answer, row["image"])
    assert loss.item() == pytest.approx((expected / len(rows)).item(), rel=1e-5)


CANDIDATES = ["red", "blue", "green square", "yellow", "two", "left"]


def candidate_scores(model, tokenizer, question: str, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each candidate's first-token log-probability, log-likelihood and smoothed answer loss, one forward each."""
    question_ids = tokenizer([question], return_tensors="pt").input_ids
    scores = {"first": [], "log_likelihood": [], "answer_loss": []}
    for candidate in CANDIDATES:
        answer_ids = tokenizer([candidate], return_tensors="pt").input_ids
        log_probs = model(question_ids, pixels[None], answer_input_ids=answer_ids).logits[0].log_softmax(-1)
        targets = answer_ids[0, 1:]
        scores["first"].append(log_probs[0, targets[0]])
        scores["log_likelihood"].append(sum(log_probs[i, target] for i, target in enumerate(targets)))
        scores["answer_loss"].append(-sum(token_loss(log_probs[i], target) for i, target in enumerate(targets)))
    return {name: torch.stack(values) for name, values in scores.items()}


@torch.no_grad()
@pytest.mark.parametrize("k", [len(CANDIDATES), 3])
def test_rank_scores_like_the_original_by_default_and_by_log_likelihood_on_request(k):
    model, tokenizer = tiny_model(), make_tokenizer()
    questions = ["what colour is the square ?", "how many ?", "is the circle left ?", "what colour ?"]
    pixels = torch.stack([BlipEvalTransform(32)(random_image(10 + i)) for i in range(len(questions))])
    encoded = tokenizer(questions, padding="longest", return_tensors="pt")
    candidates = tokenizer(CANDIDATES, padding="longest", return_tensors="pt")
    chosen = {
        scoring: rank_answers(
            model, encoded.input_ids, pixels, candidates.input_ids, encoded.attention_mask,
            candidates.attention_mask, k=k, scoring=scoring,
        ).tolist()
        for scoring in ("answer_loss", "log_likelihood")
    }  # fmt: skip
    for q, question in enumerate(questions):
        scores = candidate_scores(model, tokenizer, question, pixels[q])
        kept = scores["first"].topk(k).indices  # the k most probable first tokens
        for scoring in ("answer_loss", "log_likelihood"):
            assert chosen[scoring][q] == kept[scores[scoring][kept].argmax()].item()
    with pytest.raises(ValueError, match="scoring must be one of"):
        rank_answers(model, encoded.input_ids, pixels, candidates.input_ids, scoring="probability")


def test_generate_and_rank_answer_every_question():
    model, tokenizer = tiny_model(), make_tokenizer()
    dataset = Dataset.from_dict(
        {"image": [random_image(i) for i in range(3)], "question": ["what colour ?"] * 3, "question_id": [7, 8, 9]}
    )
    for inference in ("generate", "rank"):
        predictor = AnswerPredictor(tokenizer, 32, inference, CANDIDATES, k=4, batch_size=2)
        answers = predictor(model, dataset)
        assert sorted(answers) == [7, 8, 9] and all(isinstance(answer, str) for answer in answers.values())
        if inference == "rank":
            assert set(answers.values()) <= set(CANDIDATES)
    with pytest.raises(ValueError, match="candidate answer list"):
        AnswerPredictor(tokenizer, 32, "rank", [])


def test_validation_images_are_held_out_whole():
    dataset = Dataset.from_dict({"image_id": [i // 3 for i in range(30)], "question_id": list(range(30))})
    train, validation = held_out_split(dataset, 0.2, seed=0, group_column="image_id")
    assert len(validation) == 6 and len(train) == 24
    assert not set(train["image_id"]) & set(validation["image_id"])
    with pytest.raises(ValueError, match="held-out share"):
        held_out_split(dataset, 1.5, seed=0)


def test_the_vqa_recipe_sets_the_originals_values_and_bad_input_is_named(tmp_path, capsys):
    script = load_script(SCRIPT)
    parsed = script.parse_with_recipe(script.build_parser(), ["--recipe", "vqa", "--output_dir", str(tmp_path)])
    model_args, inference_args, _, optimization_args, training_args = parsed
    assert (model_args.image_size, inference_args.inference, inference_args.k_test) == (480, "rank", 128)
    assert inference_args.rank_scoring == "answer_loss"  # the original's score unless asked otherwise
    assert (optimization_args.lr_schedule, optimization_args.weight_decay_all) == ("epoch_cosine", True)
    assert (training_args.learning_rate, training_args.num_train_epochs) == (2e-5, 10)
    with pytest.raises(SystemExit):
        script.main(["--output_dir", str(tmp_path), "--rank_scoring", "probability"])
    assert "invalid choice: 'probability'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs --train_files and --test_files"):
        script.main(["--output_dir", str(tmp_path), "--source", "vqa_json"])
    missing = tmp_path / "missing.json"
    with pytest.raises(SystemExit, match="missing.json"):
        script.main(["--output_dir", str(tmp_path), "--source", "vqa_json", "--image_root", str(tmp_path),
                     "--train_files", str(missing), "--test_files", str(missing)])  # fmt: skip


def test_visual_genome_questions_always_train(tmp_path):
    """A held-out question needs several human answers: with one, VQA accuracy is 0 whatever the prediction."""
    random_image(0).save(tmp_path / "image.png")
    vqa = [{"question_id": i, "question": "what colour ?", "answer": ["red"] * 10, "image": "image.png",
            "dataset": "vqa"} for i in range(8)]  # fmt: skip
    vg = [{"question_id": 100 + i, "question": "how many ?", "answer": "two", "image": "image.png", "dataset": "vg"}
          for i in range(4)]  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(vqa + vg))
    (tmp_path / "test.json").write_text(json.dumps(vqa[:2]))
    files = {"train_files": [str(tmp_path / "train.json")], "test_files": [str(tmp_path / "test.json")]}
    splits = load_vqa_splits("vqa_json", **files, image_root=str(tmp_path), validation_share=0.25)
    validation, train = splits["validation"], splits["train"]
    assert len(validation) == 2 and all(len(answers) == 10 for answers in validation["answers"])
    assert sorted([*train["question_id"], *validation["question_id"]]) == [*range(8), *range(100, 104)]
