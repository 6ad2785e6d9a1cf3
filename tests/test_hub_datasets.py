"""`datasets` datasets by name or path (`load_hub_splits`, `--dataset_name`): both on-disk layouts a name can point at
(`save_to_disk` and the hub's parquet layout), images as `Image` features, paths or bytes decoded by the project's
decoder, streaming, bad columns, splits and text, and the fine-tuning scripts end to end. Nothing here calls the hub:
the datasets are built from the synthetic benchmark and saved under the test's directory."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_config, make_tokenizer
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from transformers_blip.benchmark import build_synthetic_benchmark
from transformers_blip.data import BadSampleError, HubDatasetArguments, SkipReport, load_hub_splits, load_image
from transformers_blip.data.hub_datasets import reads_hub_dataset
from transformers_blip.data.text import pre_caption
from transformers_blip.modeling_blip import BlipForQuestionAnswering
from transformers_blip.modeling_nlvr import BlipForVisualReasoning
from transformers_blip.training.vqa import load_vqa_splits

SCRIPTS = Path(__file__).resolve().parents[1] / "training_scripts"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def benchmark() -> DatasetDict:
    return build_synthetic_benchmark(
        seed=0, image_size=32, num_human=4, num_web=1, num_val=2, num_test=2, num_vqa=12, num_vqa_test=6,
        num_nlvr=8, num_nlvr_test=4, num_proc=1,
    )  # fmt: skip


def save_both_layouts(splits: DatasetDict, root: Path) -> dict[str, Path]:
    """The dataset as `save_to_disk` writes it and in the hub's layout (`data/<split>-00000-of-00001.parquet`)."""
    splits.save_to_disk(root / "saved")
    (root / "hub" / "data").mkdir(parents=True)
    for split, data in splits.items():
        data.to_parquet(root / "hub" / "data" / f"{split}-00000-of-00001.parquet")
    return {"saved": root / "saved", "hub": root / "hub"}


@pytest.fixture(scope="session")
def caption_dataset(benchmark, tmp_path_factory) -> dict[str, Path]:
    """COCO-like names: `picture`, `sentences` (five per image), `cocoid`; train, validation and test."""
    names = {"image": "picture", "captions": "sentences", "image_id": "cocoid"}
    splits = DatasetDict(
        {split: benchmark[source].rename_columns(names) for split, source in
         (("train", "human"), ("validation", "val"), ("test", "test"))}
    )  # fmt: skip
    return save_both_layouts(splits, tmp_path_factory.mktemp("hub_captions"))


@pytest.fixture(scope="session")
def vqa_dataset(benchmark, tmp_path_factory) -> dict[str, Path]:
    """VQA v2's layout on the hub: answers as `[{"answer", "answer_id"}]`, train and test only (no validation)."""

    def vqa_v2(data: Dataset) -> Dataset:
        answers = [[{"answer": a, "answer_id": i} for i, a in enumerate(row)] for row in data["answers"]]
        data = data.select_columns(["image", "image_id", "question_id", "question"])
        return data.add_column("answers", answers)

    splits = DatasetDict({"train": vqa_v2(benchmark["vqa_train"]), "test": vqa_v2(benchmark["vqa_test"])})
    return save_both_layouts(splits, tmp_path_factory.mktemp("hub_vqa"))


@pytest.fixture(scope="session")
def nlvr_dataset(benchmark, tmp_path_factory) -> dict[str, Path]:
    """NLVR2 as hub copies name it: `left_image`, `right_image`, `sentence`, `label` as "True"/"False"."""

    def pairs(data: Dataset) -> Dataset:
        labels = ["True" if label else "False" for label in data["label"]]
        data = data.select_columns(["image0", "image1", "sentence"])
        data = data.rename_columns({"image0": "left_image", "image1": "right_image"})
        return data.add_column("label", labels)

    splits = DatasetDict({"train": pairs(benchmark["nlvr_train"]), "test": pairs(benchmark["nlvr_test"])})
    return save_both_layouts(splits, tmp_path_factory.mktemp("hub_nlvr"))


def caption_arguments(path: Path, tmp_path: Path, **overrides) -> HubDatasetArguments:
    settings = {"image_column": "picture", "caption_column": "sentences", "image_id_column": "cocoid"}
    return HubDatasetArguments(
        dataset_name=str(path), dataset_cache_dir=str(tmp_path / "cache"), **{**settings, **overrides}
    )


def pixels(image) -> np.ndarray:
    return np.asarray(load_image(image))


# ------------------------------------------------------------------------------------------------------ library
@pytest.mark.parametrize("layout", ["saved", "hub"])
def test_caption_splits_hold_the_datasets_pairs_and_images_in_the_collators_columns(
    layout, benchmark, caption_dataset, tmp_path
):
    splits = load_hub_splits(caption_arguments(caption_dataset[layout], tmp_path), "caption")
    human = benchmark["human"]
    train = splits["train"]
    assert train.column_names == ["image", "image_id", "caption"]
    assert isinstance(train.features["image"], ImageFeature) and not train.features["image"].decode
    expected = [
        (image_id, pre_caption(c, 30)) for image_id, cs in zip(human["image_id"], human["captions"]) for c in cs
    ]
    assert list(zip(train["image_id"], train["caption"])) == expected
    # The images are the dataset's own bytes, decoded by the project's decoder to the source's pixels.
    first_of_each = {image_id: row for image_id, row in zip(train["image_id"], train)}
    for image_id, source in zip(human["image_id"], human.cast_column("image", ImageFeature(decode=False))):
        assert np.array_equal(pixels(first_of_each[image_id]["image"]), pixels(source["image"]))
    for role, source in (("validation", "val"), ("test", "test")):
        assert splits[role].column_names == ["image", "image_id", "captions"]
        assert splits[role]["image_id"] == benchmark[source]["image_id"]
        assert splits[role]["captions"] == [[pre_caption(c, 30) for c in cs] for cs in benchmark[source]["captions"]]


def test_the_image_column_may_hold_paths_or_bytes(tmp_path):
    colours = ["red", "blue", "green"]
    encoded, paths = [], []
    for index, colour in enumerate(colours):
        buffer = io.BytesIO()
        Image.new("RGB", (12, 10), colour).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
        paths.append(str(tmp_path / f"{index}.png"))
        Path(paths[-1]).write_bytes(encoded[-1])
    texts = [f"a {colour} picture" for colour in colours]
    for name, images, feature in (("paths", paths, Value("string")), ("bytes", encoded, Value("binary"))):
        data = Dataset.from_dict(
            {"img": images, "text": texts}, features=Features({"img": feature, "text": Value("string")})
        )
        DatasetDict({"train": data}).save_to_disk(tmp_path / name)
        arguments = HubDatasetArguments(dataset_name=str(tmp_path / name), image_column="img", caption_column="text")
        train = load_hub_splits(arguments, "pretrain")["train"]
        assert train["caption"] == texts and train["image_id"] == [0, 1, 2]  # ids: the row's number
        decoded = [load_image(row["image"]) for row in train]
        assert [image.getpixel((0, 0)) for image in decoded] == [(255, 0, 0), (0, 0, 255), (0, 128, 0)]


@pytest.mark.parametrize("layout", ["saved", "hub"])
def test_a_streamed_training_split_gives_the_pairs_of_the_whole_one(layout, caption_dataset, tmp_path):
    whole = load_hub_splits(caption_arguments(caption_dataset[layout], tmp_path), "pretrain")["train"]
    streamed = load_hub_splits(caption_arguments(caption_dataset[layout], tmp_path, streaming=True), "pretrain")
    assert streamed["validation"] is None and streamed["test"] is None  # pretraining reads train alone
    rows = list(streamed["train"])
    assert [(row["image_id"], row["caption"]) for row in rows] == list(zip(whole["image_id"], whole["caption"]))
    assert all(
        np.array_equal(pixels(a["image"]), pixels(b["image"]))
        for a, b in zip(rows[::5], whole.select(range(0, 20, 5)))
    )


def test_a_column_or_split_the_dataset_lacks_is_named_with_those_it_has(caption_dataset, nlvr_dataset, tmp_path):
    path = caption_dataset["saved"]
    with pytest.raises(
        ValueError, match=r"no column 'photo' \(--image_column\); its columns: picture, cocoid, sentences"
    ):
        load_hub_splits(caption_arguments(path, tmp_path, image_column="photo"), "caption")
    with pytest.raises(ValueError, match=r"no column 'caption' \(--caption_column\)"):
        load_hub_splits(caption_arguments(path, tmp_path, caption_column="caption"), "caption")
    with pytest.raises(ValueError, match=r"no split 'dev' \(--eval_split\); its splits: train, validation, test"):
        load_hub_splits(caption_arguments(path, tmp_path, eval_split="dev"), "caption")
    with pytest.raises(ValueError, match=r"no column 'left' \(--left_image_column\); its columns: left_image"):
        load_hub_splits(HubDatasetArguments(dataset_name=str(nlvr_dataset["hub"]), left_image_column="left",
                                            dataset_cache_dir=str(tmp_path / "cache")), "nlvr")  # fmt: skip
    with pytest.raises(ValueError, match="unknown task 'ocr'"):
        load_hub_splits(caption_arguments(path, tmp_path), "ocr")


def test_unusable_text_skips_its_row_counted_or_raises_in_strict_mode(tmp_path):
    image = {"bytes": None, "path": "unused.png"}  # never decoded here: only the text is read
    pairs = Dataset.from_dict(
        {"image": [image] * 3, "left_image": [image] * 3, "right_image": [image] * 3,
         "caption": ["a red square", "...", "a blue circle"], "sentence": ["both are red", "one is blue", "!!"],
         "label": ["True", "maybe", "false"]},
    )  # fmt: skip
    DatasetDict({"train": pairs, "test": pairs}).save_to_disk(tmp_path / "pairs")
    arguments = HubDatasetArguments(dataset_name=str(tmp_path / "pairs"))
    report = SkipReport()
    train = load_hub_splits(arguments, "pretrain", report=report)["train"]
    assert train["caption"] == ["a red square", "a blue circle"] and train["image_id"] == [0, 2]
    nlvr = load_hub_splits(arguments, "nlvr", report=report)
    assert nlvr["validation"] is None  # no validation split: the script holds a share of train out
    assert nlvr["train"]["sentence"] == ["both are red"] and nlvr["train"]["label"] == [1]
    # Twice the caption (the row and its one text), and per NLVR2 split a bad label and an empty statement.
    assert report.counts() == {"empty_caption": 4, "missing_field": 2}
    with pytest.raises(BadSampleError, match="empty_caption"):
        load_hub_splits(arguments, "pretrain", report=SkipReport(strict=True))


@pytest.mark.parametrize("layout", ["saved", "hub"])
def test_vqa_answers_of_any_layout_become_blips_weighted_targets(layout, benchmark, vqa_dataset, tmp_path):
    arguments = HubDatasetArguments(dataset_name=str(vqa_dataset[layout]), dataset_cache_dir=str(tmp_path / "c"))
    splits = load_hub_splits(arguments, "vqa")
    source = benchmark["vqa_train"]
    train = splits["train"]
    assert splits["validation"] is None
    assert train["answers"] == source["answers"] and train["question_id"] == source["question_id"]
    assert train["unique_answers"] == source["unique_answers"]
    assert np.allclose(np.concatenate(train["answer_weights"]), np.concatenate(source["answer_weights"]))
    assert train["image_id"] == source["image_id"]
    # Without an answers column (test questions), every question has none; the script then reports no accuracy.
    arguments.answers_column = "no_such_column"
    assert all(answers == [] for answers in load_hub_splits(arguments, "vqa")["test"]["answers"])
    # The VQA loader holds validation questions out of train, whole images at a time, as for the JSON files.
    held = load_vqa_splits(
        "hub", validation_share=0.25, hub_arguments=HubDatasetArguments(dataset_name=str(vqa_dataset["saved"]))
    )
    assert not set(held["train"]["image_id"]) & set(held["validation"]["image_id"])
    assert len(held["train"]) + len(held["validation"]) == len(source)


def test_evaluation_rows_of_one_caption_each_are_grouped_by_image(tmp_path):
    image = {"bytes": None, "path": "unused.png"}
    rows = Dataset.from_dict({"image": [image] * 4, "caption": ["a", "b", "c", "d"], "image_id": [7, 9, 7, 7]})
    DatasetDict({"train": rows, "validation": rows, "test": rows}).save_to_disk(tmp_path / "coco")
    splits = load_hub_splits(HubDatasetArguments(dataset_name=str(tmp_path / "coco")), "caption")
    assert splits["train"]["caption"] == ["a", "b", "c", "d"]
    assert splits["test"]["image_id"] == [7, 9] and splits["test"]["captions"] == [["a", "c", "d"], ["b"]]


def test_flags_that_contradict_each_other_are_refused():
    assert not reads_hub_dataset(HubDatasetArguments(), "coco_karpathy")
    assert reads_hub_dataset(HubDatasetArguments(dataset_name="x"), "synthetic")
    with pytest.raises(ValueError, match="replaces --source"):
        reads_hub_dataset(HubDatasetArguments(dataset_name="x"), "coco_karpathy")
    with pytest.raises(ValueError, match="none was given"):
        reads_hub_dataset(HubDatasetArguments(streaming=True), "synthetic")
    with pytest.raises(ValueError, match="drop --streaming"):
        reads_hub_dataset(HubDatasetArguments(dataset_name="x", streaming=True), "synthetic")
    assert reads_hub_dataset(HubDatasetArguments(dataset_name="x", streaming=True), "synthetic", can_stream=True)


# ------------------------------------------------------------------------------------------------------ scripts
def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its argument dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


SHORT_RUN = [
    "--image_size", "32", "--max_steps", "2", "--num_train_epochs", "1", "--learning_rate", "1e-3",
    "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--save_strategy", "no", "--eval_strategy", "no",
    "--load_best_model_at_end", "false",
]  # fmt: skip


def saved_model(model_class, root: Path) -> Path:
    torch.manual_seed(0)
    model_class(make_config()).save_pretrained(root)
    make_tokenizer().save_pretrained(root)
    return root


def test_finetune_caption_trains_and_evaluates_on_a_saved_dataset(benchmark, caption_dataset, tmp_path):
    output = tmp_path / "run"
    load_script("finetune_caption").main([
        "--output_dir", str(output), "--dataset_name", str(caption_dataset["saved"]), "--image_column", "picture",
        "--caption_column", "sentences", "--image_id_column", "cocoid", *SHORT_RUN,
        "--per_device_train_batch_size", "4", "--vocab_size", "200", "--max_length", "8",
    ])  # fmt: skip
    results = json.loads((output / "test_results.json").read_text())
    assert sorted(entry["image_id"] for entry in results) == sorted(benchmark["test"]["image_id"])
    assert "CIDEr" in json.loads((output / "metrics.json").read_text())["test"]
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    script = load_script("finetune_caption")
    with pytest.raises(SystemExit, match="replaces --source"):
        script.main(
            ["--output_dir", str(tmp_path / "x"), "--dataset_name", "x", "--source", "coco_karpathy", *SHORT_RUN]
        )
    with pytest.raises(SystemExit, match="reads its training split whole.*drop --streaming"):
        script.main(["--output_dir", str(tmp_path / "x"), "--dataset_name", "x", "--streaming", *SHORT_RUN])


def test_finetune_vqa_holds_validation_out_of_a_hub_layout_dataset(benchmark, vqa_dataset, tmp_path):
    output = tmp_path / "run"
    model = saved_model(BlipForQuestionAnswering, tmp_path / "model")
    metrics = load_script("finetune_vqa").main([
        "--output_dir", str(output), "--model_name_or_path", str(model), "--dataset_name", str(vqa_dataset["hub"]),
        "--dataset_cache_dir", str(tmp_path / "cache"), "--validation_share", "0.25", "--k_test", "4",
        "--per_device_train_batch_size", "4", *SHORT_RUN,
    ])  # fmt: skip
    answered = json.loads((output / "vqa_result.json").read_text())
    assert sorted(entry["question_id"] for entry in answered) == sorted(benchmark["vqa_test"]["question_id"])
    assert metrics["test_questions"] == 6 and 0.0 <= metrics["test_accuracy"] <= 100.0


def test_finetune_nlvr_reads_pairs_with_text_labels(benchmark, nlvr_dataset, tmp_path):
    output = tmp_path / "run"
    model = saved_model(BlipForVisualReasoning, tmp_path / "model")
    metrics = load_script("finetune_nlvr").main([
        "--output_dir", str(output), "--model_name_or_path", str(model), "--dataset_name", str(nlvr_dataset["saved"]),
        "--validation_share", "0.25", "--per_device_train_batch_size", "3", *SHORT_RUN,
    ])  # fmt: skip
    assert metrics["test_pairs"] == len(benchmark["nlvr_test"]) and 0.0 <= metrics["test_accuracy"] <= 100.0
    # The text labels arrive as the 0/1 the accuracy compares with.
    results = json.loads((output / "nlvr_result.json").read_text())
    assert [entry["label"] for entry in results] == benchmark["nlvr_test"]["label"]


def test_pretrain_streams_a_hub_layout_dataset(caption_dataset, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("pretrain_script", SCRIPTS / "pretrain.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses look their module up while the file runs
    spec.loader.exec_module(script)
    output = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        "pretrain.py", "--output_dir", str(output), "--dataset_name", str(caption_dataset["hub"]), "--streaming",
        "--dataset_cache_dir", str(tmp_path / "cache"), "--image_column", "picture", "--caption_column", "sentences",
        "--image_id_column", "cocoid", "--use_image_ids", "--image_size", "32", "--vocab_size", "200",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no", "--disable_tqdm", "true",
        "--use_cpu", "--report_to", "none", "--logging_steps", "1",
    ])  # fmt: skip
    script.main()
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    losses = [entry for entry in state["log_history"] if "loss" in entry]
    assert losses and all(np.isfinite(entry["loss"]) for entry in losses)


def test_finetune_retrieval_ranks_and_pushes_the_head_of_a_saved_dataset(caption_dataset, tmp_path, monkeypatch):
    """Pushed, the head alone (not Trainer's training model with its momentum copies) goes up with its processor,
    then the card with the recalls; the hub calls are replaced."""
    import transformers
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    calls = []

    def init_hf_repo(self, token=None, private=None):
        self.hub_model_id = "me/retrieval"

    def create_repo(self, repo_id, **kwargs):
        return type("Repo", (), {"repo_id": repo_id})

    def no_card_yet(repo_id, **kwargs):
        raise EntryNotFoundError("no README.md")

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls.append(("head", repo_id, sorted(path.name for path in Path(folder_path).iterdir())))

    def processor_push(self, repo_id, **kwargs):
        calls.append(("processor", repo_id))

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        calls.append(("card", repo_id, path_or_fileobj.decode("utf-8")))

    monkeypatch.setattr(transformers.Trainer, "init_hf_repo", init_hf_repo)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(ModelCard, "load", no_card_yet)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(transformers.ProcessorMixin, "push_to_hub", processor_push)
    monkeypatch.setattr(HfApi, "upload_file", upload_file)
    output = tmp_path / "run"
    metrics = load_script("finetune_retrieval").main([
        "--output_dir", str(output), "--dataset_name", str(caption_dataset["saved"]), "--image_column", "picture",
        "--caption_column", "sentences", "--image_id_column", "cocoid", *SHORT_RUN,
        "--per_device_train_batch_size", "4", "--vocab_size", "200", "--queue_size", "8", "--k_test", "2",
        "--push_to_hub", "true",
    ])  # fmt: skip
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2
    assert 0.0 <= metrics["test"]["r_mean"] <= 100.0
    assert [call[0] for call in calls] == ["head", "processor", "card"]
    assert calls[0][1] == "me/retrieval" and "model.safetensors" in calls[0][2]
    assert json.loads((output / "config.json").read_text())["architectures"] == ["BlipForImageTextRetrieval"]
    assert f"| test_r_mean | {metrics['test']['r_mean']:.4g} |" in calls[2][2]


def test_capfilt_bootstraps_a_hub_layout_dataset(tmp_path, monkeypatch):
    from transformers_blip import BlipForConditionalGeneration, BlipForImageTextRetrieval, build_processor

    web = build_synthetic_benchmark(
        num_human=1, num_web=4, num_val=1, num_test=1, num_vqa=3, num_nlvr=1, image_size=32
    )
    web = (
        web["web"].select_columns(["image", "caption", "image_id"]).rename_columns({"image": "jpg", "caption": "alt"})
    )
    dataset = save_both_layouts(DatasetDict({"train": web}), tmp_path / "web")
    processor = build_processor(make_tokenizer(), image_size=32)
    torch.manual_seed(0)
    for name, model_class in (("captioner", BlipForConditionalGeneration), ("filter", BlipForImageTextRetrieval)):
        model_class(make_config()).save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    spec = importlib.util.spec_from_file_location("capfilt_script", SCRIPTS / "capfilt.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)
    spec.loader.exec_module(script)
    output = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "capfilt.py", "--captioner", str(tmp_path / "captioner"), "--filter", str(tmp_path / "filter"),
        "--output_dir", str(output), "--dataset_name", str(dataset["hub"]), "--dataset_cache_dir", str(tmp_path / "c"),
        "--image_column", "jpg", "--caption_column", "alt", "--num_captions", "1", "--batch_size", "4",
        "--num_workers", "0", "--threshold", "0.0",
    ])  # fmt: skip
    assert script.main() == 0
    kept = Dataset.from_parquet([str(path) for path in sorted(output.glob("data-*.parquet"))])
    # Threshold 0 keeps every text: each image's web caption and its one synthetic caption.
    assert sorted(kept["image_id"]) == sorted(list(web["image_id"]) * 2)
    monkeypatch.setattr(sys, "argv", [*sys.argv[:-1], "0.0", "--streaming"])
    assert script.main() == 2  # CapFilt shards its input by length: a stream is refused, with the reason


def test_blip_caption_captions_a_datasets_split_and_resumes(benchmark, caption_dataset, tmp_path, capsys):
    from transformers_blip import BlipForConditionalGeneration, BlipImageTextProcessor, build_processor
    from transformers_blip.cli import main

    torch.manual_seed(0)
    model = BlipForConditionalGeneration(make_config()).eval()
    model.save_pretrained(tmp_path / "captioner")
    build_processor(make_tokenizer(), image_size=32).save_pretrained(tmp_path / "captioner")
    output = tmp_path / "captions.jsonl"
    name = str(caption_dataset["saved"])
    base = ["caption", "--dataset-name", name, "--model", str(tmp_path / "captioner"), "--output", str(output)]
    base += ["--quiet", "--num-workers", "1"]
    command = [*base, "--split", "validation", "--image-column", "picture"]
    assert main(command) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    images = benchmark["val"]["image"]
    assert [record["image"] for record in records] == [f"{name}[validation]:{row}" for row in range(len(images))]
    processor = BlipImageTextProcessor.from_pretrained(tmp_path / "captioner")
    for record, image in zip(records, images):
        generated = model.generate(**processor(images=image, return_tensors="pt"), num_beams=3, min_length=5)
        assert record["caption"] == processor.decode_captions(generated)[0]
    output.write_text(output.read_text().splitlines()[0] + "\n")  # a run cut short after its first image
    assert main(command) == 0
    assert [json.loads(line)["image"] for line in output.read_text().splitlines()] == [r["image"] for r in records]
    assert "1 already done" in capsys.readouterr().out
    streamed = tmp_path / "streamed.jsonl"
    assert main([*command, "--streaming", "--output", str(streamed)]) == 0  # the last --output counts
    assert [json.loads(line) for line in streamed.read_text().splitlines()] == records
    assert main([*base, "--split", "validation"]) == 2
    assert "no column 'image' (--image-column); its columns: picture" in capsys.readouterr().err
    assert main([*base, "--split", "dev", "--image-column", "picture"]) == 2
    assert "no split 'dev' (--split); its splits: train, validation, test" in capsys.readouterr().err
    assert main(["caption", "--dataset-name", name, "--model", str(tmp_path / "captioner"), "--sidecar", ".txt"]) == 2
    assert "a dataset's rows have no file to put a sidecar beside: give --output" in capsys.readouterr().err
    assert main(["caption", "--model", str(tmp_path / "captioner"), "--output", str(output)]) == 2
    assert "nothing to caption" in capsys.readouterr().err


def test_a_pushed_fine_tuned_model_carries_a_card_with_its_metrics(nlvr_dataset, tmp_path, monkeypatch):
    """Up to the network boundary: Trainer's repo creation and push, and the card's upload, are replaced."""
    import transformers
    import yaml
    from huggingface_hub import HfApi

    calls = []

    def init_hf_repo(self, token=None, private=None):
        self.hub_model_id = "someone/blip-nlvr"

    def trainer_push(self, commit_message="End of training", **kwargs):
        calls.append(("trainer push", commit_message))

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        calls.append(("upload", path_in_repo, repo_id, path_or_fileobj.decode("utf-8")))

    monkeypatch.setattr(transformers.Trainer, "init_hf_repo", init_hf_repo)
    monkeypatch.setattr(transformers.Trainer, "push_to_hub", trainer_push)
    monkeypatch.setattr(HfApi, "upload_file", upload_file)
    output = tmp_path / "run"
    model = saved_model(BlipForVisualReasoning, tmp_path / "model")
    metrics = load_script("finetune_nlvr").main([
        "--output_dir", str(output), "--model_name_or_path", str(model), "--dataset_name", str(nlvr_dataset["saved"]),
        "--validation_share", "0.25", "--per_device_train_batch_size", "3", *SHORT_RUN, "--push_to_hub", "true",
    ])  # fmt: skip
    assert [call[0] for call in calls] == ["trainer push", "upload"]  # the weights, then the card
    _, path_in_repo, repo_id, card = calls[1]
    assert (path_in_repo, repo_id) == ("README.md", "someone/blip-nlvr")
    assert (output / "README.md").read_text() == card
    _, front_matter, body = card.split("---\n", 2)
    results = yaml.safe_load(front_matter)["model-index"][0]["results"][0]
    assert results["dataset"]["name"] == str(nlvr_dataset["saved"])
    assert {entry["type"]: entry["value"] for entry in results["metrics"]} == {
        "test_accuracy": metrics["test_accuracy"]  # no validation during this short run: no validation accuracy
    }
    assert f"| test_accuracy | {metrics['test_accuracy']:.4g} |" in body
