"""A few steps of pretraining under Trainer, sharded with FSDP2 or replicated with DDP, on two CPU processes (gloo).
Launched by tests/test_fsdp.py:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/dist_fsdp.py OUTPUT_DIR {ddp,fsdp} MAX_STEPS \
        [--resume_at N]

With `--resume_at N` the run saves a checkpoint at step N and a second run, in the same processes, resumes from it to
MAX_STEPS. Rank 0 writes OUTPUT_DIR/results.pt: for each run, the losses of every step (those before the checkpoint
of a resumed run come from its state), the steps it took, which class wrapped the model, and the full state dict at
the end (weights, momentum copies, queues, pointer), gathered from the shards under FSDP.

accelerate 1.15 turns an FSDP plugin into FSDP only on accelerators (`AcceleratorState` sets
`DistributedType.FSDP` for MULTI_GPU, MULTI_XPU, ..., not MULTI_CPU) and otherwise wraps the model in DDP without a
word. `CpuFsdpTrainer` sets the state as accelerate sets it on GPUs, so that Trainer's and accelerate's own FSDP2
code (`fsdp2_prepare_model`, sharded optimizer, checkpoint save and load) runs here on CPUs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_config, make_tokenizer  # noqa: E402
from test_pretraining_trainer import make_pairs  # noqa: E402

from transformers_blip.data import BlipEvalTransform  # noqa: E402
from transformers_blip.modeling_pretraining import BlipForPreTraining  # noqa: E402
from transformers_blip.training import BlipPreTrainingTrainer, ImageTextCollator  # noqa: E402
from transformers_blip.training.callbacks import unwrap_model  # noqa: E402

# FSDP2 through Trainer's arguments, as a user passes them: each ViT block its own shard unit. Not the text layers:
# the encoder's and the decoder's share their cross-attention and feed-forward, and a tensor may belong to one FSDP
# group only, so the text side stays in the root group.
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["BlipVisionLayer"]}


class ShardablePreTraining(BlipForPreTraining):
    """`BlipForPreTraining` with the two changes that FSDP2 through accelerate needs (see docs/pretraining.md):

    - the ITC temperature as a (1,) tensor: `fully_shard` refuses 0-d parameters, and `temp` is one (the shape the
      original checkpoints give it);
    - no input embeddings named to accelerate, which would shard them as a group of their own (with the output
      embeddings when these share their weight); but the word embeddings are shared by the text encoder, the decoder
      and the decoder's LM head, three modules that must then sit in one group, and a tensor may belong to one
      group only. Unnamed, they stay in the root group with everything else of the text side.
    """

    def __init__(self, config):
        super().__init__(config)
        self.temp = torch.nn.Parameter(self.temp.detach().reshape(1))

    def get_input_embeddings(self) -> None:
        return None


class CpuFsdpTrainer(BlipPreTrainingTrainer):
    """`BlipPreTrainingTrainer` whose FSDP plugin is honoured on CPUs too (see the module docstring)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            state = self.accelerator.state
            state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does on GPUs
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The third change FSDP2 needs, in training/trainer.py: the temperature is logged as `temp.item()`, and the
        # rank whose shard of the one-element tensor is empty has no item. Here the whole tensor stands in for the
        # shard while the log is written (gathering it is a collective: `log` runs on every rank at once).
        model = unwrap_model(self.model)
        sharded = model.temp
        if not isinstance(sharded, DTensor):
            return super().log(logs, start_time)
        model._parameters["temp"] = torch.nn.Parameter(sharded.full_tensor().detach(), requires_grad=False)
        try:
            super().log(logs, start_time)
        finally:
            model._parameters["temp"] = sharded


class CountSteps(TrainerCallback):
    """Counts the optimizer steps this launch takes: a resumed run takes only those after its checkpoint."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model, whole: FSDP2's sharded parameters are gathered (a collective: all ranks call)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        state[name] = tensor.detach().clone()
    return state


def train(output_dir: str, mode: str, max_steps: int, save_steps: int = 0, resume: str | None = None) -> dict:
    """Trains the tiny model for `max_steps`; on rank 0, returns what the module docstring lists."""
    torch.manual_seed(0)
    model = ShardablePreTraining(make_config(queue_size=16, alpha_warmup_steps=4, momentum=0.9))
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        fsdp=mode == "fsdp",
        fsdp_config=FSDP_CONFIG if mode == "fsdp" else None,
    )
    steps_taken = CountSteps()
    collator = ImageTextCollator(make_tokenizer(), BlipEvalTransform(32), max_length=8)
    trainer = CpuFsdpTrainer(
        model=model, args=args, train_dataset=make_pairs(), data_collator=collator, callbacks=[steps_taken]
    )
    trainer.train(resume_from_checkpoint=resume)
    state = full_state_dict(trainer.model)
    losses = {
        entry["step"]: [entry[name] for name in ("loss", "loss_itc", "loss_itm", "loss_lm")]
        for entry in trainer.state.log_history
        if "loss_itc" in entry
    }
    wrapped = type(trainer.model_wrapped).__name__
    return {"losses": losses, "state": state, "wrapped": wrapped, "steps_taken": steps_taken.steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("mode", choices=("ddp", "fsdp"))
    parser.add_argument("max_steps", type=int)
    parser.add_argument(
        "--resume_at", type=int, default=0, help="Save a checkpoint at this step, then resume a second run from it."
    )
    options = parser.parse_args()
    results = {
        "run": train(os.path.join(options.output_dir, "run"), options.mode, options.max_steps, options.resume_at)
    }
    if options.resume_at:
        checkpoint = os.path.join(options.output_dir, "run", f"checkpoint-{options.resume_at}")
        resumed_dir = os.path.join(options.output_dir, "resumed")
        results["resumed"] = train(resumed_dir, options.mode, options.max_steps, resume=checkpoint)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, os.path.join(options.output_dir, "results.pt"))


if __name__ == "__main__":
    main()
