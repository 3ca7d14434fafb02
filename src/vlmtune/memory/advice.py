"""What the advisor hands back: a ready vlmtune config file, and the GPU x count table hardware guides print."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import yaml

from vlmtune.memory.gpus import GIB, GpuSpec
from vlmtune.memory.inputs import EstimateInputs
from vlmtune.memory.recommend import Recommendation, lean_qlora, recommend

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig


OFFLOAD_FIELD = {"none": "none", "optimizer": "optimizer", "all": "optimizer_and_params"}
"""The estimator's offload names -> distributed.offload's."""


def config_dict(rec: Recommendation, config: VlmtuneConfig, train_path: str | None = None) -> dict[str, Any]:
    """`config` with every recommended setting applied, as a plain dict that `vlmtune train` accepts: method, lean
    QLoRA, rank, loss chunk, max_pixels, micro-batch, accumulation, checkpointing (with the every-n-th-layer number it
    was estimated at, so a dry run on the file shows the same estimate), precision and the `distributed`
    section (GPU count, DeepSpeed or not, ZeRO stage, offload). Values the base config held only as its method's
    defaults are left out, so they follow the recommended method when the file loads."""
    from vlmtune.config.loader import config_from_dict, config_to_dict
    from vlmtune.config.method_defaults import derived_fields

    if rec.best is None:
        raise ValueError("no recommendation to write")
    i = rec.best.inputs
    data = config_to_dict(config)
    for field in [*derived_fields(config), *(f for f, _ in _other_methods_values(config, i.method))]:
        *path, name = field.split(".")
        node = data
        for part in path:
            node = node[part]
        node.pop(name, None)
    data["model"]["name_or_path"] = i.model
    data["method"]["name"] = i.method
    data["method"]["lora"]["rank"] = i.lora_rank
    lean = i.method == "qlora" and i.quantize_vision_tower and i.quantize_lm_head and i.embeddings_on_cpu
    quant = data["method"]["quantization"]
    quant["lean"] = lean
    quant["quantize_vision_tower"], quant["quantize_lm_head"] = i.quantize_vision_tower, i.quantize_lm_head
    data["training"]["optimizer"] = i.optimizer
    data["speed"]["embeddings_on_cpu"] = i.embeddings_on_cpu
    data["speed"]["loss_chunk_tokens"] = i.loss_chunk_tokens
    data["training"]["batch_size"] = i.batch_size
    data["training"]["gradient_accumulation_steps"] = i.gradient_accumulation_steps
    data["hardware"]["gradient_checkpointing"] = i.gradient_checkpointing
    # the n the recommendation was estimated at (auto's 1): `train FILE` would choose its own n for the card it finds
    data["speed"]["checkpoint_every_n_layers"] = i.checkpoint_every
    data["hardware"]["precision"] = i.precision
    if i.max_pixels:
        data["data"]["max_pixels"] = i.max_pixels
    if train_path:
        data["data"]["train_path"] = str(train_path)
    dist = data["distributed"]
    dist["num_gpus"] = i.num_gpus
    dist["deepspeed_config"] = None
    if i.zero_stage:
        dist.update(engine="deepspeed", zero_stage=i.zero_stage, offload=OFFLOAD_FIELD[i.offload])
        if i.offload == "none" or i.zero_stage != 3:
            dist["offload_ratio"] = 1.0
    else:  # one GPU without DeepSpeed, or plain DDP over several
        dist.update(engine="none" if i.num_gpus > 1 else "auto", offload="none", offload_ratio=1.0)
    config_from_dict(data, source="vlmtune recommend")  # the file must load; a failure here is a bug
    return data


def _other_methods_values(config: VlmtuneConfig, method: str) -> list[tuple[str, object]]:
    """(field, value) the config sets for its own method where the recommended method's default differs (a full
    fine-tuning preset's learning rate under a recommended LoRA): the file leaves them to the new method."""
    from vlmtune.config.method_defaults import METHOD_DEFAULTS, derived_fields

    own, derived = config.method.name.value, derived_fields(config)
    out = []
    for field, values in METHOD_DEFAULTS.items():
        if method != own and values.get(method) != values.get(own) and field not in derived:
            section, name = field.rsplit(".", 1)
            out.append((field, getattr(getattr(config, section), name)))
    return out


def config_yaml(
    rec: Recommendation, config: VlmtuneConfig, file_name: str = "THIS_FILE", train_path: str | None = None
) -> str:
    """The recommended config file, with a header saying what it targets, the expected memory and how to launch.
    Every recommended setting is a field of the file, so `vlmtune train FILE` runs what was recommended and
    `vlmtune train FILE --dry-run --gpu NAME` shows the same estimate."""
    assert rec.best is not None
    i, b = rec.best.inputs, rec.best.breakdown
    header = [
        f"# vlmtune recommend: {i.model} on {rec.num_gpus} x {rec.gpu.name}",
        f"# {rec.describe()}",
        f"# {b.peak_summary()}",
        f"# Effective batch {rec.effective_batch} = micro-batch {i.batch_size} x accumulation "
        f"{i.gradient_accumulation_steps} x {rec.num_gpus} GPU(s); safety margin {rec.margin:.0%}; "
        f"sequence {b.seq_len} tokens, {b.vit_patches} vision patches per micro-batch.",
    ]
    header += [f"# Why: {reason}" for reason in rec.reasons]
    header += [f"# {field}: {i.method}'s default; the config's {value} was set for {config.method.name.value}"
               for field, value in _other_methods_values(config, i.method)]
    if i.zero_stage or rec.num_gpus > 1:
        header.append(
            f"# Distributed (the distributed section below): "
            f"{'DeepSpeed ZeRO-' + str(i.zero_stage) if i.zero_stage else 'DDP'}"
            f"{', offload ' + OFFLOAD_FIELD[i.offload] if i.offload != 'none' else ''} on {rec.num_gpus} GPU(s); "
            f"`vlmtune train` starts the {rec.num_gpus} processes itself."
        )
    if b.cpu_ram >= GIB // 2:
        header.append(f"# Needs about {b.cpu_ram / GIB:.0f} GiB of CPU RAM on the node for what lives there (offloaded "
                      "states, the embedding table of speed.embeddings_on_cpu).")
    data = "" if train_path or config.data.train_path else " --train-data data/train.jsonl"
    header.append(f'# Check: vlmtune train {file_name} --dry-run --gpu "{rec.gpu.name}"')
    header.append(f"# Launch: vlmtune train {file_name}{data}")
    body = yaml.safe_dump(config_dict(rec, config, train_path), sort_keys=False)
    return "\n".join(header) + "\n" + body


def table(
    base: EstimateInputs,
    gpus: Iterable[GpuSpec],
    counts: Iterable[int],
    effective_batch: int,
    methods: tuple[str, ...] = ("lora", "qlora"),
    margin: float = 0.10,
    max_cpu_ram: int | None = None,
) -> list[Recommendation]:
    """One recommendation per (GPU, count): the table hardware guides publish, computed."""
    counts = list(counts)
    return [
        recommend(base, gpu, n, effective_batch, methods, margin, max_cpu_ram=max_cpu_ram)
        for gpu in gpus
        for n in counts
    ]


def format_table(recs: list[Recommendation]) -> str:
    head = (
        f"{'GPU':<20}{'x':>3}  {'method':<14}{'batch':>6}{'accum':>6}  {'parallel':<16}{'ckpt':<5}"
        f"{'max_pixels':>11}{'GiB/GPU':>9}{'of':>7}{'CPU GiB':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in recs:
        left = f"{r.gpu.name:<20}{r.num_gpus:>3}  "
        if r.best is None:
            lines.append(left + "does not fit")
            continue
        i, b = r.best.inputs, r.best.breakdown
        method = ("lean " if lean_qlora(i) else "") + i.method + (f" r{i.lora_rank}" if i.method != "full" else "")
        zero = (
            (f"ZeRO-{i.zero_stage}" + {"none": "", "optimizer": "+opt-off", "all": "+all-off"}[i.offload])
            if i.zero_stage
            else ("DDP" if i.num_gpus > 1 else "-")
        )
        lines.append(
            left + f"{method:<14}{i.batch_size:>6}{i.gradient_accumulation_steps:>6}  {zero:<16}"
            f"{'on' if i.gradient_checkpointing else 'off':<5}{i.max_pixels or '-':>11}"
            f"{b.peak_total / GIB:>9.1f}{r.gpu.usable_bytes / GIB:>7.1f}"
            f"{(f'{b.cpu_ram / GIB:.0f}' if b.cpu_ram else '-'):>9}"
        )
    return "\n".join(lines)
