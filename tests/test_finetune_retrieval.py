"""Retrieval fine-tuning: the loss against the original's formulas (blip_retrieval.py), its hard-negative weights,
the alpha ramp, and training_scripts/finetune_retrieval.py end to end, resumed, and on two processes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_config
from dist_retrieval_training import BATCH_IDS, QUEUE_SIZE, make_batch, make_training_model, recording_sampler
from safetensors.torch import load_file

import transformers_blip.modeling_pretraining as modeling_pretraining
from transformers_blip import BlipForImageTextRetrieval, BlipForPreTraining, BlipForRetrievalTraining
from transformers_blip.evaluation.retrieval_eval import retrieval_scores, retrieval_texts
from transformers_blip.losses import NEGATIVE_SAMPLING_FLOOR, sample_hard_negatives
from transformers_blip.training.captioning import load_caption_splits
from transformers_blip.training.retrieval import (
    RetrievalEvaluation,
    retrieval_training_model,
    start_retrieval_head,
)

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "finetune_retrieval.py"
DIST_SCRIPT = Path(__file__).with_name("dist_retrieval_training.py")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread for this file's tests (the tiny model runs faster so on a loaded machine); restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def original_retrieval_losses(model, batch, alpha, queues, negative_image_indices, negative_text_indices):
    """BLIP_Retrieval.forward (models/blip_retrieval.py) on one process, written out from its formulas, with the
    negatives the model drew."""
    image, ids, mask, idx = batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["image_ids"]
    image_queue, text_queue, idx_queue = queues
    temp = model.temp.detach().clamp(0.001, 0.5)
    image_embeds = model.vision_model(image).last_hidden_state
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
    text_output = model.text_encoder(ids, attention_mask=mask, mode="text").last_hidden_state
    text_feat = F.normalize(model.text_proj(text_output[:, 0, :]), dim=-1)

    idx = idx.view(-1, 1)
    idx_all = torch.cat([idx.t(), idx_queue], dim=1)
    pos_idx = torch.eq(idx, idx_all).float()
    sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
    with torch.no_grad():
        image_embeds_m = model.vision_model_m(image).last_hidden_state
        image_feat_m = F.normalize(model.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
        image_feat_m_all = torch.cat([image_feat_m.t(), image_queue], dim=1)
        text_output_m = model.text_encoder_m(ids, attention_mask=mask, mode="text").last_hidden_state
        text_feat_m = F.normalize(model.text_proj_m(text_output_m[:, 0, :]), dim=-1)
        text_feat_m_all = torch.cat([text_feat_m.t(), text_queue], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_m_all / temp
        sim_t2i_m = text_feat_m @ image_feat_m_all / temp
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_m_all / temp
    sim_t2i = text_feat @ image_feat_m_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    loss_ita = (loss_i2t + loss_t2i) / 2

    encoder_input_ids = ids.clone()
    encoder_input_ids[:, 0] = model.config.text_config.encoder_token_id
    bs = image.size(0)
    output_pos = model.text_encoder(
        encoder_input_ids, attention_mask=mask, encoder_hidden_states=image_embeds, mode="multimodal"
    ).last_hidden_state
    image_embeds_neg = torch.stack([image_embeds[i] for i in negative_image_indices.tolist()])
    text_ids_neg = torch.stack([encoder_input_ids[i] for i in negative_text_indices.tolist()])
    text_atts_neg = torch.stack([mask[i] for i in negative_text_indices.tolist()])
    text_ids_all = torch.cat([encoder_input_ids, text_ids_neg], dim=0)
    text_atts_all = torch.cat([mask, text_atts_neg], dim=0)
    image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
    output_neg = model.text_encoder(
        text_ids_all, attention_mask=text_atts_all, encoder_hidden_states=image_embeds_all, mode="multimodal"
    ).last_hidden_state
    vl_embeddings = torch.cat([output_pos[:, 0, :], output_neg[:, 0, :]], dim=0)
    vl_output = model.itm_head(vl_embeddings)
    itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)], dim=0)
    return loss_ita, F.cross_entropy(vl_output, itm_labels), image_feat.detach(), text_feat.detach(), temp


def test_retrieval_loss_equals_the_original_formulas_with_its_negatives(monkeypatch):
    model, batch = make_training_model(), make_batch()
    queues = (model.image_queue.clone(), model.text_queue.clone(), model.idx_queue.clone())
    drawn = []
    monkeypatch.setattr(modeling_pretraining, "sample_hard_negatives", recording_sampler(drawn))
    output = model(**batch, alpha=0.3)
    loss_ita, loss_itm, image_feat, text_feat, temp = original_retrieval_losses(
        model, batch, 0.3, queues, output.itm_negative_image_indices, output.itm_negative_text_indices
    )
    # The queued captions of images 3 and 7 are positives of the batch's pairs of those images.
    assert torch.eq(torch.tensor(BATCH_IDS)[:, None], queues[2]).any()
    torch.testing.assert_close(output.loss_itc, loss_ita, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.loss_itm, loss_itm, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.loss, loss_ita + loss_itm, rtol=0, atol=1e-5)

    # The negatives' weights are the original's: softmax of the online similarities of the batch, same ids zeroed,
    # no floor (texts for each image first, then images for each text).
    (i2t_logits, i2t_positives, i2t_floor), (t2i_logits, t2i_positives, t2i_floor) = drawn
    same_id = torch.tensor(BATCH_IDS)[:, None] == torch.tensor(BATCH_IDS)[None, :]
    torch.testing.assert_close(i2t_logits, image_feat @ text_feat.t() / temp, rtol=0, atol=1e-5)
    torch.testing.assert_close(t2i_logits, text_feat @ image_feat.t() / temp, rtol=0, atol=1e-5)
    assert torch.equal(i2t_positives, same_id) and torch.equal(t2i_positives, same_id)
    assert i2t_floor == 0.0 and t2i_floor == 0.0


def test_a_same_id_pair_is_never_drawn_as_a_negative():
    model, batch = make_training_model(), make_batch()
    same_id = torch.tensor(BATCH_IDS)[:, None] == torch.tensor(BATCH_IDS)[None, :]
    rows = torch.arange(len(BATCH_IDS))
    for seed in range(12):
        torch.manual_seed(seed)
        output = model(**batch)
        assert not same_id[rows, output.itm_negative_image_indices].any()
        assert not same_id[rows, output.itm_negative_text_indices].any()


def test_negative_weights_are_the_masked_softmax_without_a_floor():
    logits = torch.tensor([[2.0, 1.0, 0.0, 3.0], [-200.0, 0.0, 50.0, 0.0]])
    positives = torch.tensor([[False, False, False, True], [False, False, True, False]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(logits, positives, generator, floor=0.0) for _ in range(4000)])
    # Row 0: the frequencies follow softmax(logits) with the positive zeroed, renormalised.
    expected = F.softmax(logits[0], dim=0).masked_fill(positives[0], 0.0)
    expected = expected / expected.sum()
    frequencies = torch.bincount(draws[:, 0], minlength=4).float() / draws.shape[0]
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.03)
    # Row 1: candidate 0's softmax weight underflows to 0, so without a floor it is never drawn; pretraining's floor
    # gives it about the chance of the other non-positive candidates, whose weights are tiny too.
    assert set(draws[:, 1].tolist()) == {1, 3}
    floored = torch.stack([sample_hard_negatives(logits, positives, generator) for _ in range(400)])
    assert 0 in floored[:, 1].tolist()


def test_a_row_whose_weights_all_underflow_draws_a_non_positive_candidate():
    logits = torch.tensor([[0.0, -300.0, -300.0, 100.0]])
    positives = torch.tensor([[True, False, False, True]])
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_hard_negatives(logits, positives, generator, floor=0.0)) for _ in range(50)}
    assert draws == {1, 2}


def test_retrieval_negatives_use_online_features_and_pretraining_momentum_ones():
    assert BlipForRetrievalTraining.negative_candidate_features == "online"
    assert BlipForRetrievalTraining.negative_sampling_floor == 0.0
    assert BlipForPreTraining.negative_candidate_features == "momentum"
    assert BlipForPreTraining.negative_sampling_floor == NEGATIVE_SAMPLING_FLOOR


def test_image_ids_are_required():
    model, batch = make_training_model(), make_batch()
    del batch["image_ids"]
    with pytest.raises(ValueError, match="image_ids"):
        model(**batch)


def test_alpha_ramps_over_the_first_epoch_only_as_the_original():
    torch.manual_seed(0)
    head = BlipForImageTextRetrieval(make_config(queue_size=QUEUE_SIZE))
    steps_per_epoch = 6
    model = retrieval_training_model(head, steps_per_epoch, alpha=0.4)
    for step in range(3 * steps_per_epoch):
        epoch, i = divmod(step, steps_per_epoch)
        original = 0.4 * min(1, i / steps_per_epoch) if epoch == 0 else 0.4  # train_retrieval.py
        assert model.distillation_alpha(step) == pytest.approx(original, abs=1e-12)
    model.optimizer_steps = 2  # what MomentumUpdateCallback sets from the Trainer's global step
    assert model(**make_batch()).alpha == pytest.approx(0.4 * 2 / steps_per_epoch)


def test_the_training_model_starts_from_the_head_and_ends_as_it():
    torch.manual_seed(0)
    head = BlipForImageTextRetrieval(make_config(queue_size=QUEUE_SIZE))
    model = BlipForRetrievalTraining.from_retrieval_model(head)
    for online, momentum in modeling_pretraining.MOMENTUM_PAIRS:
        for name, param_m in getattr(model, momentum).named_parameters():
            assert torch.equal(param_m, getattr(model, online).get_parameter(name)), f"{momentum}.{name}"
            assert not param_m.requires_grad
    for name, tensor in head.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    model(**make_batch()).loss.backward()
    ended = model.to_retrieval_model()
    assert type(ended) is BlipForImageTextRetrieval
    assert ended.state_dict().keys() == head.state_dict().keys()


def load_script():
    spec = importlib.util.spec_from_file_location("finetune_retrieval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script defines them
    spec.loader.exec_module(module)
    return module


SYNTHETIC = {"num_human": 8, "num_val": 4, "num_test": 5}
SCRIPT_ARGS = [
    "--image_size", "32", "--synthetic_num_human", "8", "--synthetic_num_val", "4", "--synthetic_num_test", "5",
    "--num_train_epochs", "2", "--per_device_train_batch_size", "10", "--per_device_eval_batch_size", "8",
    "--learning_rate", "1e-3", "--logging_steps", "1", "--disable_tqdm", "true", "--vocab_size", "200",
    "--queue_size", "12", "--k_test", "4", "--dataloader_num_workers", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, dict]:
    output_dir = tmp_path_factory.mktemp("retrieval") / "run"
    metrics = load_script().main(["--output_dir", str(output_dir), *SCRIPT_ARGS])
    return output_dir, metrics


def test_the_script_writes_metrics_results_and_rankings(finished_run):
    output_dir, metrics = finished_run
    written = json.loads((output_dir / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    names = {f"{way}_r{k}" for way in ("txt", "img") for k in (1, 5, 10)} | {"txt_r_mean", "img_r_mean", "r_mean"}
    for split in ("val", "test"):
        assert set(written[split]) == names
        assert all(0.0 <= value <= 100.0 for value in written[split].values())
    # The best checkpoint is the epoch of the highest validation r_mean (the first such epoch on ties).
    state = json.loads((output_dir / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_r_mean" in entry]
    assert [entry["step"] for entry in evaluations] == [4, 8]  # 40 pairs, 10 a step: every epoch
    best = max(evaluations, key=lambda entry: entry["eval_r_mean"])
    assert written["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert written["val"]["r_mean"] == best["eval_r_mean"]
    assert "| test |" in (output_dir / "results.md").read_text()
    # Each training log carries both parts of the loss, which add up to it, and alpha ramping over the first epoch.
    training_logs = [entry for entry in state["log_history"] if "loss_itc" in entry]
    assert len(training_logs) == 8
    for entry in training_logs:
        assert entry["loss"] == pytest.approx(entry["loss_itc"] + entry["loss_itm"], abs=2e-3)
    assert [entry["alpha"] for entry in training_logs[:4]] == sorted(entry["alpha"] for entry in training_logs[:4])
    assert training_logs[-1]["alpha"] == pytest.approx(0.4)

    # The rankings of the test split: its 25 texts, every image's 10 best texts and every text's 5 images.
    _, _, test = load_caption_splits("synthetic", synthetic_kwargs={"image_size": 32, **SYNTHETIC})
    texts, text_to_image = retrieval_texts(test)
    rankings = json.loads((output_dir / "retrieval_result.json").read_text())
    assert [entry["caption"] for entry in rankings["texts"]] == texts
    assert [entry["image_id"] for entry in rankings["texts"]] == [test["image_id"][i] for i in text_to_image]
    assert [entry["image_id"] for entry in rankings["image_to_text"]] == test["image_id"]
    for entry in rankings["image_to_text"]:
        assert len(entry["text_ids"]) == 10 and len(set(entry["text_ids"])) == 10
        assert all(0 <= text_id < len(texts) for text_id in entry["text_ids"])
    for entry in rankings["text_to_image"]:
        assert sorted(entry["image_ids"]) == sorted(test["image_id"])


def test_the_saved_head_loads_plainly_and_scores_like_the_best_checkpoint(finished_run):
    output_dir, metrics = finished_run
    head, info = BlipForImageTextRetrieval.from_pretrained(output_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not any("_m." in name or "queue" in name for name in load_file(output_dir / "model.safetensors"))
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(output_dir)
    trained = BlipForRetrievalTraining.from_pretrained(metrics["best_checkpoint"]).eval()
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    encoded = processor.tokenizer(["a red square", "a big blue circle on the left"], return_tensors="pt", padding=True)
    for saved, reference in zip(
        retrieval_scores(head, pixel_values, encoded["input_ids"], encoded["attention_mask"], k_test=2),
        retrieval_scores(trained, pixel_values, encoded["input_ids"], encoded["attention_mask"], k_test=2),
    ):
        torch.testing.assert_close(saved, reference, rtol=0, atol=1e-6)
    # Its recall on the test split is the one the run reported.
    _, _, test = load_caption_splits("synthetic", synthetic_kwargs={"image_size": 32, **SYNTHETIC})
    recalls = RetrievalEvaluation(processor.tokenizer, 32, k_test=4)(head, test)
    assert recalls == pytest.approx(metrics["test"])


def test_evaluation_only_ranks_the_splits_with_the_model_as_it_is(finished_run, tmp_path):
    output_dir, metrics = finished_run
    evaluated_dir = tmp_path / "evaluated"
    arguments = ["--output_dir", str(evaluated_dir), *SCRIPT_ARGS, "--do_train", "false"]
    summary = load_script().main([*arguments, "--model_name_or_path", str(output_dir)])
    assert summary["evaluated"] == str(output_dir) and summary["start"] == "ours"
    assert summary["test"] == pytest.approx(metrics["test"])  # the saved head is the best checkpoint's
    assert json.loads((evaluated_dir / "metrics.json").read_text()) == json.loads(json.dumps(summary))
    assert "without training" in (evaluated_dir / "results.md").read_text()
    assert not list(evaluated_dir.glob("checkpoint-*"))
    written = json.loads((evaluated_dir / "retrieval_result.json").read_text())
    assert written == json.loads((output_dir / "retrieval_result.json").read_text())
    with pytest.raises(SystemExit):  # nothing to evaluate
        load_script().main(arguments)


def test_a_resumed_run_ends_on_the_weights_of_an_uninterrupted_one(finished_run, tmp_path):
    output_dir, _ = finished_run
    # Stopped after epoch 1 and resumed: the last epoch ends on the same weights, momentum encoders and queues.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(output_dir / "checkpoint-4", resumed_dir / "checkpoint-4")
    load_script().main(["--output_dir", str(resumed_dir), *SCRIPT_ARGS, "--resume_from_checkpoint"])
    final, resumed = (load_file(path / "checkpoint-8" / "model.safetensors") for path in (output_dir, resumed_dir))
    assert final.keys() == resumed.keys()
    assert {"image_queue", "idx_queue", "queue_ptr", "vision_proj_m.weight"} <= final.keys()
    assert all(torch.equal(final[name], resumed[name]) for name in final), [
        name for name in final if not torch.equal(final[name], resumed[name])
    ]


def test_two_processes_train_with_negatives_from_every_rank(tmp_path):
    output_dir = tmp_path / "two_ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    arguments = [*SCRIPT_ARGS, "--num_train_epochs", "1", "--per_device_train_batch_size", "5", "--negative_all_rank"]
    result = subprocess.run(
        [*command, "--output_dir", str(output_dir), *arguments, "--dataloader_num_workers", "0"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = json.loads((output_dir / "metrics.json").read_text())
    assert written["best_checkpoint"].endswith("checkpoint-4")  # 40 pairs, 2 ranks x 5 a step
    assert all(0.0 <= value <= 100.0 for split in ("val", "test") for value in written[split].values())
    rankings = json.loads((output_dir / "retrieval_result.json").read_text())
    assert len(rankings["texts"]) == 25 and len(rankings["image_to_text"]) == 5
    config = json.loads((output_dir / "config.json").read_text())
    assert config["architectures"] == ["BlipForImageTextRetrieval"] and config["negative_all_rank"] is True


def heads_64_wide_config():
    """A tiny config whose attention heads are 64 wide, as every released BLIP's: an original `.pth` of it loads
    with its config inferred from the tensor shapes."""
    from transformers_blip import BlipConfig, BlipTextConfig, BlipVisionConfig

    text = BlipTextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    vision = BlipVisionConfig(
        hidden_size=64, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1, image_size=32, patch_size=8
    )
    return BlipConfig(text_config=text, vision_config=vision, embed_dim=32)


def test_every_kind_of_start_gives_the_retrieval_head(tmp_path):
    from conftest import make_tokenizer

    from transformers_blip.convert.original import save_original_checkpoint
    from transformers_blip.convert.transformers_layout import save_in_transformers_layout

    torch.manual_seed(0)
    head, tokenizer = BlipForImageTextRetrieval(heads_64_wide_config()), make_tokenizer()
    pretraining = BlipForPreTraining(heads_64_wide_config())
    # As the original's retrieval checkpoints, with momentum weights and queues, which the head leaves out.
    save_original_checkpoint(BlipForRetrievalTraining.from_retrieval_model(head), tmp_path / "retrieval.pth")
    for name, save in (
        ("ours", head.save_pretrained),
        ("transformers", lambda path: save_in_transformers_layout(head, path)),
        ("pretraining", pretraining.save_pretrained),
    ):
        save(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)

    pth = {"model_name_or_path": str(tmp_path / "retrieval.pth"), "tokenizer_name_or_path": str(tmp_path / "ours")}
    starts = {
        "ours": {"model_name_or_path": str(tmp_path / "ours")},
        "transformers": {"model_name_or_path": str(tmp_path / "transformers")},
        "original": pth,
        "pretraining": {"pretraining_checkpoint": str(tmp_path / "pretraining")},
    }
    compared = ("itm_head.weight", "vision_proj.weight", "text_encoder.encoder.layer.1.crossattention.self.key.weight")
    for kind, arguments in starts.items():
        started, started_tokenizer, start = start_retrieval_head(32, **arguments)
        assert start == kind and type(started) is BlipForImageTextRetrieval
        assert started_tokenizer.get_vocab() == tokenizer.get_vocab()
        source = pretraining if kind == "pretraining" else head
        for name in compared:
            assert torch.equal(started.get_parameter(name), source.get_parameter(name)), (kind, name)
        # A transformers-layout config carries no dropout, so BLIP's 0.1 is trained with; a .pth's config is inferred
        # with BLIP's 0.1; our saved configs keep their own 0.
        expected_dropout = 0.1 if kind in ("transformers", "original") else 0.0
        assert started.config.text_config.hidden_dropout_prob == expected_dropout
        model = retrieval_training_model(started, steps_per_epoch=3)
        assert model.config.text_config.hidden_dropout_prob == expected_dropout

    with pytest.raises(ValueError, match="--tokenizer_name_or_path"):
        start_retrieval_head(32, model_name_or_path=pth["model_name_or_path"])
    with pytest.raises(ValueError, match="not both"):
        start_retrieval_head(32, "tiny", str(tmp_path / "ours"), str(tmp_path / "pretraining"))


def test_only_the_last_vit_blocks_are_checkpointed_and_the_gradients_do_not_change():
    torch.manual_seed(0)
    head = BlipForImageTextRetrieval(make_config(queue_size=0))
    plain = retrieval_training_model(head, steps_per_epoch=3)
    checkpointed = retrieval_training_model(head, steps_per_epoch=3, vision_gradient_checkpointing_layers=1)
    assert [layer.gradient_checkpointing for layer in checkpointed.vision_model.encoder.layers] == [False, True]
    assert not any(getattr(module, "gradient_checkpointing", False) for module in checkpointed.text_encoder.modules())
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        model(**make_batch()).loss.backward()
    for (name, param), checked in zip(plain.named_parameters(), checkpointed.parameters()):
        if param.grad is not None:
            torch.testing.assert_close(checked.grad, param.grad, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="vision_gradient_checkpointing_layers"):
        retrieval_training_model(head, steps_per_epoch=3, vision_gradient_checkpointing_layers=-1)


@pytest.mark.parametrize("recipe", ["coco_retrieval", "flickr_retrieval"])
def test_the_script_takes_every_value_of_the_retrieval_recipes(recipe):
    from transformers_blip.training import RECIPES, parse_with_recipe

    parsed = parse_with_recipe(load_script().build_parser(), ["--recipe", recipe, "--output_dir", "unused"])
    values = {name: value for arguments in parsed for name, value in vars(arguments).items()}
    assert {name: values[name] for name in RECIPES[recipe]} == RECIPES[recipe]
    overridden = parse_with_recipe(load_script().build_parser(), ["--recipe", recipe, "--k_test", "16"])
    assert overridden[2].k_test == 16  # the command line still wins


def test_the_script_names_missing_annotation_files_and_starts(tmp_path):
    script = load_script()
    with pytest.raises(SystemExit, match="needs --val_file, --test_file"):
        script.main(["--output_dir", str(tmp_path), "--source", "coco_karpathy", "--train_file", "train.json"])
    with pytest.raises(SystemExit, match="--tokenizer_name_or_path"):
        script.main(["--output_dir", str(tmp_path), *SCRIPT_ARGS, "--model_name_or_path", "model_base_retrieval.pth"])


def test_two_ranks_draw_negatives_from_both_batches_by_the_online_similarity(tmp_path, monkeypatch):
    from dist_retrieval_training import RANK_SIZES

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(DIST_SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    # One process on the whole batch draws from the same five candidates, with the same weights.
    drawn = []
    monkeypatch.setattr(modeling_pretraining, "sample_hard_negatives", recording_sampler(drawn))
    make_training_model(negative_all_rank=True)(**make_batch())
    same_id = torch.tensor(BATCH_IDS)[:, None] == torch.tensor(BATCH_IDS)[None, :]
    for rank, seen in enumerate(ranks):
        rows = slice(sum(RANK_SIZES[:rank]), sum(RANK_SIZES[: rank + 1]))
        for (logits, positives, floor), (whole_logits, whole_positives, _) in zip(seen["drawn"], drawn):
            assert logits.shape == (RANK_SIZES[rank], len(BATCH_IDS))  # both ranks' pairs are candidates
            torch.testing.assert_close(logits, whole_logits[rows], rtol=0, atol=1e-5)
            assert torch.equal(positives, whole_positives[rows]) and torch.equal(positives, same_id[rows])
            assert floor == 0.0
        for name in ("negative_image_indices", "negative_text_indices"):
            assert not same_id[rows][torch.arange(RANK_SIZES[rank]), seen[name]].any()


def test_the_script_trains_on_flickr30k_karpathy_files(tmp_path):
    from conftest import random_image

    from transformers_blip.data import stable_id

    # BLIP's Flickr30K layout: training records one caption each, with the image id as a string; evaluation
    # records each image once with its captions. One image is broken: training skips it and counts it.
    (tmp_path / "images").mkdir()
    for index in range(6):
        random_image(index, (40, 40)).save(tmp_path / "images" / f"{index}.jpg")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    train = [
        {"image": f"images/{index}.jpg", "caption": f"a red square number {index} {k}", "image_id": str(100 + index)}
        for index in range(4)
        for k in range(2)
    ] + [{"image": "images/broken.jpg", "caption": "a broken picture", "image_id": "999"}]
    captions = ["a blue circle", "a green triangle"]
    evaluation = [{"image": f"images/{index}.jpg", "caption": captions} for index in (4, 5)]
    for name, records in (("train", train), ("val", evaluation), ("test", evaluation)):
        (tmp_path / f"flickr30k_{name}.json").write_text(json.dumps(records))
    files = [f"--{name}_file={tmp_path / f'flickr30k_{name}.json'}" for name in ("train", "val", "test")]
    arguments = ["--source", "coco_karpathy", "--image_root", str(tmp_path), *files, "--k_test", "2"]
    options = ["--image_size", "32", "--num_train_epochs", "1", "--per_device_train_batch_size", "9"]
    options += ["--vocab_size", "150", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]
    summary = load_script().main(["--output_dir", str(tmp_path / "run"), *arguments, *options])
    assert set(summary["test"]) >= {"txt_r1", "img_r1", "r_mean"}
    rankings = json.loads((tmp_path / "run" / "retrieval_result.json").read_text())
    test_ids = [stable_id(f"images/{index}.jpg") for index in (4, 5)]  # no image_id in the file: the path's id
    assert [entry["image_id"] for entry in rankings["image_to_text"]] == test_ids
    assert [entry["caption"] for entry in rankings["texts"]] == captions * 2
    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [entry["source"].endswith("broken.jpg") for entry in skipped] == [True]
