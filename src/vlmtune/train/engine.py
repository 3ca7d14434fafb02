"""The one training engine: LoRA, QLoRA and full fine-tuning all run through `train(config)`.

    from vlmtune import ConfigPresets, train
    result = train(config)            # or: vlmtune train config.yaml [--resume]

Reads top to bottom: run folder and resolved config, family, data check, processor, data sets, model (prepared
by the method strategy), training arguments, the HF Trainer, and the final save into `output_dir/final`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.config.distributed import uses_deepspeed, world_size, zero_of
from vlmtune.config.loader import save_config
from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import ConfigError, VlmtuneError
from vlmtune.outputs import claim_folder
from vlmtune.outputs import record as record_output
from vlmtune.train.result import TrainResult
from vlmtune.train.saving import find_checkpoints, resolve_resume, save_final

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from vlmtune.data.dataset import EncodedDataset, EncodeOnce
    from vlmtune.families.base import FamilyDescriptor

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"


def resolve_family(config: VlmtuneConfig) -> FamilyDescriptor:
    from vlmtune.families import family_for_model, get_family

    family = (
        get_family(config.model.family)
        if config.model.family
        else family_for_model(config.model.name_or_path, config.model.revision)
    )
    problems = family.check(config)
    if problems:
        raise ConfigError(problems)
    for note in family.notes(config):
        log.warning("experimental: %s", note)
    return family


def _encoder(processor: Any, family: FamilyDescriptor, config: VlmtuneConfig) -> Callable[[Any], Any]:
    from vlmtune.data.processing import encode

    return lambda record: encode(record, processor, family, config.data)


def _check_data(config: VlmtuneConfig, processor: Any, family: FamilyDescriptor) -> dict[Path, EncodeOnce]:
    """Every record validated (schema, images, token lengths) before any model weights are read.

    Counting tokens encodes each record; the returned passes (per file) hand those encodings to `build_dataset`."""
    from vlmtune.data.check import check_file
    from vlmtune.data.dataset import EncodeOnce
    from vlmtune.data.processing import count_tokens

    def token_length(record: Any) -> Any:
        return count_tokens(record, processor, family, config.data)

    passes = {}
    for path in (config.data.train_path, config.data.val_path):
        if path is not None:
            first_pass = EncodeOnce(_encoder(processor, family, config), token_length, config.data.max_length)
            report = check_file(path, config.data, first_pass.count, family=family.name)
            report.raise_if_errors()
            if report.warnings:
                log.warning("data check:\n%s", report.format(limit=10))
            else:
                log.info("data check: %s", report.format().splitlines()[0])
            passes[Path(path)] = first_pass
    return passes


def build_dataset(
    path: Path,
    processor: Any,
    family: FamilyDescriptor,
    config: VlmtuneConfig,
    first_pass: EncodeOnce | None = None,
) -> EncodedDataset:
    from vlmtune.data.dataset import EncodedDataset
    from vlmtune.data.records import read_records
    from vlmtune.data.survey import survey

    encode = _encoder(processor, family, config)
    return EncodedDataset(read_records(path, config.data), encode, source=path, first_pass=first_pass,
                          survey=lambda record: survey(record, processor, family, config.data))


def _loss_history(log_history: list[dict[str, Any]]) -> list[float]:
    return [float(entry["loss"]) for entry in log_history if "loss" in entry]


def train(
    config: VlmtuneConfig,
    resume: bool | str = False,
    callbacks: list[TrainerCallback] | None = None,
    trust_checkpoint: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Fine-tune `config.model` on `config.data` with `config.method`; returns where everything was written.

    resume: True continues from the newest checkpoint in output_dir, a path continues from that checkpoint; the
    data order, optimizer, scheduler and RNG state continue as if the run had never stopped.
    callbacks: extra `transformers.TrainerCallback`s (for tests and integrations).
    overwrite: train into an output_dir that holds other files than a vlmtune run's (they are kept; see
    vlmtune/outputs.py); a folder that is or contains the base model or the data is refused regardless.
    trust_checkpoint: resume from a checkpoint without checking it against its manifest, and let DeepSpeed unpickle
    any object in it (checkpoints written by another tool; see docs/RELIABILITY.md).
    """
    started = time.perf_counter()
    out = Path(config.output_dir)
    if config.data.train_path is None:
        raise ConfigError(["data.train_path is not set: give the training JSONL file (see docs/DATA.md)"])
    checkpoint = resolve_resume(out, resume, trust=trust_checkpoint)
    if checkpoint is None and find_checkpoints(out):
        raise VlmtuneError(
            f"{out} already holds checkpoints of an earlier run ({find_checkpoints(out)[-1].name}). "
            "Continue it with --resume (resume=True), or set output_dir to a new folder."
        )
    claim_folder(
        out, kind="run", what="the run", overwrite=overwrite, option="output_dir", flag="--overwrite",
        inputs={"the base model": config.model.name_or_path, "the training data": config.data.train_path,
                "the validation data": config.data.val_path},
        signs=(LOG_FILE, "final/vlmtune.json", "checkpoint-*/trainer_state.json"),
    )
    fresh = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    if os.environ.get("RANK", "0") == "0":  # one writer under torchrun
        record_output(out, kind="run")
        save_config(config, config_path)
    with _discarded_unless_started(out, fresh):
        return _train(config, out, config_path, checkpoint, callbacks, trust_checkpoint, started)


SETUP_FILES = frozenset({"config.yaml", ".vlmtune-output", LOG_FILE, "deepspeed_config.json", "memory_estimate.png"})
"""What a run writes before its first step: a run that fails before then leaves nothing behind in a folder it made."""


@contextlib.contextmanager
def _discarded_unless_started(out: Path, fresh: bool) -> Iterator[None]:
    """A run that stops before training starts (a data error, a model that will not load, a refused preflight) in a
    folder it created removes that folder again, so a fixed rerun starts clean and nothing stale is left around."""
    try:
        yield
    except BaseException:
        if fresh and os.environ.get("RANK", "0") == "0" and out.is_dir():
            present = {p.name for p in out.iterdir()}
            if present <= SETUP_FILES and not _started(out / LOG_FILE):
                shutil.rmtree(out, ignore_errors=True)
        raise


def _fp8_preflight(config: VlmtuneConfig, plan: Any, world: int) -> None:
    """speed.fp8=true that cannot run on this device stops before the weights load (apply_speed decides again)."""
    if config.speed.fp8 is True:
        from vlmtune.speed.fp8_policy import decide_fp8

        decide_fp8(config, plan, uses_deepspeed(config.distributed, world))


def _checkpointing_of(resolved: VlmtuneConfig, config: VlmtuneConfig) -> VlmtuneConfig:
    """`config` with the checkpointing the preflight chose (the rest as the user gave it, batch_size auto included)."""
    return config.model_copy(update={
        "hardware": config.hardware.model_copy(
            update={"gradient_checkpointing": resolved.hardware.gradient_checkpointing}),
        "speed": config.speed.model_copy(
            update={"checkpoint_every_n_layers": resolved.speed.checkpoint_every_n_layers}),
    })


def _checkpoint_layers(config: VlmtuneConfig, family: FamilyDescriptor) -> list[TrainerCallback]:
    """Every n-th decoder layer checkpointed by its index in the language model, as the estimate counts
    (train/checkpoint_layers.py; transformers would count the vision tower's blocks too)."""
    every = config.speed.checkpoint_every_n_layers
    if not config.hardware.gradient_checkpointing or every == "auto" or int(every) <= 1:
        return []
    from vlmtune.train.checkpoint_layers import CheckpointLayers

    return [CheckpointLayers(family.language_layers_prefix, int(every))]


def _started(log_path: Path) -> bool:
    """Whether the run logged its start (the model loaded and training was about to begin)."""
    try:  # the start event is among the first lines: stop reading there
        with log_path.open(encoding="utf-8") as lines:
            return any('"event": "start"' in line for line in lines)
    except OSError:
        return False


def _train(config: VlmtuneConfig, out: Path, config_path: Path, checkpoint: Any, callbacks: Any,
           trust_checkpoint: bool, started: float) -> TrainResult:
    """The run after its folder is claimed (see `train`)."""
    import torch
    from transformers import set_seed

    from vlmtune.memory.gpus import GIB
    from vlmtune.methods import get_method
    from vlmtune.methods.base import count_parameters, resolve_precision
    from vlmtune.speed import apply_speed, batching
    from vlmtune.speed.compile_policy import auto_compiles, optimizer_steps
    from vlmtune.train.args import training_arguments
    from vlmtune.train.callbacks import JsonlLogCallback, ProgressCallback, write_event
    from vlmtune.train.deepspeed_config import prepare as prepare_deepspeed
    from vlmtune.train.gpu_memory import allocator_setting, apply_allocator_setting, release_loading_cache
    from vlmtune.train.interrupt import SaveOnInterrupt, TrainingInterrupted
    from vlmtune.train.nonfinite import NonFiniteGuard
    from vlmtune.train.out_of_memory import oom_message
    from vlmtune.train.preflight import preflight
    from vlmtune.train.trainer import VlmTrainer
    from vlmtune.train.vision_keepalive import VisionKeepAlive

    family = resolve_family(config)
    plan = resolve_precision(config)
    log.info("family %s, method %s; precision: %s", family.name, config.method.name.value, plan.note)
    allocator = allocator_setting(config, plan.device)
    apply_allocator_setting(allocator)  # before anything allocates on the GPU (the preflight's memory_fraction too)
    if plan.device == "cuda" and os.environ.get("RANK", "0") == "0":
        log.info("CUDA allocator: %s", allocator.reason)
    from vlmtune.hub import model_folder

    processor = family.load_processor(model_folder(config.model.name_or_path, config.model.revision), config.data)
    passes = _check_data(config, processor, family) if config.data.check_before_training else {}
    train_path = Path(config.data.train_path)
    train_set = build_dataset(train_path, processor, family, config, passes.get(train_path))
    val_path = Path(config.data.val_path) if config.data.val_path else None
    val_set = build_dataset(val_path, processor, family, config, passes.get(val_path)) if val_path else None
    del passes  # anything the datasets did not take is let go before the model loads
    world = world_size(config.distributed)
    deepspeed = uses_deepspeed(config.distributed, world)

    def compiles(run: VlmtuneConfig) -> bool:
        """Whether speed.compile=auto compiles `run`, memory aside: the preflight then estimates compiled layers.
        Not with packing: the packed rows, and so the steps, are counted later; eager is the larger estimate."""
        steps = optimizer_steps(run, len(train_set), world)
        return not run.speed.packing and auto_compiles(run, plan.device, family, world, steps, deepspeed)

    # Before any weights load: prints the estimate, resolves batch_size auto, refuses what cannot fit (--force).
    memory = preflight(config, plan, train_set, out / LOG_FILE, compiles=compiles)
    if config.speed.checkpoint_every_n_layers == "auto" and os.environ.get("RANK", "0") == "0":
        save_config(_checkpointing_of(memory.config, config), config_path)  # the run folder records the chosen n
    config = memory.config

    _fp8_preflight(config, plan, world)
    ds_config = prepare_deepspeed(config, plan, out, world, writer=os.environ.get("RANK", "0") == "0")
    # Before the model: under ZeRO-3 the arguments register the DeepSpeed config that from_pretrained partitions by.
    args = training_arguments(config, plan, has_eval=val_set is not None, deepspeed=ds_config, world=world)
    set_seed(config.training.seed)  # adapter / random-weight initialisation is part of the run's seed
    debug = _debug_callbacks(os.environ)  # before the model loads: its allocations get traced too
    model = get_method(config.method.name).load_and_prepare(config, family)
    trainable, total = count_parameters(model)
    collator, train_data, val_data = batching(
        config, processor.tokenizer.pad_token_id, model, train_set, val_set, family
    )
    speed = apply_speed(
        model,
        config,
        family,
        steps=optimizer_steps(config, len(train_data), world),  # packed rows, where packing
        world=world,
        tight_memory=memory.little_room,
    )
    released = release_loading_cache() if plan.device == "cuda" and ds_config is None else None
    if os.environ.get("RANK", "0") == "0":
        write_event(
            out / LOG_FILE,
            "start",
            family=family.name,
            method=config.method.name.value,
            device=plan.device,
            precision=plan.note,
            trainable_params=trainable,
            total_params=total,
            train_samples=len(train_set),
            dropped_train=train_set.dropped_count,
            resumed_from=checkpoint,
            speed=speed.summary(),
            processes=world,
            deepspeed_zero_stage=zero_of(ds_config)[0] if ds_config else None,
            loading_cache_released_gib=None if released is None else round(released / GIB, 3),
            expandable_segments=allocator.expandable if plan.device == "cuda" else None,
            allocator=allocator.reason,
        )
    progress = ProgressCallback()
    interrupt = SaveOnInterrupt()  # Ctrl-C: finish the step, save a checkpoint, stop (one process; interrupt.py)
    try:  # the speed switches come off however the run ends (some are process-wide, e.g. SDPA's backends)
        trainer = VlmTrainer(
            model=model,
            args=args,
            train_dataset=train_data,
            eval_dataset=val_data,
            data_collator=collator,
            processing_class=processor,
            callbacks=[JsonlLogCallback(out / LOG_FILE), progress, *_deepspeed_callbacks(config, ds_config, world),
                       *debug, *_checkpoint_layers(config, family), *(callbacks or []),
                       NonFiniteGuard(config, out / LOG_FILE, ds_config is not None), interrupt],
            device=plan.device,
            loss_counts_items="chunked_loss" in speed.active,
            vision_keepalive=(  # with several processes a batch without images still runs the vision tower
                VisionKeepAlive(processor.image_processor, family.language_prefixes, family.image_features)
                if world > 1 else None
            ),
        )
        _drop_default_printers(trainer)
        if checkpoint is not None and hasattr(model, "peft_config"):  # every adapter tensor loads, DeepSpeed too
            from vlmtune.train.checkpoint_weights import check_adapter_keys

            check_adapter_keys(model, checkpoint)
        try:
            with _checkpoint_loads(checkpoint, trust_checkpoint), _on_interrupt(interrupt, world):
                output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except torch.OutOfMemoryError as exc:
            raise VlmtuneError(oom_message(memory, trainer.state.global_step, exc)) from exc
        finally:
            progress.close()
        if interrupt.requested and trainer.state.global_step < trainer.state.max_steps:
            saved = find_checkpoints(out)
            write_event(out / LOG_FILE, "interrupted", step=trainer.state.global_step,
                        checkpoint=str(saved[-1]) if saved else None)
            raise TrainingInterrupted(trainer.state.global_step, saved[-1] if saved else None)
        final_dir = save_final(trainer, processor, config, family)
    finally:
        speed.remove()
    if os.environ.get("RANK", "0") == "0":
        from vlmtune.train.plot import render_loss_curve

        curve = render_loss_curve(out / LOG_FILE, out / "loss_curve.png", title=f"{config.experiment_name}: loss")
        if curve:
            log.info("loss curve: %s", curve)
    losses = _loss_history(trainer.state.log_history)
    evals = [float(e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e]
    return TrainResult(
        output_dir=out,
        final_dir=final_dir,
        config_path=config_path,
        log_path=out / LOG_FILE,
        checkpoints=find_checkpoints(out),
        method=config.method.name.value,
        family=family.name,
        steps=int(output.global_step),
        seconds=round(time.perf_counter() - started, 2),
        train_loss_first=losses[0] if losses else None,
        train_loss_last=losses[-1] if losses else None,
        eval_loss_last=evals[-1] if evals else None,
        dropped_train=train_set.dropped_count,
        dropped_val=val_set.dropped_count if val_set is not None else 0,
        resumed_from=checkpoint,
        trainable_params=trainable,
        total_params=total,
    )


def _on_interrupt(interrupt: Any, world: int) -> Any:
    import contextlib

    return interrupt if world == 1 else contextlib.nullcontext()


def _checkpoint_loads(checkpoint: Path | None, trusted: bool) -> Any:
    """A resume unpickles nothing but tensors and DeepSpeed's few state types (train/safe_load.py)."""
    import contextlib

    if checkpoint is None or trusted:
        return contextlib.nullcontext()
    from vlmtune.train.safe_load import weights_only_loads

    return weights_only_loads()


def _deepspeed_callbacks(config: VlmtuneConfig, ds_config: dict[str, Any] | None, world: int) -> list[TrainerCallback]:
    """Fixes for DeepSpeed itself: partial optimizer offload keeps its GPU optimizer on the schedule."""
    from vlmtune.config.distributed import zero_plan

    if ds_config is None or zero_plan(config, world).offload_ratio >= 1:
        return []
    from vlmtune.train.partial_offload import PartialOffloadSchedule

    return [PartialOffloadSchedule()]


def _debug_callbacks(env: Mapping[str, str]) -> list[TrainerCallback]:
    """Developer diagnostics that environment variables switch on (VLMTUNE_MEMORY_SNAPSHOT: memory_snapshot.py)."""
    if not env.get("VLMTUNE_MEMORY_SNAPSHOT"):
        return []
    from vlmtune.train.memory_snapshot import from_env

    return [from_env(env)]


def _drop_default_printers(trainer: Any) -> None:
    """Our ProgressCallback prints readable lines; the Trainer's own printers would dump every log dict again."""
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgress

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(HFProgress)
