"""The one configuration tree. Help text lives in the field docstrings; the CLI and `presets show` read it.

Every model forbids unknown keys, so a typo is an error that names the field instead of a silent default.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlmtune.config.method_defaults import apply_method_defaults, derived_fields

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    # allow_inf_nan=False: no float field anywhere takes nan or inf (YAML .inf/.nan, JSON NaN/Infinity, `--lr inf`).
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False
    )


class TrainingMethod(str, Enum):
    LORA = "lora"
    QLORA = "qlora"
    FULL = "full"


class ModelConfig(_Strict):
    name_or_path: str = Field("Qwen/Qwen2-VL-2B-Instruct", min_length=1)
    """Hub id or local folder of the base model, loaded through `from_pretrained`."""
    family: str | None = None
    """Model family descriptor (qwen2_vl, qwen2_5_vl, llava). Detected from the model's config when unset."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    random_init: bool = False
    """Build the architecture from its config with random weights (benchmarks; no weights are read)."""


RECORD_COLUMNS = ("messages", "conversations", "image", "images", "system", "prompt", "completion", "query",
                  "response", "history", "instruction", "input", "output")
TURN_COLUMNS = ("role", "content", "from", "value")
"""data.columns keys: record keys vlmtune reads (docs/DATA.md), and keys inside each turn."""


class DataConfig(_Strict):
    train_path: Path | None = None
    """Training data: JSONL, a JSON array, parquet / arrow files, or `dataset_info.json#NAME` (docs/DATA.md)."""
    val_path: Path | None = None
    """Validation JSONL file; evaluation is skipped without it."""
    image_root: Path | None = None
    """Folder that relative image paths in the data resolve against (LLaVA's --image_folder, Qwen's data_path);
    a path not found there is looked for beside the data file. None: beside the data file only (docs/DATA.md)."""
    columns: dict[str, str] | None = None
    """Which key of your records holds what vlmtune reads, for data in no format it knows: e.g.
    {instruction: question, output: answer, images: img}, or {messages: dialog, role: speaker, content: text} (role /
    content, from / value rename the keys inside each turn). Keys: see docs/DATA.md, "Your own column names"."""
    max_length: int = Field(2048, gt=0)
    """Maximum tokens per sample, image tokens included."""
    image_size: int | None = Field(None, gt=0)
    """Resize images so they fit in image_size x image_size (dynamic-resolution families: max pixels)."""
    min_pixels: int | None = Field(None, gt=0)
    """Lower bound on pixels per image for dynamic-resolution families (overrides the processor's)."""
    max_pixels: int | None = Field(None, gt=0)
    """Upper bound on pixels per image for dynamic-resolution families (overrides image_size)."""
    on_overflow: Literal["drop", "error"] = "drop"
    """What to do with a sample whose max_length cut would fall inside or before an image span:
    drop it (counted and reported) or stop with an error. Text after the last image is truncated either way."""
    max_image_megapixels: float = Field(100.0, gt=0)
    """Images larger than this are rejected before decoding (decompression-bomb guard)."""
    check_before_training: bool = True
    """Validate every record (`vlmtune data check`) before loading the model."""
    max_record_bytes: int = Field(4 * 1024 * 1024, gt=0)
    """Longest JSONL line (one record) in bytes, 4 MiB by default; a 100-turn record of long text is ~100 KB. A
    longer line is refused without being read whole, so reading stays bounded in memory whatever the file holds."""
    max_text_chars: int | None = Field(None, gt=0)
    """Most characters of text in one record, checked before tokenizing. None: 64 x max_length, which no tokenizer
    fits into max_length tokens (real text averages under 8 characters per token, CJK about 1)."""
    max_json_depth: int = Field(32, gt=0)
    """Deepest nesting of JSON arrays and objects in a record (a chat record needs 5), checked before parsing."""
    on_ignored_field: Literal["error", "warn"] = "error"
    """A record field vlmtune does not read (per-image sizes, `tools`, a per-message `weight`, an unknown key):
    `error` names it; `warn` trains without it and warns once per field with the number of records that
    have it. The metadata keys id, source, dataset and metadata are always accepted (docs/DATA.md)."""

    @model_validator(mode="after")
    def _pixels_order(self) -> DataConfig:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        unknown = [k for k in self.columns or {} if k not in RECORD_COLUMNS + TURN_COLUMNS]
        if unknown:
            raise ValueError(f"columns: {', '.join(unknown)} not a key vlmtune reads; use {', '.join(RECORD_COLUMNS)} "
                             f"(record keys) or {', '.join(TURN_COLUMNS)} (keys inside each turn)")
        return self


class LoraConfig(_Strict):
    rank: int = Field(16, gt=0)
    """LoRA rank r."""
    alpha: float = Field(32, gt=0)
    """LoRA scaling alpha (scale = alpha / rank)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: Literal["minimal", "attention", "all"] | list[str] = "all"
    """minimal = q,v,o; attention = q,k,v,o; all = q,k,v,o,gate,up,down; or an explicit list of module names."""
    adapt_vision_tower: bool = False
    """Also put adapters on the vision tower's linear layers."""
    train_projector: bool = False
    """Train the vision-language projector fully (saved with the adapter)."""
    adapt_projector: bool = False
    """Also put adapters on the projector's linear layers, for families whose projector is a deep network with
    named layers (InstructBLIP's Q-Former: query/key/value/dense of its 12 layers). Not with train_projector."""

    @model_validator(mode="after")
    def _non_empty_targets(self) -> LoraConfig:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is an empty list; name at least one module or use minimal/attention/all")
        if self.adapt_projector and self.train_projector:
            raise ValueError("adapt_projector and train_projector both set: the projector either gets adapters or "
                             "trains fully; choose one")
        return self


class QuantizationConfig(_Strict):
    bits: Literal[4] = 4
    """Weight bits of the quantized layers (bitsandbytes)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per weight)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype the 4-bit weights are dequantized to for matmuls."""
    quantize_vision_tower: bool = False
    """Also quantize the vision tower's linear layers (off: they stay 16-bit)."""
    quantize_lm_head: bool = False
    """Also quantize lm_head (off: it stays 16-bit)."""
    lean: bool = False
    """Lean QLoRA, the 8 GB setting: where not set otherwise, also quantize the vision tower and lm_head, keep the
    input embeddings in CPU memory (speed.embeddings_on_cpu), step with paged 8-bit AdamW and compute the loss in
    256-token chunks (config/method_defaults.py; measured: Qwen2.5-VL-7B at 7.47 GiB, benchmarks/RESULTS.md W2).
    Like the rest of this section, lora and full ignore it (`--use-lora` over the ultra_low_memory preset is LoRA)."""


class MethodConfig(_Strict):
    name: TrainingMethod = TrainingMethod.LORA
    """lora, qlora or full."""
    lora: LoraConfig = LoraConfig()
    """Adapter settings (lora and qlora)."""
    quantization: QuantizationConfig = QuantizationConfig()
    """4-bit settings (qlora only)."""
    freeze_vision_tower: bool = True
    """Full fine-tuning: keep the vision tower frozen."""


class TrainingConfig(_Strict):
    epochs: float = Field(1.0, gt=0)
    """Passes over the training set (ignored when max_steps is set)."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps."""
    batch_size: PositiveInt | Literal["auto"] = 1
    """Micro-batch per device; `auto` picks the largest that the memory estimate fits on the visible GPU."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate. Default per method when not set: 2e-4 for lora and qlora, 1e-5 for full
    (config/method_defaults.py; `vlmtune train --print-config` marks such values)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Fraction of the steps spent warming up (ignored when warmup_steps > 0)."""
    warmup_steps: int = Field(0, ge=0)
    """Warmup steps."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping norm (0 disables)."""
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"] = "adamw_torch"
    """Optimizer; the 8-bit ones need the qlora extra (bitsandbytes)."""
    seed: int = Field(42, ge=0, lt=2**32)
    """Seed for initialisation and data order."""
    logging_steps: int = Field(10, gt=0)
    """Log loss, learning rate, grad norm, tokens/s and memory every N steps."""
    eval_steps: int | None = Field(100, gt=0)
    """Evaluate on the validation set every N steps (needs data.val_path; None disables)."""
    save_steps: int = Field(100, gt=0)
    """Write a checkpoint every N steps."""
    save_total_limit: int | None = Field(3, gt=0)
    """Keep only the last K checkpoints (None keeps all)."""
    save_checkpoints: bool = True
    """Write resumable checkpoint-N folders (every save_steps and at the end); false writes only the final result
    (benchmarks of large full fine-tunes, whose optimizer states would not fit the disk)."""
    report_to: list[Literal["tensorboard", "none"]] = ["tensorboard"]
    """Where to send logs besides the console and the run folder's log file."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """What a step whose loss or gradients are nan/inf does (checked every optimizer step; trainable weights are
    checked too before every checkpoint and the final save). stop: end the run with an error naming the step and
    the value; nothing of that step is applied or saved, the last checkpoint stays the last good one. skip: drop
    the step's gradients (the optimizer does not step), count it in train_log.jsonl and go on; 10 bad steps in a
    row stop the run anyway. Under DeepSpeed the optimizer has stepped before the check: skip acts as stop."""


class HardwareConfig(_Strict):
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision (weights and autocast)."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward to save memory."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel; flash_attention_2 needs the flash-attn package."""
    dataloader_workers: int = Field(0, ge=0)
    """Background processes that prepare batches."""
    use_cpu: bool = False
    """Train on the CPU even when a GPU is visible."""
    memory_fraction: float | None = Field(None, gt=0, le=1)
    """Cap this process's GPU memory at this fraction of the card (torch.cuda.set_per_process_memory_fraction):
    trains as if on a smaller GPU; the memory preflight checks the estimate against the cap."""
    force_fit: bool = False
    """Start training even when the memory estimate says it does not fit the visible GPU (`vlmtune train --force`)."""
    expandable_segments: bool | Literal["auto"] = "auto"
    """PyTorch's caching allocator with expandable segments (PYTORCH_ALLOC_CONF=expandable_segments:True), set in the
    training process before the model loads: segments grow in place instead of being allocated per size, so memory
    reserved but not allocated stays small (0.11-0.19 GiB in Unsloth's runs, which set it, against 0.6-3.1 GiB in
    vlmtune's without it; benchmarks/RESULTS.md, 2026-12-07). auto (the default): on for CUDA training, unless
    PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF is set, which is then left as it is; true / false: on / off
    whatever the environment says. The memory estimate follows the same setting; the log and train_log.jsonl's
    start event say which applied and why."""


class DistributedConfig(_Strict):
    engine: Literal["auto", "none", "deepspeed"] = "auto"
    """auto: DeepSpeed when more than one process runs (or deepspeed_config / offload is set), none otherwise.
    none: one process, or plain DDP over several."""
    num_gpus: int = Field(1, gt=0)
    """Processes (GPUs) per node that `vlmtune train` starts itself."""
    num_nodes: int = Field(1, gt=0)
    """Nodes (multi-node needs a hostfile)."""
    hostfile: Path | None = None
    """DeepSpeed/MPI-style hostfile for multi-node runs (`host slots=N` per line)."""
    master_addr: str | None = None
    """Address of the rank-0 node (multi-node)."""
    master_port: int | None = Field(None, gt=0, lt=65536)
    """Port of the rank-0 node."""
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    """Which launcher `vlmtune train --num-gpus N` uses to start the processes (multi-node: deepspeed, which
    reaches the other nodes through the hostfile; torchrun is started on every node by hand, see docs)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    offload: Literal["none", "optimizer", "optimizer_and_params"] = "none"
    """What DeepSpeed offloads to CPU RAM (params offload needs stage 3). `all` is read as optimizer_and_params (the
    name `vlmtune estimate --offload` used)."""

    @field_validator("offload", mode="before")
    @classmethod
    def _offload_alias(cls, value: object) -> object:
        return "optimizer_and_params" if value == "all" else value
    offload_ratio: float = Field(1.0, gt=0, le=1)
    """ZeRO-3 with offload: the share of the optimizer's sub-groups (fp32 master weights, Adam moments, fp32
    gradients) kept in CPU RAM and stepped there by CPU Adam; the rest stays on the GPU and steps there (DeepSpeed's
    ZeRO-Offload++ `offload_optimizer.ratio`). Below 1 it trades GPU memory for CPU RAM and speed: for a model whose
    optimizer does not fit the machine's RAM, or to step part of it on the GPU."""
    sub_group_size: int = Field(1_000_000_000, gt=0)
    """ZeRO-3 sub_group_size: elements of the optimizer's sub-groups, stepped one at a time (the GPU step's fp32
    temporaries are this large; offload_ratio moves whole sub-groups)."""
    prefetch_bucket_size: NonNegativeInt | Literal["auto"] = "auto"
    """ZeRO-3 stage3_prefetch_bucket_size."""
    param_persistence_threshold: NonNegativeInt | Literal["auto"] = "auto"
    """ZeRO-3 stage3_param_persistence_threshold."""
    max_live_parameters: int = Field(1_000_000_000, gt=0)
    """ZeRO-3 stage3_max_live_parameters."""
    max_reuse_distance: int = Field(1_000_000_000, gt=0)
    """ZeRO-3 stage3_max_reuse_distance."""
    deepspeed_config: Path | None = None
    """Use this DeepSpeed JSON instead of rendering one (validated; "auto" values are filled from the config)."""

    @model_validator(mode="after")
    def _offload_stage(self) -> DistributedConfig:
        if self.offload == "optimizer_and_params" and self.zero_stage != 3:
            raise ValueError(f"offload=optimizer_and_params needs zero_stage 3 (got {self.zero_stage}); "
                             "use offload=optimizer with stages 1-2")
        if self.offload != "none" and self.zero_stage == 0:
            raise ValueError("offload needs a ZeRO stage of 1 or more")
        if self.offload_ratio < 1 and (self.offload == "none" or self.zero_stage != 3):
            raise ValueError(f"offload_ratio={self.offload_ratio} (partial optimizer offload) needs zero_stage 3 and "
                             f"offload=optimizer or optimizer_and_params (got zero_stage {self.zero_stage}, "
                             f"offload {self.offload}); DeepSpeed splits the optimizer only under ZeRO-3")
        return self


class SpeedConfig(_Strict):
    chunked_loss: bool = True
    """Compute the loss from the last hidden states and lm_head's weight, a chunk of labelled tokens at a time:
    full-vocabulary logits (about 12 bytes x tokens x vocab at the loss) are never materialised."""
    loss_chunk_tokens: int = Field(1024, gt=0)
    """Tokens per chunk of the chunked loss (its working memory is about 8 bytes x chunk x vocab)."""
    frozen_vision_no_grad: bool = True
    """Run the frozen part of the vision tower under no_grad and without checkpointing: nothing of it is saved
    for backward nor recomputed (the projector still trains when it is trained)."""
    packing: bool = False
    """Padding-free packing: several samples per row up to packing_max_tokens, each attending only to itself,
    with positions (M-RoPE for Qwen) restarting per sample. training.batch_size then counts packed rows."""
    packing_max_tokens: int | None = Field(None, gt=0)
    """Token budget of one packed row (image tokens included); default data.max_length."""
    packed_attention: Literal["spans", "mask"] = "spans"
    """How packed samples are kept apart with sdpa attention: spans = causal SDPA over each sample's own tokens
    (flash kernels, work ~ sum of squared sample lengths); mask = transformers' block-diagonal mask (rows x
    length^2 booleans, every block computed)."""
    positions_in_collator: bool = True
    """M-RoPE families (Qwen): the data loader's workers compute each padded batch's 3-D position ids with the model's
    own get_rope_index, instead of the forward on the GPU's timeline (about 80 host-device syncs per step there)."""
    vision_positions_on_cpu: bool = False
    """Qwen vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): their rotary position ids, attention boundaries
    and (Qwen2.5-VL) window order are computed on the CPU from the image grid, once per distinct grid (cached), and
    handed to the tower through the arguments transformers takes precomputed values from, instead of in Python loops on
    the GPU's timeline at every step (W3's eager tower: 97 ms of host time and 27 host-device syncs per step, session
    19). The same integers, so the same numbers. Off until measured on a GPU."""
    varlen_attention: bool = True
    """Where several independent sequences share one attention call (the Qwen vision towers' images, packed rows
    with packed_attention=spans), attend with PyTorch's variable-length flash kernel (torch.nn.attention.varlen,
    CUDA, 16-bit): one kernel per block or layer instead of one SDPA call per image or sample, and no host sync per
    block. Falls back to SDPA per sequence where the kernel cannot run (CPU, fp32, older PyTorch)."""
    sdpa_cudnn: bool | Literal["auto"] = "auto"
    """Let SDPA attention use cuDNN's kernels. auto: off, except for a family whose language model attends with a
    mask on every batch and whose vision tower has one fixed resolution (Gemma 3): there SDPA cannot run flash, the
    memory-efficient kernel left without cuDNN is the slow one (about 2x cuDNN's backward on an H100 at head_dim 128,
    worse at Gemma's 256), and the few shapes per step stay in cuDNN's plan cache. Off elsewhere because cuDNN plans
    each new sequence length anew (about 2 ms of CPU per call on an H100), which made steps with varying image sizes
    or packed rows CPU-bound; the flash and memory-efficient kernels do not plan (benchmarks/RESULTS.md, W5 profile;
    benchmarks/results/2026-12-07-gemma3-step/)."""
    lora_bf16_compute: bool = True
    """Under 16-bit autocast, LoRA adapters take the layer's 16-bit input as it is instead of an fp32 copy (the
    adapters stay fp32 for the optimizer; autocast runs their matmuls in 16-bit either way)."""
    fused_lora: bool = True
    """LoRA / QLoRA: each adapted linear layer runs as one autograd function (base matmul, adapter matmuls, dropout,
    backward in 3-4 matmuls) instead of PEFT's chain of module calls, casts and small ops, with the adapters' 16-bit
    copies refreshed once per model call. With LoRA dropout it keeps the layer's input and the random generator's
    state instead of the dropped copy and its mask, and draws the mask again in backward: layers reading one input
    share it (Qwen2.5-VL-7B: 69 kB per token per decoder layer less, counted on the CPU; the memory estimate counts
    it). Same PEFT modules and files. Not under ZeRO-3; with speed.compile only in the layers that stay eager (the
    first decoder layer): the compiled ones run PEFT's modules, fused by inductor."""
    mlp_activation_recompute: bool = True
    """The decoder layers' gated MLP (`down_proj(act_fn(gate_proj(x)) * up_proj(x))`) keeps the gate and up projections
    for backward and recomputes `act_fn(gate)` there instead of keeping it: 2 bytes per intermediate-width element per
    token less in every eagerly run decoder layer (Qwen2.5-VL-7B: 37.9 kB per token per layer), the same outputs and
    gradients bit for bit, one more elementwise pass per layer in backward. Compiled layers get the same from inductor.
    Any method, ZeRO stage and family whose MLP is transformers' gated one (speed/gated_mlp.py)."""
    mlp_chunk_tokens: int = Field(0, ge=0)
    """With gradient checkpointing: the checkpointed decoder layers run their gated MLP as one function that keeps only
    its input and, in backward, recomputes and back-propagates it this many tokens at a time (0: off). The MLP's
    intermediate-width tensors, most of a recomputed layer's activations and the usual peak of a checkpointed step,
    are then alive for one chunk instead of the whole micro-batch (Qwen2.5-VL-7B, LoRA, 4 x 768 tokens in chunks of
    1024: about 0.4 GiB less at the peak by the estimate). The recomputation skips the MLP where the layer only adds
    its output to the residual stream, so the MLP still runs forward twice per step; elsewhere (Gemma 3, Llama 3.2
    Vision) three times. One process without DeepSpeed; eagerly run layers (speed/tiled_mlp.py)."""
    checkpoint_every_n_layers: PositiveInt | Literal["auto"] = "auto"
    """With hardware.gradient_checkpointing: checkpoint only every n-th decoder layer (1 = every layer). Larger values
    recompute less and keep more activations: faster, more memory. auto (the default) chooses n from the memory
    estimate on a CUDA GPU: the largest of 1, 2, 3, 4, 6, 8, 12, ... up to the number of layers whose estimate stays
    15% below the GPU's memory (the hardware.memory_fraction cap where set), and no checkpointing at all where that
    fits too; 1 where no such estimate exists (CPU, DeepSpeed or several processes, a model the estimator does not know).
    The log and train_log.jsonl's memory_preflight event say what it chose and why; the run folder's config.yaml records
    the number. A number fixes n (1: the checkpointing of earlier versions)."""
    checkpoint_offload: bool = False
    """With hardware.gradient_checkpointing: keep the checkpointed layer inputs in pinned CPU memory (frees
    layers x tokens x hidden x 2 bytes of GPU memory, costs a copy each way)."""
    embeddings_on_cpu: bool = False
    """QLoRA: keep the frozen input-embedding table (vocab x hidden, 16-bit: 1.0 GiB for Qwen2.5-VL-7B) in CPU
    memory and look tokens up there; only the looked-up rows go to the GPU. Not with a lm_head tied to it."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each language-model decoder layer but the first (fused elementwise kernels, fewer launches, fewer
    saved intermediates). The first steps pay for compiling: about 38 s for a 2B model on an H100 in a first run on a
    machine (three compilations: the first shape, dynamic shapes at the first new length, a batch without padding),
    12 s in later runs (inductor's on-disk cache, kept in ~/.cache/vlmtune/compile/<versions and GPU> unless
    TORCHINDUCTOR_CACHE_DIR says otherwise). auto (the default) compiles single-process runs of 500+ optimizer
    steps on a CUDA GPU of compute capability 7.0+ with Triton and a C compiler, unless the memory estimate is within
    10% of the GPU's memory, and falls back to eager for any layer the compiler fails on (the log says which way it
    went and why); true compiles anywhere (CPU, short runs, DeepSpeed: unmeasured there); false never. Measured on an H100
    (benchmarks/RESULTS.md session 7, median step): 1.16-1.44x vlmtune's eager speed on W2-W4 (QLoRA 7B, LoRA 7B, full
    2B), 1.43x on W1 without checkpointing; a whole 300-step W1 run 0.96x eager in a first run, 1.31x with the cache."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """With speed.compile: torch.compile's mode. reduce-overhead replays each compiled layer as a CUDA graph,
    re-recorded for each new sequence length. Measured on an H100 (W1 without checkpointing): slower than the default
    mode (14.3k vs 15.9k tokens/s at the median step), and it fails with gradient checkpointing."""
    compile_vision: bool = False
    """With speed.compile: also compile each block of a frozen vision tower (forward only, under no_grad; blocks that
    train stay eager). The tower is otherwise eager: on W3 (Qwen2.5-VL-7B, 4 images of 448 px a step) its forward was
    17% of the step's GPU kernel time for under 3% of its FLOPs (benchmarks/RESULTS.md session 19). Off until measured
    on a GPU; about one more compilation per block kind at the start."""
    hash_dropout: bool = False
    """With speed.compile and LoRA dropout: the adapters of the compiled decoder layers draw their dropout mask from
    a hash of each element's index and a per-call seed (speed/hash_dropout.py), inside a checkpointed region, so
    backward computes the mask and the dropped input again instead of keeping them. Counted on the CPU: Qwen2-VL-2B's
    compiled layer keeps 49,272 bytes per token instead of 103,736 with PyTorch's dropout. The masks are not
    PyTorch's random stream (a compiled run never matched an eager one draw for draw). Off until measured on a GPU."""
    fp8: bool | Literal["auto"] = "auto"
    """LoRA: the frozen base linear layers run their forward and input-gradient matmuls in FP8 (e4m3 weights,
    activations and gradients, scaled per row from their absolute maximum, torch._scaled_mm writing bf16), inside the
    fused LoRA layers, or with speed.compile inside the compiled decoder layers (traced, the quantization fused by
    inductor; on the 7B compiled: 1.16x bf16's speed, loss +0.31% after 40 steps); adapters, norms and loss stay
    bf16. The weights' e4m3 copies, both layouts, are computed once and kept beside the bf16 weights (about +100% of the adapted base weights' memory; the estimate counts them).
    auto: off while FP8 is slower than bf16 (measured on an H100, Qwen2-VL-2B, 300 steps: 0.60x bf16's speed, final loss
    +1.3%; once it pays: CUDA GPUs of compute capability 8.9+, one process or DDP); true runs it wherever PyTorch can (stops with the reason elsewhere;
    not with QLoRA, full fine-tuning or speed.fused_lora=false); false never."""
    fp8_scales: Literal["row", "tensor"] = "row"
    """With speed.fp8: how activations, gradients and weights are scaled to e4m3. row: one scale per token row and per
    weight row (PyTorch's row-wise scaled matmul; the 300-step loss check ran with it); tensor: one scale per operand
    (cuBLASLt's FP8 matmul; coarser where a few rows hold outliers). row falls back to tensor where this PyTorch has
    no row-wise kernel for the GPU. Which is faster on a GPU is what benchmarks/fp8_check.py measures."""


class VlmtuneConfig(_Strict):
    experiment_name: str = "vlmtune-run"
    """Name of the run (logs, TensorBoard)."""
    output_dir: Path = Path("output/run")
    """Run folder: checkpoints, logs, the resolved config and the final adapter or model."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: MethodConfig = MethodConfig()
    training: TrainingConfig = TrainingConfig()
    hardware: HardwareConfig = HardwareConfig()
    distributed: DistributedConfig = DistributedConfig()
    speed: SpeedConfig = SpeedConfig()

    @model_validator(mode="after")
    def _cross_field(self) -> VlmtuneConfig:
        apply_method_defaults(self)
        problems = []
        if self.method.name == TrainingMethod.QLORA and self.hardware.precision == "fp32":
            problems.append("method.name=qlora needs hardware.precision bf16 or fp16 (4-bit layers compute in 16-bit)")
        if self.method.name == TrainingMethod.FULL and self.method.lora.train_projector:
            problems.append("method.lora.train_projector only applies to lora/qlora; full fine-tuning trains the projector already")
        if (
            self.speed.compile is not False
            and self.speed.compile_mode == "reduce-overhead"
            and self.hardware.gradient_checkpointing
        ):
            problems.append(
                "speed.compile_mode=reduce-overhead cannot run with hardware.gradient_checkpointing=true (a layer's "
                "CUDA graph output is overwritten before the recomputation reads it); use speed.compile_mode=default "
                "or turn checkpointing off"
            )
        if self.speed.fp8 is True:
            problems += _fp8_problems(self)
        if self.distributed.offload != "none" and self.distributed.engine == "none":
            problems.append("distributed.offload needs distributed.engine=deepspeed (or auto with DeepSpeed)")
        if self.distributed.engine != "none" and self.distributed.deepspeed_config is None:
            problems += zero_combination_problems(self, self.distributed.zero_stage, self.distributed.offload)
        if problems:
            raise ValueError("\n".join(problems))  # the loader reports one problem per line
        return self


def _fp8_problems(config: VlmtuneConfig) -> list[str]:
    """speed.fp8=true with settings it cannot run under (the device is checked when the run starts)."""
    problems = []
    if config.method.name != TrainingMethod.LORA:
        problems.append(f"speed.fp8=true applies to method.name=lora only (got {config.method.name.value}: QLoRA's "
                        "base layers are 4-bit, full fine-tuning trains its weights); set speed.fp8=false")
    if not config.speed.fused_lora:
        problems.append("speed.fp8=true needs speed.fused_lora=true (the FP8 matmuls run inside the fused LoRA layers)")
    return problems


def zero_combination_problems(config: VlmtuneConfig, stage: int, offload: str) -> list[str]:
    """Method x ZeRO stage x offload combinations that cannot work, each naming the field and what to do instead.
    Checked here for the rendered DeepSpeed config and by the engine for a user's JSON (its stage and offload)."""
    problems = []
    optimizer = config.training.optimizer
    if "training.optimizer" in derived_fields(config):  # say where the value came from
        optimizer += " (lean QLoRA's, method.quantization.lean)"
    eight_bit = config.training.optimizer in ("adamw_8bit", "paged_adamw_8bit")
    if offload != "none" and eight_bit:
        problems.append(f"training.optimizer={optimizer} cannot be offloaded (DeepSpeed offload runs its own CPU "
                        "Adam): use adamw_torch, or distributed.offload=none")
    if stage == 3 and eight_bit:
        problems.append(f"training.optimizer={optimizer} does not work on ZeRO-3 partitioned parameters: use "
                        "adamw_torch, or distributed.zero_stage 1-2")
    if config.method.name == TrainingMethod.QLORA and offload == "optimizer_and_params":
        problems.append("method.name=qlora with distributed.offload=optimizer_and_params: DeepSpeed cannot move "
                        "4-bit weights and their quantization state to the CPU; use offload=optimizer")
    if offload != "none" and config.hardware.use_cpu:
        problems.append("distributed.offload moves GPU states to CPU RAM, but hardware.use_cpu=true trains on the "
                        "CPU already; set distributed.offload=none")
    return problems
