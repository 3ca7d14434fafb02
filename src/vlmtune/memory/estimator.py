"""The VRAM estimate: a pure function from typed inputs to a per-GPU breakdown in bytes.

Modelled on vlmtune's own training path (HF Trainer + PEFT): LoRA adapters fp32 on a 16-bit base; QLoRA keeps the
non-quantized parts in 16-bit (no fp32 upcast); full fine-tuning in bf16 is pure bf16 AdamW (16-bit states), in
fp16 it keeps fp32 weights with autocast; gradient checkpointing is HF's per decoder layer, which also hooks the
vision tower into autograd. Formulas and constants: /work/shared/reference/memory_anchors.md (§0, §6, §7), calibrated
on 26 measured H100 runs of the plain transformers + PEFT path (tests/memory/test_anchors.py), and on 34 runs of
`vlmtune train` itself, whose speed options change the picture: the chunked loss never holds full logits, a frozen
vision tower runs without grad, LoRA activations are smaller under autocast (benchmarks/RESULTS.md, calibration;
tests/memory/test_calibration_grid.py).

The peak is the largest of the phases of a step (forward with autocast caches, the cross-entropy backward, the
recomputed layer's backward, the end of backward, the optimizer step); what the allocator reserves on top and the
CUDA context make the nvidia-smi figure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vlmtune.memory.activations import activation_terms
from vlmtune.memory.allocator import Phase, allocator_overhead
from vlmtune.memory.breakdown import Breakdown, Verdict
from vlmtune.memory.catalogue import lookup_model
from vlmtune.memory.gpus import MIB, get_gpu
from vlmtune.memory.inputs import EstimateInputs
from vlmtune.memory.params import PARTS, ParamCounts, adapted_base_shapes, count_params, lora_params
from vlmtune.memory.zero import DeepSpeedBuffers, StateSizes, plan

NF4_BYTES = {True: 0.515869140625, False: 0.5625}
"""Bytes per 4-bit weight: 0.5 + absmax (fp32 per 64, or 8-bit per 64 + fp32 per 256 with double quantization)."""
CUDA_CONTEXT = 769 * MIB
"""nvidia-smi minus torch's reserved memory, constant over the 26 H100 runs (torch 2.11, CUDA 13)."""
NCCL_BUFFERS = 512 * MIB
"""Per-process NCCL / DeepSpeed communicator memory on multi-GPU runs (not measured; 0.3-1 GiB reported)."""
DEEPSPEED_CONTEXT = {1: 955 * MIB, 2: 955 * MIB, 3: 570 * MIB}
"""nvidia-smi minus max_memory_reserved minus CUDA_CONTEXT of a DeepSpeed process on one H100 (DeepSpeed 0.19.8:
its communicator and kernels live outside PyTorch's allocator): 952-956 MiB on three ZeRO-2 runs, 570-574 MiB on
two ZeRO-3 runs (benchmarks/results/2026-11-24-deepspeed*). ZeRO-1 is assumed to match ZeRO-2 (same optimizer)."""
RUNTIME_BASE = 96 * MIB
"""Allocated memory not explained by the terms: cuBLAS workspaces, rotary caches, masks (fitted on the anchors)."""
CHUNK_LOGITS = 8
"""Bytes per (token, vocabulary entry) of one chunk of the chunked loss at its peak: the fp32 logits and
torch.logsumexp's fp32 temporary `(logits - max).exp_()` (the 16-bit matmul output is freed by then; later the
softmax is made in place and its 16-bit gradient needs 6). Measured: the checkpointed LoRA runs were short by
2 bytes x chunk x vocabulary (140 MiB at a 484-token chunk, 300 MiB at 1,024, Qwen2-VL-2B)."""
TIGHT_MARGIN = 0.10
"""Below this fraction of the GPU's memory left free, the verdict is `tight` (estimate error + allocator noise)."""


@dataclass(frozen=True)
class _Precision:
    base: int  # bytes per non-quantized base weight
    trainable: int  # bytes per trainable parameter as stored
    state: int  # bytes per optimizer moment element
    autocast_cache: bool  # 16-bit copies of fp32 weights cached during forward
    act: int  # bytes per element of the residual stream


@dataclass(frozen=True)
class _Loss:
    forward: int
    """Logits and loss memory at the end of the forward pass."""
    backward: int
    """... at the start of backward (HF: the cross-entropy backward)."""
    fp32_block: int
    """The largest fp32 logits block: the allocator's fragmentation follows it."""


def loss_terms(inputs: EstimateInputs, b: int, s: int, v: int, h: int) -> _Loss:
    """HF ForCausalLMLoss keeps b·s·v logits (bf16 + fp32 upcast + log-softmax for backward): 10 bytes per
    element at the end of forward, 12 in its backward. vlmtune's chunked loss projects only labelled tokens, a
    chunk at a time, and computes the gradients in forward: about CHUNK_LOGITS bytes per chunk element, the
    labelled rows and their gradient (16-bit), and, when lm_head trains, its fp32 gradient and the per-chunk
    update (10 bytes per weight) in forward, two 16-bit copies in backward."""
    if not inputs.chunked_loss:
        return _Loss(10 * b * s * v, 12 * b * s * v, 4 * b * s * v)
    labelled = min(inputs.labelled_tokens or b * s, b * s)
    chunk = min(inputs.loss_chunk_tokens, labelled)
    head = v * h if inputs.method == "full" else 0
    rows = 2 * 2 * labelled * h
    return _Loss(CHUNK_LOGITS * chunk * v + rows + 10 * head, rows + 2 * b * s * h + 4 * head, 4 * chunk * v)


def _precision(inputs: EstimateInputs) -> _Precision:
    fp32 = inputs.precision == "fp32"
    if inputs.method == "full":
        if (
            fp32 or inputs.precision == "fp16"
        ):  # fp16 full fine-tuning keeps fp32 master weights (loss scaling)
            return _Precision(4, 4, 4, inputs.precision == "fp16", 4)
        return _Precision(2, 2, 2, False, 2)
    base = 4 if fp32 and inputs.method == "lora" else 2
    return _Precision(base, 4, 4, False, base)


def _trainable(inputs: EstimateInputs, counts: ParamCounts, targets: list[str]) -> tuple[int, dict[str, int]]:
    """(trainable parameters, trainable parameters of each part that is trained in place)."""
    if inputs.method == "full":
        parts = {p: n for p, n in counts.parts.items() if not (p == "vision" and inputs.freeze_vision_tower)}
        return sum(parts.values()), parts
    arch = lookup_model(inputs.model).arch
    vision = tuple(arch.vision_lora_targets) if inputs.adapt_vision_tower else ()
    projector_targets = arch.projector_lora_targets if inputs.adapt_projector else ()
    adapters = lora_params(counts, targets, inputs.lora_rank, vision, projector_targets)
    projector = counts.parts["projector"] if inputs.train_projector else 0
    return adapters + projector, {}


def _weights(
    inputs: EstimateInputs, counts: ParamCounts, prec: _Precision, in_place: dict[str, int]
) -> dict[str, int]:
    """Bytes of the frozen base weights on one GPU before ZeRO partitioning, by part."""
    out = {}
    quantized = {
        "language": True,
        "vision": inputs.quantize_vision_tower,
        "lm_head": inputs.quantize_lm_head and not counts.tied,
    }
    for part in PARTS:
        n = counts.parts[part] - in_place.get(part, 0)
        if inputs.method == "qlora" and quantized.get(part):
            q = counts.linear_weights[part]
            out[part] = int(q * NF4_BYTES[inputs.double_quant]) + (n - q) * prec.base
        else:
            out[part] = n * prec.base
    return out


def _fp8_copies(inputs: EstimateInputs, counts: ParamCounts, targets: list[str]) -> int:
    """Bytes of speed.fp8's e4m3 copies of the adapted base weights (both layouts and their row scales, the shapes
    cuBLAS takes), counted in the language weights' row: they live beside the bf16 weights for the whole run."""
    if not inputs.fp8_base or inputs.method != "lora":
        return 0
    from vlmtune.speed.fp8_linear import cuda_shape_ok, planned_bytes

    return sum(
        planned_bytes(out, inp, rowwise=True, keep_transposed=True) * n
        for out, inp, n in adapted_base_shapes(counts, targets)
        if cuda_shape_ok(out, inp)
    )


def _largest_adapter(inputs: EstimateInputs, dims) -> int:
    """Elements of the largest LoRA matrix: rank x the widest projection (the MLP's intermediate size)."""
    return inputs.lora_rank * max(dims.intermediate, dims.hidden)


def _cpu_embeddings(inputs: EstimateInputs, counts: ParamCounts, weights: dict[str, int]) -> int:
    """Bytes of the input-embedding table that speed.embeddings_on_cpu keeps in CPU memory (as the engine applies
    it: QLoRA, embeddings not tied to lm_head, no ZeRO-3 partitioning of them)."""
    applies = inputs.embeddings_on_cpu and inputs.method == "qlora" and not counts.tied and inputs.zero_stage < 3
    return weights["embeddings"] if applies else 0


def estimate(inputs: EstimateInputs) -> Breakdown:
    """Peak GPU memory of one training step on each GPU, term by term. Pure: reads only the built-in catalogues."""
    inputs.validate()
    spec = lookup_model(inputs.model)
    counts = count_params(spec)
    dims = counts.dims
    prec = _precision(inputs)
    targets = inputs.target_list(spec.arch.lora_targets)
    trainable, in_place = _trainable(inputs, counts, targets)
    weights = _weights(inputs, counts, prec, in_place)
    weights["language"] += _fp8_copies(inputs, counts, targets)
    cpu_embeddings = _cpu_embeddings(inputs, counts, weights)
    weights["embeddings"] -= cpu_embeddings
    deepspeed = inputs.zero_stage > 0
    moment = 1 if inputs.optimizer in ("adamw_8bit", "paged_adamw_8bit") else prec.state
    # ZeRO-3 never partitions modules under param_persistence_threshold (10 h): the norms and biases of a layer.
    persistent = dims.layers * (2 * dims.hidden + dims.q_width + 2 * dims.kv_width) + dims.hidden
    sizes = StateSizes(
        frozen_weight_bytes=sum(weights.values()),
        trainable=trainable,
        param_bytes=prec.trainable,
        grad_bytes=prec.trainable,
        optimizer_bytes=2 * moment,
        largest_unit=max(counts.largest_module, counts.layer_params),
        buffers=replace(
            DeepSpeedBuffers.auto(dims.hidden, inputs.max_live_parameters), sub_group_size=inputs.sub_group_size
        ),
        ds_param_bytes=4 if inputs.precision == "fp32" else 2,
        ds_moment_bytes=2 if moment == 1 else 8,
        ds_step_temp_bytes=4 if inputs.optimizer == "adamw_torch" else 0,  # foreach AdamW's fp32 temporary
        persistent_params=persistent,
        largest_trainable=counts.largest_module if inputs.method == "full" else _largest_adapter(inputs, dims),
        layers=dims.layers,
        layer_params=counts.layer_params,
        adapted_per_layer=0 if inputs.method == "full" else len(targets),
    )
    zp = plan(sizes, inputs.zero_stage, inputs.offload, inputs.num_gpus, inputs.offload_ratio)
    if inputs.zero_stage == 3:
        weights = {p: b // inputs.num_gpus for p, b in weights.items()}
    if inputs.offload == "all":
        weights = dict.fromkeys(weights, 0)
    adapters = zp.weights - sum(weights.values())

    acts = activation_terms(inputs, spec, counts, prec.act, targets, bf16_adapters=deepspeed)
    b, s, v = inputs.batch_size, acts.seq_len, dims.vocab
    runtime = RUNTIME_BASE + 6 * b * s * dims.hidden + acts.pixel_bytes
    comm = zp.buffers + (NCCL_BUFFERS if inputs.num_gpus > 1 else 0)
    static = sum(weights.values()) + adapters + zp.optimizer + zp.gathered + comm + runtime
    held = zp.grads + (zp.grads_backward if inputs.gradient_accumulation_steps > 1 else 0)
    grads_all = zp.grads + zp.grads_backward
    embed_grad = 4 * v * dims.hidden if inputs.method == "full" else 0
    loss = loss_terms(inputs, b, s, v, dims.hidden)
    step = trainable * prec.trainable if inputs.optimizer == "adamw_torch" and not deepspeed else 0
    autocast = (
        2 * counts.total // (inputs.num_gpus if inputs.zero_stage == 3 else 1) if prec.autocast_cache else 0
    )
    # (gradients, vision activations, language activations, logits and loss, transient) at each phase of a step
    phases = {
        "forward": Phase(held, acts.vision_saved, acts.language_saved, loss.forward, max(autocast, acts.head_dequant)),
        "loss backward": Phase(held, acts.vision_saved, acts.language_saved, loss.backward, acts.head_dequant),
        "layer backward": Phase(
            held, acts.vision_saved, acts.language_saved + acts.layer_working, 0, acts.dequant
        ),
        "end of backward": Phase(grads_all, acts.vision_saved, 0, 0, embed_grad),
        "optimizer step": Phase(zp.grads, 0, 0, 0, zp.step) if deepspeed else Phase(grads_all, 0, 0, 0, step),
    }
    if zp.init_transient:
        phases["DeepSpeed init"] = Phase(0, 0, 0, 0, zp.init_transient)
    phase = max(phases, key=lambda k: phases[k].total)
    at = phases[phase]
    allocated = static + at.total
    live_16bit_states = zp.optimizer + at.grads if inputs.method == "full" and prec.trainable == 2 else 0
    frag = allocator_overhead(
        inputs,
        phases,
        phase,
        allocated=allocated,
        loss_fp32_block=loss.fp32_block,
        vision_cache=acts.vit_patches * dims.vision_width,
        live_16bit_states=0 if deepspeed else live_16bit_states,
        step_temporaries=step,
        deepspeed_step_cached=zp.step_cached if deepspeed else None,
        deepspeed_init_cached=zp.init_cached,
    )
    reserved = allocated + frag
    context = CUDA_CONTEXT + DEEPSPEED_CONTEXT.get(inputs.zero_stage, 0)
    total = reserved + context
    verdict = None
    if inputs.gpu:
        gpu = get_gpu(inputs.gpu)
        headroom = gpu.usable_bytes - total
        status = (
            "does not fit"
            if headroom < 0
            else "tight"
            if headroom < TIGHT_MARGIN * gpu.usable_bytes
            else "fits"
        )
        verdict = Verdict(gpu=gpu.name, capacity=gpu.usable_bytes, headroom=headroom, status=status)
    return Breakdown(
        model=spec.name,
        params_source=counts.source,
        inputs=inputs,
        total_params=counts.total,
        trainable_params=trainable,
        weights=weights,
        weights_quantized=inputs.method == "qlora",
        adapters=adapters,
        gradients=at.grads,
        optimizer_states=zp.optimizer,
        zero_gathered=zp.gathered,
        comm_buffers=comm,
        activations_vision=at.vision,
        activations_language=at.language,
        logits_loss=at.logits,
        transient=at.transient,
        runtime=runtime,
        seq_len=s,
        image_tokens=acts.image_tokens,
        vit_patches=acts.vit_patches,
        offloaded=zp.offloaded,
        cpu_ram=zp.cpu_ram + cpu_embeddings,
        peak_phase=phase,
        phases={k: static + p.total for k, p in phases.items()},
        peak_allocated=allocated,
        allocator_overhead=frag,
        peak_reserved=reserved,
        cuda_context=context,
        peak_total=total,
        verdict=verdict,
        notes=tuple(acts.notes + _caveats(inputs)),
    )


def _caveats(inputs: EstimateInputs) -> list[str]:
    """What the measured runs did not cover, said where it matters."""
    out = []
    if inputs.num_gpus > 2:
        out.append("DeepSpeed/DDP terms are measured on one H100 and two H200s (within 5% there); NCCL buffers and "
                   "ZeRO-3 gathers on more GPUs are modelled, not measured (benchmarks/RESULTS.md)")
    if inputs.expandable and inputs.zero_stage == 0 and inputs.method == "full":
        out.append("the allocator's overhead with expandable segments (hardware.expandable_segments, on by default) "
                   "is fitted on vlmtune's LoRA and QLoRA runs; with full fine-tuning it is not yet measured")
    if inputs.fp8_base:
        out.append("speed.fp8's weight copies are counted from their shapes; FP8 runs are measured only on a 2B model")
    return out
