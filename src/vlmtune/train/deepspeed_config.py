"""The DeepSpeed config of a run: rendered from the typed config, or a user's JSON checked against it.

Micro-batch, accumulation, global batch, precision and clipping stay "auto": the HF Trainer fills them from the
training arguments, which remain the one source of truth. Bucket sizes are numbers derived from the language model's
hidden size h the way HF's "auto" would (reduce/all-gather buckets h^2, ZeRO-3 prefetch 0.9 h^2, persistence 10 h),
so the memory estimator (`vlmtune.memory.zero`) models what runs. ZeRO-3 always gathers 16-bit weights on save, so
adapters and full models are written in standard HF format, never empty or sharded. With offload the config names
DeepSpeed's AdamW (CPU Adam), because ZeRO-Offload refuses a client optimizer.

The effective config is written into the run folder as `deepspeed_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.config.distributed import launched_world_size, read_deepspeed_json, uses_deepspeed, zero_of
from vlmtune.config.schema import VlmtuneConfig, zero_combination_problems
from vlmtune.errors import ConfigError, VlmtuneError, require

if TYPE_CHECKING:
    from vlmtune.methods.base import PrecisionPlan

CONFIG_FILE = "deepspeed_config.json"
AUTO = "auto"
STEPS_PER_PRINT = 1_000_000_000
"""DeepSpeed's own step printer stays silent; vlmtune logs loss, speed and memory itself."""


def _offload(device: str = "cpu") -> dict[str, Any]:
    return {"device": device, "pin_memory": True}


def zero_section(config: VlmtuneConfig, hidden_size: int | None) -> dict[str, Any]:
    dist = config.distributed
    stage = dist.zero_stage
    bucket: int | str = hidden_size * hidden_size if hidden_size else AUTO
    zero: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return zero
    zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=bucket)
    if stage in (1, 2):
        zero.update(
            allgather_partitions=True,
            allgather_bucket_size=bucket if hidden_size else int(5e8),
            reduce_scatter=True,
        )
    if stage == 3:
        prefetch, persistence = dist.prefetch_bucket_size, dist.param_persistence_threshold
        if hidden_size:
            prefetch = int(0.9 * hidden_size * hidden_size) if prefetch == AUTO else prefetch
            persistence = 10 * hidden_size if persistence == AUTO else persistence
        zero.update(
            stage3_prefetch_bucket_size=prefetch,
            stage3_param_persistence_threshold=persistence,
            stage3_max_live_parameters=dist.max_live_parameters,
            stage3_max_reuse_distance=dist.max_reuse_distance,
            stage3_gather_16bit_weights_on_model_save=True,
            sub_group_size=dist.sub_group_size,
        )
    if dist.offload != "none":
        zero["offload_optimizer"] = _offload()
        if dist.offload_ratio < 1:
            zero["offload_optimizer"]["ratio"] = dist.offload_ratio
    if dist.offload == "optimizer_and_params":
        zero["offload_param"] = _offload()
    return zero


def render(config: VlmtuneConfig, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for `config.distributed` (hidden_size: the language model's; None leaves the bucket
    sizes "auto" for the Trainer to fill from the model)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": AUTO,
        "train_batch_size": AUTO,
        "gradient_accumulation_steps": AUTO,
        "gradient_clipping": AUTO,
        "bf16": {"enabled": AUTO},
        "fp16": {
            "enabled": AUTO,
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": zero_section(config, hidden_size),
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if config.distributed.offload != "none":
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": AUTO, "betas": AUTO, "eps": AUTO, "weight_decay": AUTO},
        }
    return ds


def _mismatch(ds: dict[str, Any], key: str, want: Any, field: str) -> list[str]:
    node, _, leaf = key.rpartition(".")
    section = ds.get(node, {}) if node else ds
    value = section.get(leaf) if isinstance(section, dict) else None
    if value is None or value == AUTO or value == want:
        return []
    return [
        f'{key}={value!r} disagrees with {field}={want!r}: set it to "auto" (vlmtune fills it) or change {field}'
    ]


def check_user_config(
    ds: dict[str, Any], config: VlmtuneConfig, plan: PrecisionPlan, world: int
) -> list[str]:
    """Problems with a user's DeepSpeed config for this run (empty when it can be used as is)."""
    t = config.training
    problems: list[str] = []
    stage, offload = zero_of(ds)
    zero = ds.get("zero_optimization") or {}
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage must be 0, 1, 2 or 3, got {zero.get('stage')!r}")
    if stage == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        problems.append(
            "zero_optimization.stage3_gather_16bit_weights_on_model_save must be true under ZeRO-3: "
            "without it the saved adapter or model is empty (the weights stay sharded)"
        )
    if offload == "optimizer_and_params" and stage != 3:
        problems.append(f"zero_optimization.offload_param needs stage 3 (got stage {stage})")
    if offload != "none" and "optimizer" not in ds and ds.get("zero_force_ds_cpu_optimizer", True):
        problems.append(
            'zero_optimization.offload_optimizer needs an "optimizer" section (e.g. {"type": "AdamW", '
            '"params": {"lr": "auto", ...}}): ZeRO-Offload refuses the Trainer\'s optimizer'
        )
    batch = t.batch_size if isinstance(t.batch_size, int) else None
    if batch is not None:
        problems += _mismatch(ds, "train_micro_batch_size_per_gpu", batch, "training.batch_size")
        problems += _mismatch(
            ds,
            "train_batch_size",
            batch * t.gradient_accumulation_steps * world,
            "training.batch_size x gradient_accumulation_steps x processes",
        )
    problems += _mismatch(
        ds,
        "gradient_accumulation_steps",
        t.gradient_accumulation_steps,
        "training.gradient_accumulation_steps",
    )
    problems += _mismatch(ds, "gradient_clipping", t.max_grad_norm, "training.max_grad_norm")
    problems += _mismatch(ds, "bf16.enabled", plan.bf16, "bf16 of hardware.precision on this device")
    problems += _mismatch(ds, "fp16.enabled", plan.fp16, "fp16 of hardware.precision on this device")
    return problems + zero_combination_problems(config, stage, offload)


def deepspeed_config(
    config: VlmtuneConfig, plan: PrecisionPlan, world: int, hidden_size: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed config this run trains with: the user's (validated) or one rendered from `config`."""
    path = config.distributed.deepspeed_config
    if path is None:
        ds = render(config, hidden_size)
        _, offload = zero_of(ds)
        if offload != "none" and plan.device == "cpu":
            raise ConfigError(
                [
                    f"distributed.offload={offload} moves GPU states to CPU RAM, but this run trains on "
                    "the CPU; set distributed.offload=none"
                ]
            )
        return ds
    ds = read_deepspeed_json(Path(path))
    problems = check_user_config(ds, config, plan, world)
    if problems:
        raise ConfigError(problems, source=str(path))
    return ds


def write(ds: dict[str, Any], out_dir: Path) -> Path:
    """Write the effective config into the run folder (atomically)."""
    path = Path(out_dir) / CONFIG_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ds, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def text_hidden_size(config: VlmtuneConfig) -> int | None:
    """The language model's hidden size, read from the model's config.json (no weights)."""
    from transformers import AutoConfig

    from vlmtune.hub import model_folder

    hf_config = AutoConfig.from_pretrained(model_folder(config.model.name_or_path, config.model.revision))
    return getattr(hf_config.get_text_config(), "hidden_size", None)


def prepare(
    config: VlmtuneConfig, plan: PrecisionPlan, out_dir: Path, world: int, writer: bool
) -> dict[str, Any] | None:
    """The run's DeepSpeed config, written into the run folder by the `writer` process; None without DeepSpeed.
    Fails fast, before any weights load: DeepSpeed missing, a bad user JSON, an impossible combination."""
    if not uses_deepspeed(config.distributed, world):
        return None
    require("deepspeed", "deepspeed", "DeepSpeed (distributed.engine=deepspeed, or several processes)")
    if launched_world_size() is None:
        raise VlmtuneError(
            "DeepSpeed runs in processes started by a launcher (it reads RANK, WORLD_SIZE and MASTER_ADDR from "
            "the environment): use `vlmtune train`, which starts them, or `torchrun --standalone --nproc_per_node "
            "N -m vlmtune.train ...`; in a notebook set RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 "
            "MASTER_PORT=29500 first"
        )
    ds = deepspeed_config(config, plan, world, text_hidden_size(config))
    if writer:
        write(ds, out_dir)
    return ds
