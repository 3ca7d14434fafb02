"""The reference: the plain path a user writes with transformers + PEFT + torch, on the same encoded batches.

    model = AutoModelForImageTextToText.from_config(config, dtype=bf16, attn_implementation="sdpa")  # random weights
    QLoRA: the same weights loaded 4-bit through BitsAndBytesConfig, then prepare_model_for_kbit_training
    LoRA:  gradient_checkpointing_enable(use_reentrant=False) + enable_input_require_grads, get_peft_model
    full:  every weight but the vision tower's trains (the projector trains), bf16 weights
    AdamW(fused=True), bf16 autocast, clip_grad_norm_(1.0), zero_grad(set_to_none=True)
    samples in EpochOrder(seed 0): the order vlmtune's engine (HF Trainer + accelerate) draws with training.seed=0
With `liger`, LLaMA-Factory's `enable_liger_kernel` is applied first: the family's apply_liger_kernel_to_* with RoPE,
RMSNorm, SwiGLU and fused linear cross-entropy, patched into the classes before the model is built.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from benchmarks.speed.measure import DEVICE, StepMeter, init_fingerprint, reset_peaks
from benchmarks.speed.workloads import Variant, Workload
from vlmtune.families import get_family


class EpochOrder(Sampler[int]):
    """A new permutation per pass: torch.randperm(n) from a generator seeded with seed + pass, as accelerate's
    SeedableRandomSampler (the HF Trainer's, used by vlmtune's engine) draws it when the run's seed is `seed`.
    The plain loop's DataLoader(shuffle=True, generator=seed 0) gave another order: it draws the workers' base
    seed from that generator before the permutation (tests/benchmarks/test_loss_parity.py)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        yield from torch.randperm(self.n, generator=generator).tolist()


def apply_liger(family: str) -> str:
    from liger_kernel.transformers import monkey_patch

    name = {
        "qwen2_vl": "apply_liger_kernel_to_qwen2_vl",
        "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl",
        "llava": "apply_liger_kernel_to_llava",
    }[family]
    getattr(monkey_patch, name)(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    return name


def _bf16_model(model_dir: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(DEVICE):
        return AutoModelForImageTextToText.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )


INDEX_PUT_MERGER = "inputs_merger"
"""The plain QLoRA path puts its input embeddings back in bf16 after prepare_model_for_kbit_training (which upcasts
every 16-bit parameter to fp32) where the model has an `inputs_merger`: transformers 5.17's SmolVLM / Idefics3 merger
index-puts the bf16 image features into the fp32 text embeddings and stops with "Index put requires the source and
destination dtypes match" (H100, session 14, F4), so a user of the plain path has to do the same to train. 5.23 has
no inputs_merger (it casts the features to the model's dtype and masked_scatters them), and needs the fp32 table."""


def _qlora_model(model_dir: str, family_name: str) -> torch.nn.Module:
    """Random weights loaded in 4-bit as from a checkpoint (what from_pretrained(path, quantization_config) does);
    the vision tower, the projector and lm_head stay 16-bit (as the peers' QLoRA recipes and vlmtune's default)."""
    from transformers import BitsAndBytesConfig

    family = get_family(family_name)
    model = _bf16_model(model_dir)
    state = {k: v.to("cpu") for k, v in model.state_dict().items()}
    cls, config = type(model), model.config
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=[*family.vision_prefixes, *family.projector_prefixes, *family.lm_head_names],
    )
    return cls.from_pretrained(
        None,
        config=config,
        state_dict=state,
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        quantization_config=bnb,
        device_map={"": 0 if DEVICE == "cuda" else "cpu"},
    )


def build(work: Workload, variant: Variant, model_dir: str, lora_targets: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if variant.path == "liger":
        apply_liger(work.family)
    torch.manual_seed(0)
    gc_kwargs = {"use_reentrant": False}
    if work.method == "qlora":
        model = prepare_model_for_kbit_training(
            _qlora_model(model_dir, work.family),
            use_gradient_checkpointing=variant.gc,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
        if any(hasattr(m, INDEX_PUT_MERGER) for m in model.modules()):
            model.get_input_embeddings().to(torch.bfloat16)
    else:
        model = _bf16_model(model_dir)
        if variant.gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
    if work.method == "full":  # the vision tower stays frozen, its projector trains (vlmtune's default too)
        family = get_family(work.family)
        model.requires_grad_(True)
        for name, param in model.named_parameters():
            if family.component_of(name) == "vision":
                param.requires_grad_(False)
        return model.train()
    config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=lora_targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config).train()


def train(
    work: Workload,
    variant: Variant,
    model_dir: str,
    lora_targets: str,
    samples: list[Any],
    collate: Any,
    steps: int,
    tracer: Any = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """tracer: the profiler's phase marker (`phase(name)` at each boundary, `step()` after each step), or None;
    model: one built elsewhere (Unsloth's, unsloth_run.build) instead of `build`'s, trained by this same loop."""
    phase = tracer.phase if tracer is not None else (lambda name: None)
    if model is None:
        model = build(work, variant, model_dir, lora_targets)
    if tracer is not None:
        tracer.watch(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    loader = DataLoader(
        samples,
        batch_size=variant.batch or work.batch,
        sampler=EpochOrder(len(samples), seed=0),
        collate_fn=collate,
        num_workers=min(4, os.cpu_count() or 1),
        pin_memory=True,
        drop_last=True,
        persistent_workers=True,
    )
    meter, done, losses = StepMeter(work.warmup), 0, []
    fingerprint = init_fingerprint(model)
    reset_peaks()
    meter.start()
    phase("next batch")
    while done < steps:
        for batch in loader:
            phase("to device")
            tokens = int(batch["attention_mask"].sum())
            batch = {
                k: v.to(DEVICE, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
            }
            phase("forward")
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = model(**batch).loss
            phase("backward")
            loss.backward()
            phase("clip")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            phase("optimizer")
            optimizer.step()
            phase("zero_grad + loss.item (sync)")
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            phase("step meter (sync)")
            meter.step(tokens)
            done += 1
            if tracer is not None:
                tracer.step()
            phase("next batch")
            if done == steps:
                break
    phase(None)
    return {
        **meter.summary(),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": [round(x, 5) for x in losses],
        "init_fingerprint": fingerprint,
        "trainable_params": sum(p.numel() for p in params),
    }
