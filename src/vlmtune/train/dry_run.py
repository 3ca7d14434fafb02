"""`vlmtune train CONFIG --dry-run [--gpu NAME]`: the memory preflight of a config, without loading anything.

The training preflight (preflight.py) estimates from the encoded data, which needs the model's processor and the
data on this machine. The dry run estimates from the config alone, as `vlmtune recommend` and `vlmtune estimate`
do: the worst micro-batch from a scan of data.train_path where that file exists (image sizes, text length), else
data.max_length tokens with one image per sample. Checked against a GPU of the catalogue (`--gpu`, the verdict
`recommend` and `estimate --gpu` give), or else against the visible CUDA GPU as the training preflight checks it
(the estimate's reserved peak against what the GPU has free). `speed.checkpoint_every_n_layers: auto` is decided
for that GPU by the function the training preflight uses, and the estimate printed is the one at that choice. It
loads no weights and starts no process, so a config written by `recommend` for another machine can be checked here.
`speed.compile: auto` is estimated eager (whether it compiles depends on the training machine and the step count);
the report adds what compiled layers would give, which training's preflight uses where auto compiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vlmtune.errors import VlmtuneError
from vlmtune.memory.gpus import GIB

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.memory.breakdown import Breakdown
    from vlmtune.speed.checkpoint_policy import CheckpointChoice, Room


@dataclass(frozen=True)
class DryRun:
    breakdown: Breakdown
    fits: bool
    verdict: str
    """One line: the GPU and whether the estimate fits it."""
    data: str | None
    """What the data scan found, or None without one."""
    checkpointing: str | None = None
    """What speed.checkpoint_every_n_layers=auto chose for that GPU and why (None: a number was set)."""
    compiled: str | None = None
    """speed.compile=auto: what the estimate would be with compiled layers, which training's preflight uses where auto
    compiles the run (None: compile is true or false, or compiling would not change the estimate)."""


def dry_run_estimate(config: VlmtuneConfig, gpu: str | None = None) -> Breakdown:
    """The estimate a dry run prints: `config`'s inputs (ZeRO stage, offload and GPU count from `distributed`, as
    training renders them), with the worst micro-batch of data.train_path when that file exists, at the
    checkpointing the run would use on catalogue GPU `gpu` (without one, every layer for checkpoint auto)."""
    room = None
    if gpu is not None:
        from vlmtune.memory.gpus import get_gpu
        from vlmtune.speed.checkpoint_policy import Room

        room = Room.catalogue(get_gpu(gpu))
    return _estimate(config, gpu, room)[0]


def _estimate(config: VlmtuneConfig, gpu: str | None, room: Room | None) -> tuple[Breakdown, str | None, CheckpointChoice]:
    from vlmtune.config.distributed import uses_deepspeed, world_size
    from vlmtune.memory import estimate, inputs_from_config
    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.gpus import get_gpu
    from vlmtune.speed.checkpoint_policy import decide_checkpointing, language_layers

    inputs = inputs_from_config(config, gpu=get_gpu(gpu).name if gpu else None)
    path, data = config.data.train_path, None
    if path is not None and Path(path).is_file():
        from vlmtune.memory.data_scan import scan_data
        from vlmtune.train.batch_sizing import packed_batch, packed_rows

        spec = lookup_model(inputs.model)
        profile = scan_data(path, spec, image_root=config.data.image_root)
        costs = profile.costs(spec, inputs.image_size, inputs.min_pixels, inputs.max_pixels)
        exact = "" if profile.exact_text else " (text tokens approximated: no tokenizer for this model here)"
        rows = packed_rows(config, profile, costs, None)  # speed.packing: batch_size counts rows, as the preflight
        if rows:
            fields = packed_batch(rows, inputs.batch_size, labelled=False)
            inputs = inputs.with_(**{k: v for k, v in fields.items() if v is not None})
            data = (f"data {path}: {len(profile.samples)} samples packed in {len(rows)} rows, longest row "
                    f"{inputs.seq_len} tokens{exact}")
        else:
            shape = profile.batch(spec, inputs.batch_size, inputs.seq_len, costs=costs)
            inputs = inputs.with_(seq_len=shape.seq_len, vit_patches_per_batch=shape.vit_patches,
                                  images_per_sample=shape.images_per_sample, image_tokens_per_sample=shape.image_tokens)
            data = f"data {path}: {len(profile.samples)} samples, longest micro-batch {shape.seq_len} tokens{exact}"

    def estimate_at(every: int | None) -> Breakdown:  # as the training preflight estimates each choice
        return estimate(inputs.with_(gradient_checkpointing=every is not None, checkpoint_every=every or 1))

    world = world_size(config.distributed)
    choice = decide_checkpointing(config, room, estimate_at, language_layers(inputs.model), "cuda", world,
                                  uses_deepspeed(config.distributed, world))
    return choice.breakdown or estimate(inputs), data, choice


def dry_run(config: VlmtuneConfig, gpu: str | None = None) -> DryRun:
    """Estimate `config` and judge it against `gpu` (a catalogue name) or the visible CUDA GPU, at the checkpointing
    the run would choose there (speed.checkpoint_every_n_layers=auto: the same decision as the training preflight)."""
    from vlmtune.speed.checkpoint_policy import Room

    if gpu is not None:
        from vlmtune.memory.gpus import get_gpu

        breakdown, data, choice = _estimate(config, gpu, Room.catalogue(get_gpu(gpu)))
        v = breakdown.verdict
        assert v is not None
        verdict = (f"{v.gpu}: {v.capacity / GIB:.2f} GiB usable, {v.headroom / GIB:+.2f} GiB left at the peak: "
                   f"{v.status.upper() if v.status == 'does not fit' else v.status}")
        return DryRun(breakdown, v.status != "does not fit", verdict, data, choice.reason if choice.auto else None,
                      _compiled_note(config, breakdown))
    import torch

    if not torch.cuda.is_available():
        raise VlmtuneError("--dry-run needs a GPU to check the estimate against: name one with --gpu NAME "
                           "(e.g. --gpu 'RTX 4090'; `vlmtune recommend --table` lists them), or run it where "
                           "a CUDA GPU is visible")
    from vlmtune.train.gpu_memory import GpuMemory, device_index, read_gpu_memory

    memory = read_gpu_memory(device_index())
    if config.hardware.memory_fraction is not None:
        limit = int(config.hardware.memory_fraction * memory.total)
        memory = GpuMemory(memory.name, memory.total, memory.free, memory.bf16, limit)
    breakdown, data, choice = _estimate(config, None, Room.visible(memory))
    fits = breakdown.peak_reserved <= memory.available
    return DryRun(breakdown, fits, f"{memory.describe()}: {'fits' if fits else 'DOES NOT FIT'}", data,
                  choice.reason if choice.auto else None, _compiled_note(config, breakdown))


def _compiled_note(config: VlmtuneConfig, breakdown: Breakdown) -> str | None:
    """The dry run cannot tell whether speed.compile=auto will compile (that needs the training machine's Triton, C
    compiler and the run's step count, speed/compile_policy.py), so it estimates eager and says what compiling gives."""
    from vlmtune.memory import estimate
    from vlmtune.speed.compile_policy import MIN_STEPS

    if config.speed.compile != "auto" or breakdown.inputs.compiled:
        return None
    compiled = estimate(breakdown.inputs.with_(compiled=True))
    if abs(breakdown.peak_total - compiled.peak_total) < 0.01 * GIB:
        return None
    return (f"speed.compile=auto: estimated with eager layers; where the run compiles (a CUDA GPU with Triton and a "
            f"C compiler, one process, {MIN_STEPS}+ optimizer steps, no packing) training's preflight estimates "
            f"compiled ones: {compiled.peak_total / GIB:.2f} GiB at the peak as nvidia-smi shows it, against "
            f"{breakdown.peak_total / GIB:.2f} here")


def report(result: DryRun) -> str:
    lines = [result.breakdown.to_table()]
    if result.data:
        lines.append(result.data)
    if result.checkpointing:
        lines.append(result.checkpointing)
    lines.append(f"{result.breakdown.peak_summary()}; {result.verdict}")
    if result.compiled:
        lines.append(result.compiled)
    if not result.fits:
        lines.append("This config does not fit according to the estimate: `vlmtune recommend --gpu NAME` finds "
                     "settings that do; `vlmtune train` would refuse it unless --force.")
    return "\n".join(lines)
