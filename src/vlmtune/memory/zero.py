"""Per-GPU model-state memory under data parallelism: plain DDP (stage 0) or DeepSpeed ZeRO 1-3, with offload.

Model states only (weights, gradients, optimizer states, communication buffers, the optimizer step's working
memory); activations are not partitioned by ZeRO and are added by the estimator. Modelled on what DeepSpeed 0.19
allocates (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py), sized by the rendered config
(vlmtune/train/deepspeed_config.py), and checked against 1-GPU H100 runs (benchmarks/RESULTS.md, estimator):

- Under bf16/fp16 the module (LoRA adapters included) is cast to 16-bit; the optimizer owns an fp32 master copy
  and the Adam moments of the *trainable* parameters, partitioned over the G GPUs (`single_partition_of_fp32_groups`).
- ZeRO-1/2 gradients: backward copies each 16-bit gradient into an ipg bucket of `reduce_bucket_size` elements,
  reduces it, and keeps this rank's share in one contiguous 16-bit buffer (`grads_in_partition`: ZeRO-2 holds only
  the 1/G partition, ZeRO-1 also keeps the other ranks' gradients until the step). The step flattens that partition
  (a second 16-bit copy), converts it to an fp32 gradient, and runs the optimizer, whose foreach AdamW allocates one
  more fp32 tensor per element (`torch._foreach_sqrt`); the 16-bit partition is still held while it runs.
- ZeRO-3 keeps a persistent 16-bit gradient partition (`grad_partitions_flat_buffer`) and a persistent ipg bucket;
  the step works one `sub_group_size` sub-group at a time (fp32 gradient + the optimizer's temporary); parameters
  are gathered per module (on one GPU the partition is the parameter, nothing is copied), with up to
  `stage3_prefetch_bucket_size` elements prefetched; parameters under `stage3_param_persistence_threshold` stay
  gathered.
- Offload moves the fp32 master, moments and fp32 gradients (`optimizer`) and, with ZeRO-3, the 16-bit parameters
  (`all`) to CPU RAM; DeepSpeed's CPU Adam then runs the step there. ZeRO-1/2 offload keeps no gradient partition on
  the GPU: each reduced gradient is cast to fp32 on the GPU and copied into the pinned fp32 gradient, then freed
  (`async_inplace_copy_grad_to_fp32_buffer_from_gpu`), and a persistent 16-bit GPU buffer of the largest trainable
  parameter (`temp_grad_buffer_for_gpu_offload`) is allocated at init.
- ZeRO-1/2 init (`DeepSpeedZeroOptimizer.__init__`, one parameter group: HF passes the trainable parameters only when
  the config names DeepSpeed's optimizer) flattens the 16-bit trainable parameters into one new buffer on the GPU
  while the model's own tensors are alive (allocated peak: the trainable 16-bit weights twice), points the model at
  views of it, and then clones this rank's partition on the GPU before moving it to fp32 (`.detach().clone().to(
  device, fp32)`). Neither the freed originals (parameter-sized blocks) nor the clone (a partition-sized segment) is
  given back: no empty_cache() follows, so 2 x the 16-bit partition stays reserved for the rest of the run
  (`init_cached`). Measured on one H100: Qwen2.5-VL-3B full fine-tuning with optimizer offload reserved 18.4 GiB
  before its first step (nvidia-smi trace; vision 1.2 + 3 x 5.8 GiB) and 19.0 GiB at the end.

Blocks freed inside the step (the flat 16-bit copy; ZeRO-3's init-time fp32 gradient buffer of its dummy step) are
smaller than the fp32 blocks allocated after them, so PyTorch's caching allocator keeps them reserved: `step_cached`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Offload = Literal["none", "optimizer", "all"]

CPU_BUFFER_FACTOR = 1.5
"""DeepSpeed's `additional_buffer_factor` for CPU RAM (pinned staging buffers), used for ZeRO-1/2 offload."""
NORM_PART = 250_000_000
"""Elements per fp64 part of DeepSpeed ZeRO-3's gradient-norm computation (`_constant_buffered_norm2`)."""
ZERO3_CPU_FACTOR = 1.3
"""ZeRO-3 offload's CPU RAM over the offloaded states plus the pinned 16-bit gradient partition (which stays in CPU
RAM whatever offload_ratio is). Fitted on one H100 machine (benchmarks/RESULTS.md, session 4): Qwen2.5-VL-3B full
offload 72.4 GiB measured (this factor + the process itself: 75.3), Qwen2-VL-2B full offload of everything 48.8
(46.9), and Qwen2.5-VL-7B with 65% of the optimizer offloaded killed by the OS at 126 GiB (126.5)."""


@dataclass(frozen=True)
class DeepSpeedBuffers:
    """The rendered DeepSpeed config values that size buffers (vlmtune/train/deepspeed_config.py)."""

    reduce_bucket_size: int
    allgather_bucket_size: int
    prefetch_bucket_size: int
    param_persistence_threshold: int
    max_live_parameters: int = 1_000_000_000
    sub_group_size: int = 1_000_000_000
    overlap_comm: bool = False

    @classmethod
    def auto(cls, hidden: int, max_live_parameters: int = 1_000_000_000) -> DeepSpeedBuffers:
        """What vlmtune renders for a language model of hidden size h (HF's "auto"): buckets h^2, prefetch
        0.9 h^2, persistence 10 h, sub-groups of 1e9 elements, overlap_comm off."""
        return cls(
            reduce_bucket_size=hidden * hidden,
            allgather_bucket_size=hidden * hidden,
            prefetch_bucket_size=int(0.9 * hidden * hidden),
            param_persistence_threshold=10 * hidden,
            max_live_parameters=max_live_parameters,
        )


@dataclass(frozen=True)
class StateSizes:
    """What the estimator knows about the model, in bytes and parameter counts, independent of parallelism."""

    frozen_weight_bytes: int
    """Weights that do not train, as stored on the GPU (16-bit, or 4-bit for QLoRA's quantized layers)."""
    trainable: int
    """Trainable parameters."""
    param_bytes: int
    """Bytes per trainable parameter as stored on the GPU without DeepSpeed (fp32 adapters: 4; pure bf16: 2)."""
    grad_bytes: int
    """Bytes per gradient element without DeepSpeed (same dtype as the parameter)."""
    optimizer_bytes: int
    """Optimizer-state bytes per trainable parameter without DeepSpeed (AdamW: 2 x param_bytes; 8-bit: 2)."""
    largest_unit: int
    """Parameters of the largest unit ZeRO-3 gathers at once (max of the largest module and one decoder layer)."""
    buffers: DeepSpeedBuffers
    """Bucket and ZeRO-3 sizes of the rendered DeepSpeed config."""
    ds_param_bytes: int = 2
    """Bytes per parameter element on the GPU under DeepSpeed (2 for bf16/fp16 training, 4 for fp32)."""
    ds_moment_bytes: int = 8
    """Optimizer-moment bytes per trainable parameter under DeepSpeed (fp32 Adam: 8; 8-bit Adam: 2)."""
    ds_step_temp_bytes: int = 4
    """Bytes per fp32 partition element the GPU optimizer allocates inside its step (torch's foreach AdamW: one
    fp32 temporary; fused or 8-bit: 0). Offloaded runs step on the CPU."""
    persistent_params: int = 0
    """ZeRO-3: parameters of modules under param_persistence_threshold (norms, biases), never partitioned."""
    largest_trainable: int = 0
    """Elements of the largest trainable parameter (full fine-tuning: the embedding table; LoRA: an adapter matrix)."""
    layers: int = 0
    """Decoder layers of the language model (ZeRO-3's prefetch run-ahead)."""
    layer_params: int = 0
    """Parameters of one decoder layer."""
    adapted_per_layer: int = 0
    """LoRA-adapted linear layers per decoder layer (0 for full fine-tuning)."""


@dataclass(frozen=True)
class ZeroPlan:
    """Per-GPU bytes of model states, and the CPU RAM of the whole node."""

    weights: int
    """Frozen and trainable 16-bit (or quantized) weights resident on this GPU."""
    gathered: int
    """ZeRO-3 working set: parameters gathered for the current and prefetched modules (none on one GPU)."""
    grads: int
    """Gradient bytes resident through the whole step (ZeRO-3's 16-bit partition; fp32/16-bit gradients held
    between micro-batches under stage 0 and ZeRO-1/2 only when accumulating, see `grads_backward`)."""
    grads_backward: int
    """Gradient bytes at the end of backward on top of `grads` (stage 0: the gradients; ZeRO-1: every 16-bit
    gradient; ZeRO-2: the 16-bit partition)."""
    optimizer: int
    """Optimizer states and fp32 master weights on this GPU."""
    buffers: int
    """Communication buckets (DDP gradient buckets, DeepSpeed reduce / all-gather buckets)."""
    step: int
    """DeepSpeed: bytes allocated inside the optimizer step on top of the resident states (16-bit gradient
    partition, its fp32 copy, the optimizer's temporary); 0 for stage 0 (the estimator models its own step)."""
    step_cached: int
    """DeepSpeed: blocks freed inside the step that the allocator keeps reserved (see the module docstring)."""
    offloaded: int
    """Bytes this GPU's process keeps in CPU RAM (before the staging-buffer factor)."""
    cpu_ram: int
    """CPU RAM the node needs for every process's offloaded states, with DeepSpeed's buffer factor."""
    deepspeed: bool
    init_transient: int = 0
    """DeepSpeed ZeRO-1/2: bytes allocated at init on top of `weights` (the flat 16-bit copy beside the originals)."""
    init_cached: int = 0
    """DeepSpeed ZeRO-1/2: bytes freed at init that the allocator keeps reserved (see the module docstring)."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def resident(self) -> int:
        return self.weights + self.gathered + self.grads + self.optimizer + self.buffers

    @property
    def peak(self) -> int:
        """Model states at their own peak: the end of backward or the optimizer step."""
        return self.resident + max(self.grads_backward, self.step)


def check_plan(stage: int, offload: str, num_gpus: int, offload_ratio: float = 1.0) -> list[str]:
    """Problems with a ZeRO stage / offload / GPU-count combination (empty when valid)."""
    problems = []
    if not 0 < offload_ratio <= 1:  # (it applies to ZeRO-3 with offload only; elsewhere it is ignored)
        problems.append(f"offload_ratio must be in (0, 1], got {offload_ratio}")
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_stage must be 0, 1, 2 or 3, got {stage}")
    if offload not in ("none", "optimizer", "all"):
        problems.append(f"offload must be none, optimizer or all, got {offload!r}")
    if num_gpus < 1:
        problems.append(f"num_gpus must be at least 1, got {num_gpus}")
    if offload != "none" and stage == 0:
        problems.append(
            "offload needs DeepSpeed: use zero_stage 1, 2 or 3 (offload=optimizer) or 3 (offload=all)"
        )
    if offload == "all" and stage in (1, 2):
        problems.append(
            "offload=all (parameters too) needs zero_stage 3; ZeRO-1/2 can offload only the optimizer"
        )
    return problems


def plan(sizes: StateSizes, stage: int, offload: Offload, num_gpus: int, offload_ratio: float = 1.0) -> ZeroPlan:
    """Model-state bytes per GPU. Stage 0 is vlmtune's own path: single GPU, or DDP on several. offload_ratio:
    ZeRO-3's share of optimizer sub-groups offloaded (1: all)."""
    g = num_gpus
    t = sizes.trainable
    if stage == 0:
        return ZeroPlan(
            weights=sizes.frozen_weight_bytes + t * sizes.param_bytes,
            gathered=0,
            grads=0,
            grads_backward=t * sizes.grad_bytes,
            optimizer=t * sizes.optimizer_bytes,
            buffers=t * sizes.grad_bytes if g > 1 else 0,  # DDP's gradient buckets: a second copy
            step=0,
            step_cached=0,
            offloaded=0,
            cpu_ram=0,
            deepspeed=False,
        )
    return _deepspeed(sizes, stage, offload, g, offload_ratio if stage == 3 else 1.0)


DECODER_LAYER_CALLS = 14
"""Module calls of one decoder layer (Qwen2 / Llama): the layer, two norms, the attention and its four projections,
the MLP, its three projections and the activation. LoRA adds four per adapted linear (base layer, dropout, A, B)."""


def _prefetched(sizes: StateSizes, model_elements: int) -> int:
    """Elements ZeRO-3 holds gathered while the model runs (its parameters partitioned over GPUs or in CPU RAM).

    At every module call DeepSpeed's prefetcher fetches up to `stage3_prefetch_bucket_size` more elements of the
    modules that come next in the recorded module order, and a parameter is released only after its own module ran
    (partitioned_param_coordinator.fetch_sub_module / release_sub_module). When a decoder layer's calls x the bucket
    exceed its parameters, the fetched set runs ahead by the difference at every layer, until
    `stage3_max_live_parameters` caps it; it stays until the backward releases the layers one by one. LoRA's
    adapters add four calls of far fewer elements than the bucket per adapted linear, so LoRA runs ahead and full
    fine-tuning does not. Measured on one H100 (allocated memory at every block's entry and exit, RESULTS.md
    session 5): Qwen2-VL-2B LoRA with its parameters offloaded held 1.9 GiB gathered (1e9 elements at 2 bytes, about
    20 decoder layers) from the vision tower to the backward, and `stage3_max_reuse_distance` did not change it;
    the full fine-tuning point of the same shapes fits the small working set (-2.1%). Where the growth starts (in
    the vision tower, before the decoder layers) is not derived. At least the unit in use and the next one are
    gathered (a layer, or the largest module such as the embedding), plus one bucket."""
    b = sizes.buffers
    floor = min(b.max_live_parameters, 2 * sizes.largest_unit + b.prefetch_bucket_size)
    calls = DECODER_LAYER_CALLS + 4 * sizes.adapted_per_layer
    ahead = max(0, calls * b.prefetch_bucket_size - sizes.layer_params) * sizes.layers
    return max(floor, min(b.max_live_parameters, model_elements, ahead))


def gpu_sub_group_elements(part: int, sub_group_size: int, offload_ratio: float) -> int:
    """Elements of a partition whose optimizer sub-groups stay on the GPU under partial offload: DeepSpeed keeps
    sub-group i there when i < int((1 - ratio) x number of sub-groups) (stage3._create_fp32_partitions). Sub-groups
    are taken as full sub_group_size blocks (DeepSpeed closes a group at the parameter that crosses the size)."""
    if offload_ratio >= 1 or part <= 0:
        return 0
    groups = -(-part // sub_group_size)
    return min(part, int((1 - offload_ratio) * groups) * sub_group_size)


def _deepspeed(sizes: StateSizes, stage: int, offload: Offload, g: int, offload_ratio: float = 1.0) -> ZeroPlan:
    t, b = sizes.trainable, sizes.buffers
    half = sizes.ds_param_bytes
    part = -(-t // g)  # this rank's partition of the trainable elements (DeepSpeed pads the last one)
    sub = min(b.sub_group_size, part)  # ZeRO-3's optimizer sub-group
    fp32_copy = 4 if half != 4 else 0  # master weights and fp32 gradients exist only beside 16-bit ones
    master = part * fp32_copy
    moments = part * sizes.ds_moment_bytes
    on_gpu_step = offload == "none"
    temp = sizes.ds_step_temp_bytes if on_gpu_step else 0
    weights = sizes.frozen_weight_bytes + t * half
    gathered = 0
    persistent = 0
    init_transient = init_cached = 0
    notes: list[str] = []
    if stage in (1, 2):
        grads = 0
        grads_backward = (t if stage == 1 else part) * half
        buffers = b.reduce_bucket_size * half * (2 if b.overlap_comm else 1)
        # stage_1_and_2.step: flat copy of the 16-bit partition -> fp32 gradient -> optimizer.step(), with the
        # 16-bit partition still referenced; offloaded, gradients stream to pinned CPU memory through a
        # largest-parameter-sized GPU buffer and CPU Adam steps there.
        step = part * (half + fp32_copy + temp) if on_gpu_step else 0
        step_cached = part * half if on_gpu_step else 0
        init_transient = t * half
        init_cached = t * half + part * half  # the model's original 16-bit tensors + the partition's clone
        if not on_gpu_step:
            # temp_grad_buffer_for_gpu_offload, allocated after the flattening: it takes the cached block of the
            # same parameter's original tensor, so it is neither an init transient nor more reserved memory
            offload_buffer = min(sizes.largest_trainable or t, t) * half
            buffers += offload_buffer
            init_transient -= offload_buffer
            init_cached -= offload_buffer
            grads_backward = offload_buffer * (half + 4) // half  # one gradient and its fp32 cast for the CPU copy
    else:
        model_elements = weights // half  # every parameter, before ZeRO-3 partitions them
        weights = -(-weights // g)
        persistent = sizes.persistent_params * half if g > 1 else 0
        grads = part * half  # grad_partitions_flat_buffer, allocated once at init
        grads_backward = 0
        buffers = b.reduce_bucket_size * half  # the persistent ipg bucket
        if g > 1 or offload == "all":  # gathered from the other GPUs, or fetched from CPU RAM
            gathered = _prefetched(sizes, model_elements) * half
        # one sub-group at a time: its fp32 gradient and the optimizer's temporary; the flat 16-bit copy made
        # before the fp32 cast and the fp32 gradient buffer of the dummy step at init stay cached.
        step = sub * (fp32_copy + temp) if on_gpu_step else 0
        step_cached = sub * (half + fp32_copy) if on_gpu_step else 0
        if offload == "all":
            notes.append("ZeRO-3 parameter offload: the 16-bit weights are fetched from CPU RAM module by module")
    offloaded = 0
    optimizer = master + moments
    if offload != "none":
        # Partial offload (ZeRO-3): the first sub-groups keep master, moments and an fp32 gradient on the GPU and
        # step there with torch's AdamW (foreach: one fp32 temporary of a sub-group); the fp32 copy made at init
        # (`.to(fp32)` then `.clone()`) leaves one sub-group-sized block cached.
        on_gpu = gpu_sub_group_elements(part, sub, offload_ratio) if stage == 3 else 0
        per_element = fp32_copy + sizes.ds_moment_bytes + fp32_copy
        offloaded += (part - on_gpu) * per_element  # master, moments and the fp32 gradient partition
        optimizer = on_gpu * per_element
        if on_gpu:
            step = step_cached = sub * 4
            notes.append(
                f"partial optimizer offload: {on_gpu / part:.0%} of the optimizer stays on the GPU, "
                f"{(part - on_gpu) / part:.0%} in CPU RAM"
            )
        if stage == 3:
            # The 16-bit gradient partition becomes pinned CPU memory too (2 bytes per element); left out of
            # `offloaded`, as DeepSpeed's own estimator does (18 bytes per parameter with everything offloaded).
            grads = 0
    if offload == "all":
        offloaded += weights
        weights = 0
    if stage == 3 and offload != "none":
        # At the gradient boundary DeepSpeed copies each parameter's CPU gradient partition back to the GPU and takes
        # its norm in fp64, in parts of up to 250 M elements (stage3 `_finalize_offload_gradient_accumulation`,
        # `_constant_buffered_norm2`). The largest trainable parameter's fp64 part is larger than any block backward
        # freed, so it takes a segment of its own that stays cached (allocator snapshots, RESULTS.md session 4 §6:
        # 1,782 MiB for Qwen2-VL-2B's embedding). With parameters offloaded too, the modules fetched from the CPU
        # later fill part of that segment: only what exceeds the gathered working set adds to the reserve.
        norm_block = min(sizes.largest_trainable or t, part, NORM_PART) * 8
        step_cached += norm_block if offload == "optimizer" else max(0, norm_block - gathered)
        cpu_ram = int((offloaded + part * half) * g * ZERO3_CPU_FACTOR)
    else:
        cpu_ram = int(offloaded * g * CPU_BUFFER_FACTOR)
    return ZeroPlan(
        weights=weights + persistent,
        gathered=gathered,
        grads=grads,
        grads_backward=grads_backward,
        optimizer=optimizer,
        buffers=buffers,
        step=step,
        step_cached=step_cached,
        init_transient=init_transient,
        init_cached=init_cached,
        offloaded=offloaded,
        cpu_ram=cpu_ram,
        deepspeed=True,
        notes=tuple(notes),
    )
