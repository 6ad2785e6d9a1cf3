"""One pretraining step (ITC + ITM + LM, forward and backward) of BLIP base: ours against a reference built from
transformers' own BLIP modules, same settings, same run.

BLIP base (ViT-B/16, BERT-base encoder and decoder sharing all but self-attention in ours), 224 px, fp32, random
weights, captions of 30 tokens, queue 57,600. Each configuration runs in a fresh process, so that its peak resident
memory is its own: ours with SDPA and with eager attention, and the reference (transformers' BLIP is eager only), each
with gradient checkpointing off and on. Printed: seconds per step, peak resident memory, the step's FLOP/s and that as
a share of this machine's fp32 matmul FLOP/s (measured first, in the same run), and ours against the reference.

The reference is what a user of transformers' BLIP writes for BLIP's pretraining step: `BlipVisionModel`,
`BlipTextModel` (the ITC text encoder and the ITM encoder) and `BlipTextLMHeadModel` (the decoder), a momentum copy
of the ViT and the text encoder, the projections, the queues, the same three losses and hard negatives. It does not
share the decoder's parameters with the encoder (transformers' BLIP cannot), so it holds 361M parameters to our
252M, as the paper's table 3 counts for "no sharing". The original code needs timm, which this project does not
install.

FLOPs are counted analytically, per matmul (2 * m * n * k), for the forward of every module the step runs (online
ViT, momentum ViT, text encoder, momentum text encoder, ITM encoder over 3B pairs, decoder and LM head, ITC
similarities against the queue); the backward of the online parts counts twice their forward. Recomputation under
gradient checkpointing is not counted: the FLOP/s are the model's useful work.

    python benchmarks/bench_pretraining.py [--steps 2] [--batch-size 8] [--image-size 224] [--threads N]
    # the shortest comparison: one timed step of each model at batch 2, 64 px
    python benchmarks/bench_pretraining.py --steps 1 --batch-size 2 --image-size 64 \\
        --configs ours:sdpa:off reference:eager:off
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from transformers_blip.modeling_pretraining import BlipForPreTraining
from transformers_blip.training import pretraining_config

TEXT_LENGTH = 30
VOCAB = {"vocab_size": 30524, "pad_token_id": 0, "sep_token_id": 102}
CONFIGS = [f"{impl}:{attn}:{ckpt}" for impl, attn in (("ours", "sdpa"), ("ours", "eager"), ("reference", "eager"))
           for ckpt in ("off", "on")]  # fmt: skip


def base_config(image_size: int):
    return pretraining_config("base", image_size, VOCAB)


class ReferencePretraining(nn.Module):
    """BLIP's pretraining step from transformers' BLIP modules (see the module docstring)."""

    def __init__(self, config):
        super().__init__()
        theirs = transformers.BlipConfig.from_dict(config.to_transformers_dict())
        text_config = theirs.text_config
        self.config = config
        self.vision_model = transformers.BlipVisionModel(theirs.vision_config)
        self.text_encoder = transformers.models.blip.modeling_blip_text.BlipTextModel(text_config, False)
        self.text_decoder = transformers.models.blip.modeling_blip_text.BlipTextLMHeadModel(text_config)
        width, embed_dim = config.vision_config.hidden_size, config.embed_dim
        self.vision_proj, self.text_proj = nn.Linear(width, embed_dim), nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(config.text_config.hidden_size, 2)
        self.vision_model_m, self.text_encoder_m = copy.deepcopy(self.vision_model), copy.deepcopy(self.text_encoder)
        self.vision_proj_m, self.text_proj_m = copy.deepcopy(self.vision_proj), copy.deepcopy(self.text_proj)
        for module in (self.vision_model_m, self.text_encoder_m, self.vision_proj_m, self.text_proj_m):
            module.requires_grad_(False)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, config.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, config.queue_size), dim=0))

    def forward(self, pixel_values, input_ids, attention_mask):
        alpha, batch = self.config.alpha, input_ids.shape[0]
        image_embeds = self.vision_model(pixel_values).last_hidden_state  # (B, 1+N, D)
        image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_embeds = self.text_encoder(input_ids, attention_mask=attention_mask).last_hidden_state
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)
        with torch.no_grad():
            image_feat_m = F.normalize(
                self.vision_proj_m(self.vision_model_m(pixel_values).last_hidden_state[:, 0]), dim=-1
            )
            text_out_m = self.text_encoder_m(input_ids, attention_mask=attention_mask).last_hidden_state
            text_feat_m = F.normalize(self.text_proj_m(text_out_m[:, 0]), dim=-1)
            image_keys = torch.cat([image_feat_m.t(), self.image_queue], dim=1)  # (E, B+K)
            text_keys = torch.cat([text_feat_m.t(), self.text_queue], dim=1)
            targets = torch.zeros(batch, image_keys.shape[1])
            targets[:, :batch] = torch.eye(batch)
            i2t_targets = alpha * F.softmax(image_feat_m @ text_keys / self.temp, dim=1) + (1 - alpha) * targets
            t2i_targets = alpha * F.softmax(text_feat_m @ image_keys / self.temp, dim=1) + (1 - alpha) * targets
        i2t = image_feat @ text_keys / self.temp
        t2i = text_feat @ image_keys / self.temp
        loss_itc = (
            -(F.log_softmax(i2t, 1) * i2t_targets).sum(1).mean() - (F.log_softmax(t2i, 1) * t2i_targets).sum(1).mean()
        )
        with torch.no_grad():  # hard negatives, one batched draw
            weights_i2t = F.softmax(image_feat @ text_feat.t() / self.temp, dim=1).fill_diagonal_(0) + 1e-6
            weights_t2i = F.softmax(text_feat @ image_feat.t() / self.temp, dim=1).fill_diagonal_(0) + 1e-6
            negative_texts = torch.multinomial(weights_i2t, 1).squeeze(1)
            negative_images = torch.multinomial(weights_t2i, 1).squeeze(1)
        itm_ids = torch.cat([input_ids, input_ids, input_ids[negative_texts]])
        itm_mask = torch.cat([attention_mask, attention_mask, attention_mask[negative_texts]])
        itm_images = torch.cat([image_embeds, image_embeds[negative_images], image_embeds])
        itm_out = self.text_encoder(
            itm_ids,
            attention_mask=itm_mask,
            encoder_hidden_states=itm_images,
            encoder_attention_mask=torch.ones(itm_images.shape[:2], dtype=torch.long),
        ).last_hidden_state
        itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long()
        loss_itm = F.cross_entropy(self.itm_head(itm_out[:, 0]), itm_labels)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        loss_lm = self.text_decoder(
            input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts, labels=labels, reduction="mean",
        ).loss  # fmt: skip
        return loss_itc + loss_itm + loss_lm


def step_flops(config, batch: int, image_size: int, text_length: int) -> float:
    """Matmul FLOPs of one training step (see the module docstring)."""
    vision, text = config.vision_config, config.text_config
    patches = 1 + (image_size // vision.patch_size) ** 2
    dv, dt = vision.hidden_size, text.hidden_size

    def self_layers(samples, length, width, mlp, layers):
        per_layer = 2 * length * (4 * width * width + 2 * width * mlp) + 2 * 2 * length * length * width
        return samples * layers * per_layer

    def cross_layers(samples):  # queries from the text, keys and values from the image
        per_layer = 2 * text_length * 2 * dt * dt + 2 * patches * 2 * dv * dt + 2 * 2 * text_length * patches * dt
        return samples * text.num_hidden_layers * per_layer

    vit = self_layers(batch, patches, dv, vision.intermediate_size, vision.num_hidden_layers)
    vit += batch * 2 * (patches - 1) * 3 * vision.patch_size**2 * dv  # patch embedding
    text_unimodal = self_layers(batch, text_length, dt, text.intermediate_size, text.num_hidden_layers)
    itm = 3 * text_unimodal + cross_layers(3 * batch)
    decoder = text_unimodal + cross_layers(batch) + batch * 2 * text_length * (dt * dt + dt * text.vocab_size)
    itc = 2 * 2 * batch * (batch + config.queue_size) * config.embed_dim
    online = vit + text_unimodal + itm + decoder + itc
    momentum = vit + text_unimodal
    return 3 * online + momentum


def matmul_flops_per_second(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def run_one(spec: str, steps: int, batch: int, image_size: int) -> dict:
    """One configuration, in this process: seconds per step (best of `steps`, after one warm-up step)."""
    impl, attention, checkpointing = spec.split(":")
    config = base_config(image_size)
    torch.manual_seed(0)
    if impl == "ours":
        config._attn_implementation = attention
        model = BlipForPreTraining(config).train()
        model.set_attn_implementation(attention)
    else:
        model = ReferencePretraining(config).train()
    if checkpointing == "on":
        if impl == "ours":
            model.activation_checkpointing_enable()
        else:
            for part in (model.vision_model, model.text_encoder, model.text_decoder):
                part.gradient_checkpointing_enable({"use_reentrant": False})
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(batch, 3, image_size, image_size, generator=generator)
    input_ids = torch.randint(1000, 30000, (batch, TEXT_LENGTH), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    attention_mask = torch.ones_like(input_ids)

    def step():
        output = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        loss = output if isinstance(output, torch.Tensor) else output.loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernel selection
    seconds = min(_timed(step) for _ in range(steps))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"config": spec, "seconds": seconds, "peak_mib": peak_mib}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="Timed steps per configuration (after one warm-up).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--configs", nargs="+", default=CONFIGS, help="impl:attention:checkpointing, e.g. ours:sdpa:on."
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one configuration
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.batch_size, args.image_size)))
        return 0

    peak_flops = matmul_flops_per_second()
    flops = step_flops(base_config(args.image_size), args.batch_size, args.image_size, TEXT_LENGTH)
    print(
        f"BLIP base pretraining step, batch {args.batch_size}, {args.image_size}px, fp32, {torch.get_num_threads()} "
        f"threads; {flops / 1e9:.0f} GFLOP per step; matmul {peak_flops / 1e9:.1f} GFLOP/s"
    )
    results = {}
    for spec in args.configs:
        command = [sys.executable, __file__, "--one", spec, "--steps", str(args.steps)]
        command += ["--batch-size", str(args.batch_size), "--image-size", str(args.image_size)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        result = json.loads(
            subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        )
        results[spec] = result
        achieved = flops / result["seconds"]
        print(
            f"{spec:<22} {result['seconds']:7.2f} s/step {result['peak_mib']:8.0f} MiB peak "
            f"{achieved / 1e9:7.1f} GFLOP/s ({achieved / peak_flops:5.1%} of matmul)",
            flush=True,
        )
    for checkpointing in ("off", "on"):
        reference = results.get(f"reference:eager:{checkpointing}")
        for attention in ("sdpa", "eager"):
            ours = results.get(f"ours:{attention}:{checkpointing}")
            if ours and reference:
                speedup = reference["seconds"] / ours["seconds"]
                memory = ours["peak_mib"] / reference["peak_mib"]
                print(
                    f"ours {attention} / reference, checkpointing {checkpointing}: throughput {speedup:.2f}x, "
                    f"peak memory {memory:.2f}x"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
