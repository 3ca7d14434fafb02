"""The memory preflight's decisions against a fake GPU: auto micro-batch, refusal with advice, --force, the memory
cap, the CPU path, and the out-of-memory message. No GPU needed: the functions that read CUDA are replaced."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fakes import FakeDataset
from PIL import Image

import vlmtune.train.fit_advice as fit_advice
import vlmtune.train.out_of_memory as oom
import vlmtune.train.preflight as pf
from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import VlmtuneError
from vlmtune.memory import estimate
from vlmtune.memory.gpus import GIB
from vlmtune.methods.base import PrecisionPlan
from vlmtune.train.batch_sizing import AUTO_MARGIN, Sizer, measured_profile
from vlmtune.train.gpu_memory import GpuMemory

CUDA = PrecisionPlan("cuda", torch.bfloat16, True, False, "test: bf16")
CPU = PrecisionPlan("cpu", torch.float32, False, False, "test: fp32")
TEXT_TOKENS = 1000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> FakeDataset:
    """16 samples of one 448x448 image (256 Qwen2-VL image tokens) and TEXT_TOKENS text tokens."""
    path = tmp_path_factory.mktemp("preflight") / "image.png"
    Image.new("RGB", (448, 448), (10, 20, 30)).save(path)
    records = [SimpleNamespace(images=[path]) for _ in range(16)]
    return FakeDataset(records, [TEXT_TOKENS + 256] * 16, [TEXT_TOKENS - 20] * 16)


def make_config(tmp_path: Path, **changes: dict) -> VlmtuneConfig:
    sections = {
        "model": {"name_or_path": "Qwen/Qwen2-VL-2B-Instruct"},
        "data": {"train_path": str(tmp_path / "train.jsonl"), "image_size": 448, "max_length": 2048},
        "training": {"batch_size": "auto", "gradient_accumulation_steps": 2},
        "hardware": {},
    }
    for key, value in changes.items():
        sections[key] = {**sections.get(key, {}), **value}
    return VlmtuneConfig.model_validate({"output_dir": str(tmp_path / "run"), **sections})


@pytest.fixture
def gpu(monkeypatch):
    """Set the fake GPU's free/total GiB; records the memory fractions applied. Each CUDA reader is replaced in the
    module that calls it (preflight reads the GPU, out_of_memory the measured peaks)."""
    applied: list[float] = []
    state = {"gpu": GpuMemory("Fake GPU", 80 * GIB, 79 * GIB, True)}
    monkeypatch.setattr(pf, "read_gpu_memory", lambda index: state["gpu"])
    monkeypatch.setattr(pf, "apply_memory_fraction", lambda fraction, index: applied.append(fraction))
    monkeypatch.setattr(oom, "measured_peaks", lambda: (int(7.5 * GIB), int(7.9 * GIB)))
    monkeypatch.setattr(pf, "available_host_ram", lambda: 1024 * GIB)  # the fake machine's CPU RAM: plenty

    def set_gpu(free_gib: float, total_gib: float = 80.0) -> list[float]:
        state["gpu"] = GpuMemory("Fake GPU", int(total_gib * GIB), int(free_gib * GIB), True)
        return applied

    return set_gpu


def _estimate(config: VlmtuneConfig, dataset: FakeDataset, batch: int):
    from vlmtune.memory.catalogue import lookup_model

    profile = measured_profile(dataset, lookup_model(config.model.name_or_path), config)
    sizer = Sizer(config, lookup_model(config.model.name_or_path), profile, dataset.labelled)
    return estimate(sizer.inputs(batch))


def reserved(config: VlmtuneConfig, dataset: FakeDataset, batch: int) -> int:
    return _estimate(config, dataset, batch).peak_reserved


def cpu_ram(config: VlmtuneConfig, dataset: FakeDataset, batch: int) -> int:
    return _estimate(config, dataset, batch).cpu_ram


def test_profile_reproduces_the_measured_lengths(tmp_path, dataset):
    from vlmtune.memory.catalogue import lookup_model

    config = make_config(tmp_path)
    spec = lookup_model(config.model.name_or_path)
    profile = measured_profile(dataset, spec, config)
    shape = profile.batch(spec, 4, config.data.max_length, image_size=448)
    assert shape.seq_len == TEXT_TOKENS + 256
    assert shape.vit_patches == 4 * 1024  # 448 px = 32 x 32 patches of 14 px per image
    assert shape.image_tokens == 258  # 256 image pads + vision start and end


def test_auto_picks_the_largest_micro_batch_that_fits(tmp_path, dataset, gpu):
    gpu(free_gib=9)
    config = make_config(tmp_path)
    result = pf.preflight(config, CUDA, dataset)
    batch = result.config.training.batch_size
    limit = 9 * GIB * (1 - AUTO_MARGIN)
    assert isinstance(batch, int) and batch > 1
    assert reserved(config, dataset, batch) <= limit < reserved(config, dataset, 2 * batch)
    assert result.breakdown is not None and result.breakdown.inputs.batch_size == batch
    assert result.breakdown.seq_len == TEXT_TOKENS + 256  # the data's longest sample, not data.max_length
    assert result.config.training.gradient_accumulation_steps == 2  # accumulation stays as configured


def test_auto_is_capped_by_the_data_set_size(tmp_path, dataset, gpu):
    gpu(free_gib=1000, total_gib=1000)
    result = pf.preflight(make_config(tmp_path), CUDA, dataset)
    assert result.config.training.batch_size == 16


def test_a_run_that_does_not_fit_is_refused_with_breakdown_and_advice(tmp_path, dataset, gpu, capsys):
    gpu(free_gib=6.5)
    config = make_config(tmp_path, training={"batch_size": 8})
    with pytest.raises(VlmtuneError) as info:
        pf.preflight(config, CUDA, dataset, tmp_path / "log.jsonl")
    message = str(info.value)
    assert "does not fit" in message and "Fake GPU: 6.50 of 80.00 GiB free" in message
    assert "PEAK (nvidia-smi)" in message and "logits and loss" in message  # the breakdown table
    # settings that fit (QLoRA before the fused LoRA layers kept less with dropout; now a smaller micro-batch)
    assert "as overrides:" in message and "training.batch_size=4" in message
    assert (tmp_path / "memory_estimate.png").is_file()  # the picture of what does not fit, beside the log
    assert "--force" in message
    assert "memory estimate" in capsys.readouterr().out  # printed before the refusal
    event = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert event["event"] == "memory_preflight" and event["fits"] is False and event["forced"] is False


@pytest.mark.parametrize("deepspeed", [False, True])
def test_the_advice_fits_the_gpu(tmp_path, dataset, gpu, monkeypatch, deepspeed):
    """Applying the advised overrides gives a run the preflight accepts (ZeRO offload only with DeepSpeed)."""
    monkeypatch.setattr(fit_advice, "deepspeed_available", lambda: deepspeed)
    gpu(free_gib=6.5)
    config = make_config(tmp_path, training={"batch_size": 8})
    with pytest.raises(VlmtuneError) as info:
        pf.preflight(config, CUDA, dataset)
    line = next(x for x in str(info.value).splitlines() if "as overrides:" in x)
    from vlmtune.config.loader import config_to_dict, load_config

    fixed = load_config(None, line.split("as overrides:")[1].split(), base=config_to_dict(config))
    if not deepspeed:
        assert "distributed." not in line  # no DeepSpeed advice where DeepSpeed is not installed
    result = pf.preflight(fixed, CUDA, dataset)
    assert result.fits and result.breakdown.peak_reserved <= 6.5 * GIB * (1 - AUTO_MARGIN)


def test_force_starts_a_run_that_does_not_fit(tmp_path, dataset, gpu, caplog):
    gpu(free_gib=6.5)
    config = make_config(tmp_path, training={"batch_size": 8}, hardware={"force_fit": True})
    result = pf.preflight(config, CUDA, dataset, tmp_path / "log.jsonl")
    assert result.fits is False and result.config.training.batch_size == 8
    assert "starting anyway" in caplog.text
    assert json.loads((tmp_path / "log.jsonl").read_text())["forced"] is True
    from PIL import Image

    from vlmtune.memory.picture import STATUS_COLOUR

    picture = Image.open(tmp_path / "memory_estimate.png").convert("RGB")
    assert STATUS_COLOUR["does not fit"] in {picture.getpixel((x, 100)) for x in range(picture.width)}  # its line


def test_memory_fraction_caps_what_is_available(tmp_path, dataset, gpu):
    applied = gpu(free_gib=79)
    config = make_config(tmp_path, training={"batch_size": 4}, hardware={"memory_fraction": 0.07})
    with pytest.raises(VlmtuneError, match="capped at 5.60 GiB by hardware.memory_fraction"):
        pf.preflight(config, CUDA, dataset)
    assert applied == [0.07]
    auto = pf.preflight(make_config(tmp_path, hardware={"memory_fraction": 0.25}), CUDA, dataset)
    assert auto.gpu.available == int(0.25 * 80 * GIB)
    assert auto.breakdown.peak_reserved <= auto.gpu.available * (1 - AUTO_MARGIN)


def test_on_the_cpu_auto_is_one_and_nothing_is_estimated(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(pf, "read_gpu_memory", lambda index: pytest.fail("no GPU on this path"))
    result = pf.preflight(make_config(tmp_path), CPU, dataset)
    assert result.config.training.batch_size == 1 and result.breakdown is None


def test_auto_needs_a_model_the_estimator_knows(tmp_path, dataset, gpu):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "not_a_vlm_we_know"}))
    config = make_config(tmp_path, model={"name_or_path": str(tmp_path / "other")})
    with pytest.raises(VlmtuneError, match="training.batch_size=auto needs the memory estimate"):
        pf.preflight(config, CUDA, dataset)


def test_oom_message_shows_estimate_measured_peak_and_fitting_settings(tmp_path, dataset, gpu):
    gpu(free_gib=12)
    result = pf.preflight(make_config(tmp_path, training={"batch_size": 2}), CUDA, dataset)
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore allocator detail")
    message = oom.oom_message(result, 3, exc)
    assert message.startswith("out of GPU memory at step 3: CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert "more allocator detail" not in message
    assert f"estimate: {result.breakdown.peak_allocated / GIB:.2f} GiB allocated" in message
    assert "measured so far: 7.50 GiB allocated, 7.90 GiB reserved" in message
    assert "settings that fit with a 20% margin" in message and "as overrides:" in message
    assert "--resume" in message


def test_oom_message_without_an_estimate_gives_general_advice(gpu):
    message = oom.oom_message(None, 0, torch.OutOfMemoryError("CUDA out of memory."))
    assert "measured so far" in message and "gradient_checkpointing=true" in message


def test_overrides_name_only_what_changes(tmp_path):
    config = make_config(tmp_path, training={"batch_size": 4})
    from vlmtune.memory import EstimateInputs

    target = EstimateInputs(
        method="qlora", batch_size=2, gradient_accumulation_steps=4, gradient_checkpointing=True, zero_stage=2,
        offload="optimizer",
    )
    assert fit_advice.overrides(config, target) == [
        "method.name=qlora",
        "training.batch_size=2",
        "training.gradient_accumulation_steps=4",
        "distributed.engine=deepspeed",
        "distributed.zero_stage=2",
        "distributed.offload=optimizer",
    ]


@pytest.mark.slow
def test_engine_resolves_auto_before_loading_and_reports_oom(run_config, monkeypatch):
    """The hook in the engine: auto -> 1 on the CPU, and an OOM in training becomes the preflight's message."""
    from vlmtune.train.engine import LOG_FILE, train
    from vlmtune.train.trainer import VlmTrainer

    def out_of_memory(self, *args, **kwargs):
        assert self.args.per_device_train_batch_size == 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.")

    monkeypatch.setattr(VlmTrainer, "train", out_of_memory)
    monkeypatch.setattr(oom, "measured_peaks", lambda: (GIB, 2 * GIB))
    config = run_config(training={"batch_size": "auto"})
    with pytest.raises(VlmtuneError) as info:
        train(config)
    assert str(info.value).startswith("out of GPU memory at step 0: CUDA out of memory. Tried to allocate 9.00 GiB.")
    assert "measured so far: 1.00 GiB allocated, 2.00 GiB reserved" in str(info.value)
    events = [json.loads(x) for x in (config.output_dir / LOG_FILE).read_text().splitlines()]
    assert [e["event"] for e in events] == ["start"]  # no estimate on the CPU


def test_a_slow_zero_setting_that_need_not_be_gets_a_faster_one(tmp_path, dataset, gpu, caplog):
    # ZeRO-3 + offload for a 2B LoRA on an 80 GB card: plain training fits and measured ~4x faster at this size
    gpu(free_gib=79)
    slow = make_config(tmp_path, training={"batch_size": 4},
                       distributed={"engine": "deepspeed", "zero_stage": 3, "offload": "optimizer"})
    pf.preflight(slow, CUDA, dataset)
    assert "this run uses ZeRO-3 with offload optimizer, but --no-deepspeed also fits" in caplog.text
    caplog.clear()
    pf.preflight(make_config(tmp_path, training={"batch_size": 4}), CUDA, dataset)  # no DeepSpeed: nothing to say
    gpu(free_gib=7)  # ... and when only the slow setting fits, nothing either
    tight = make_config(tmp_path, training={"batch_size": 1}, method={"name": "full"},
                        distributed={"engine": "deepspeed", "zero_stage": 3, "offload": "optimizer_and_params"})
    pf.preflight(tight, CUDA, dataset)
    assert "also fits" not in caplog.text


def test_no_faster_zero_setting_the_machine_cannot_hold(tmp_path, dataset, gpu, host_ram, caplog):
    # 2B full fine-tuning with everything offloaded on a 12 GiB card: without DeepSpeed (19 GiB) it does not fit,
    # ZeRO-2 + optimizer offload does and is faster, but it needs the CPU RAM of every optimizer state
    gpu(free_gib=12)
    config = make_config(tmp_path, training={"batch_size": 1}, method={"name": "full"},
                         distributed={"engine": "deepspeed", "zero_stage": 3, "offload": "optimizer_and_params"},
                         hardware={"force_fit": True})
    host_ram(4000)
    pf.preflight(config, CUDA, dataset)
    assert "but --zero-stage 2 --offload optimizer also fits this GPU" in caplog.text
    caplog.clear()
    host_ram(20)  # forced past the host check; the offloading alternatives need more than this
    pf.preflight(config, CUDA, dataset)
    assert "starting anyway (hardware.force_fit)" in caplog.text and "also fits" not in caplog.text


@pytest.fixture
def host_ram(monkeypatch):
    """Set the fake machine's available CPU RAM (GiB) that preflight reads."""

    def set_ram(gib: float | None) -> None:
        monkeypatch.setattr(pf, "available_host_ram", lambda: None if gib is None else int(gib * GIB))

    return set_ram


def _full_offload(tmp_path: Path) -> VlmtuneConfig:
    return make_config(tmp_path, training={"batch_size": 1}, method={"name": "full"},
                       distributed={"engine": "deepspeed", "zero_stage": 3, "offload": "optimizer"})


def test_an_offload_the_machine_cannot_hold_is_refused_naming_the_field(tmp_path, dataset, gpu, host_ram):
    gpu(free_gib=79)
    config = _full_offload(tmp_path)
    from vlmtune.train.host_memory import PROCESS_RAM

    need = cpu_ram(config, dataset, 1) + PROCESS_RAM  # the offloaded states and the training process itself
    assert need > 10 * GIB  # 2B full fine-tuning: fp32 master and moments of 1.6 B trained parameters
    host_ram(need / GIB * 0.8)
    with pytest.raises(VlmtuneError) as err:
        pf.preflight(config, CUDA, dataset)
    text = str(err.value)
    assert "distributed.offload=optimizer" in text and f"{need / GIB:.1f} GiB" in text and "--force" in text
    host_ram(need / GIB * 1.05)  # fits, with less than the process's own few GiB to spare
    pf.preflight(config, CUDA, dataset)
    host_ram(need / GIB * 2)
    pf.preflight(config, CUDA, dataset)


def test_tight_or_forced_offload_is_a_warning(tmp_path, dataset, gpu, host_ram, caplog):
    gpu(free_gib=79)
    config = _full_offload(tmp_path)
    host_ram(1)
    forced = config.model_copy(update={"hardware": config.hardware.model_copy(update={"force_fit": True})})
    pf.preflight(forced, CUDA, dataset)
    assert "starting anyway (hardware.force_fit)" in caplog.text
    caplog.clear()
    host_ram(None)  # not Linux: nothing to check against
    pf.preflight(config, CUDA, dataset)
    assert "CPU RAM" not in caplog.text


def test_no_offload_needs_no_ram_check(tmp_path, dataset, gpu, host_ram):
    gpu(free_gib=79)
    host_ram(0.001)
    pf.preflight(make_config(tmp_path, training={"batch_size": 1}), CUDA, dataset)


def test_meminfo_and_the_node_share(tmp_path, monkeypatch):
    from vlmtune.train.host_memory import available_host_ram, node_share

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131981020 kB\nMemFree:  1000 kB\nMemAvailable:   120000000 kB\n")
    assert available_host_ram(meminfo) == 120000000 * 1024
    assert available_host_ram(tmp_path / "missing") is None
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert node_share(80 * GIB, 8) == 80 * GIB  # one node holds all 8 GPUs' share
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert node_share(80 * GIB, 8) == 40 * GIB  # two nodes of 4


def test_packing_sizes_the_packed_rows(tmp_path, dataset):
    """With speed.packing, batch_size counts packed rows: the estimate sizes the rows the engine's own first-fit
    packing makes of the data (3 samples of 1,256 tokens in a 4,096-token row), not batch_size samples."""
    from vlmtune.data.packing import pack_bins
    from vlmtune.memory.catalogue import lookup_model

    plain = make_config(tmp_path, data={"max_length": 4096})
    packed = make_config(tmp_path, data={"max_length": 4096}, speed={"packing": True})
    spec = lookup_model(packed.model.name_or_path)
    sizer = Sizer(packed, spec, measured_profile(dataset, spec, packed), dataset.labelled)
    assert sizer.rows == len(pack_bins(dataset.lengths, 4096)) == 6  # five rows of 3 samples, one of 1
    inputs = sizer.inputs(2)
    assert inputs.seq_len == 3 * (TEXT_TOKENS + 256)
    assert inputs.vit_patches_per_batch == 2 * 3 * 1024  # two rows of three 448 px images
    assert inputs.images_per_sample == 3 and inputs.image_tokens_per_sample == 3 * 258
    assert inputs.labelled_tokens == 2 * 3 * (TEXT_TOKENS - 20)
    assert reserved(packed, dataset, 1) > reserved(plain, dataset, 2)  # a row of 3 samples outweighs 2 samples
    # a smaller row budget packs fewer samples per row
    tight = make_config(tmp_path, data={"max_length": 4096}, speed={"packing": True, "packing_max_tokens": 2600})
    small = Sizer(tight, spec, measured_profile(dataset, spec, tight), dataset.labelled)
    assert small.rows == 8 and small.inputs(1).seq_len == 2 * (TEXT_TOKENS + 256)


def test_auto_batch_with_packing_counts_rows(tmp_path, dataset, gpu):
    gpu(free_gib=79)
    config = make_config(tmp_path, data={"max_length": 4096}, speed={"packing": True})
    result = pf.preflight(config, CUDA, dataset)
    assert result.config.training.batch_size == 4  # the largest of 1, 2, 4, 8 not above the data's 6 rows
    assert result.breakdown.inputs.seq_len == 3 * (TEXT_TOKENS + 256)


def test_dry_run_sizes_packed_rows(tmp_path, capsys):
    """`vlmtune train --dry-run` with speed.packing sizes the packed rows of the data file, as the preflight does."""
    from vlmtune.cli.main import main
    from vlmtune.train.dry_run import dry_run_estimate

    Image.new("RGB", (448, 448), (10, 20, 30)).save(tmp_path / "img.png")
    line = json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "image": "img.png"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A picture. " * 40}]})
    (tmp_path / "train.jsonl").write_text((line + "\n") * 12)
    sections = dict(data={"max_length": 2048}, training={"batch_size": 2})
    plain = make_config(tmp_path, **sections)
    packed = make_config(tmp_path, **sections, speed={"packing": True})
    one = dry_run_estimate(plain, "H100 80GB").inputs
    rows = dry_run_estimate(packed, "H100 80GB").inputs
    per_row = 2048 // one.seq_len
    assert per_row >= 3
    assert rows.seq_len == per_row * one.seq_len and rows.images_per_sample == per_row
    assert rows.vit_patches_per_batch == per_row * one.vit_patches_per_batch
    (tmp_path / "run.yaml").write_text(json.dumps(packed.model_dump(mode="json", exclude_none=True)))
    assert main(["train", str(tmp_path / "run.yaml"), "--dry-run", "--gpu", "H100 80GB"]) == 0
    assert f"12 samples packed in {-(-12 // per_row)} rows, longest row {rows.seq_len} tokens" in capsys.readouterr().out


def _compiled(config: VlmtuneConfig) -> VlmtuneConfig:
    """`config` estimated as speed.compile=true estimates it: every decoder layer but the first compiled."""
    return config.model_copy(update={"speed": config.speed.model_copy(update={"compile": True})})


def test_a_run_auto_compiles_is_estimated_compiled(tmp_path, dataset, gpu, capsys):
    """speed.compile=auto that will compile the run (2026-12-07 session 17: the eager estimate of such a run was
    +11.1% over its nvidia-smi peak): batch sizing, checkpointing auto, the breakdown shown, logged and checked all
    count compiled layers; the config trained with keeps auto."""
    gpu(free_gib=79)
    config = make_config(tmp_path, training={"batch_size": 4})
    asked: list[VlmtuneConfig] = []
    result = pf.preflight(config, CUDA, dataset, tmp_path / "log.jsonl", compiles=lambda c: asked.append(c) or True)
    assert asked and asked[0].speed.compile == "auto"
    assert result.config.speed.compile == "auto"
    compiled = _estimate(_compiled(result.config), dataset, 4)
    eager = _estimate(result.config, dataset, 4)
    assert result.breakdown.inputs.compiled
    assert result.breakdown.peak_allocated == compiled.peak_allocated
    # compiled layers run PEFT's LoRA (speed.compile turns the fused layers off), whose dropout copies and masks keep
    # more than the fused eager layers' inputs (memory/activations.py fused_lora_bytes; less before ad4f8d3)
    assert result.breakdown.peak_reserved == compiled.peak_reserved > eager.peak_reserved
    event = json.loads((tmp_path / "log.jsonl").read_text())
    assert event["inputs"]["compiled"] is True
    assert event["estimate_reserved_gib"] == round(compiled.peak_reserved / GIB, 3)
    assert capsys.readouterr().out.count("memory estimate (before loading the model)") == 1
    # without the engine's answer (other callers): the eager estimate, as before
    assert not pf.preflight(config, CUDA, dataset).breakdown.inputs.compiled


def test_a_compiled_estimate_with_little_room_is_redone_eager(tmp_path, dataset, gpu, capsys):
    """Within AUTO_MARGIN of the GPU, auto stays eager (decide_compile's tight_memory): so does the estimate that is
    shown, logged and checked, once. Here the eager run does not fit: forced, it is reported as not fitting."""
    config = make_config(tmp_path, training={"batch_size": 4}, hardware={"gradient_checkpointing": False,
                                                                        "force_fit": True},
                         # compiled then saves 2i more per token and layer; PEFT's LoRA eager as compiled (the fused
                         # layers keep less than compiled ones with dropout: fused_lora_bytes)
                         speed={"mlp_activation_recompute": False, "fused_lora": False})
    compiled = _estimate(_compiled(config), dataset, 4).peak_reserved
    eager = _estimate(config, dataset, 4).peak_reserved
    free = compiled / (1 - AUTO_MARGIN / 2)  # the compiled estimate fits, with less than AUTO_MARGIN to spare
    assert free * (1 - AUTO_MARGIN) < compiled <= free < eager
    gpu(free_gib=free / GIB)
    result = pf.preflight(config, CUDA, dataset, tmp_path / "log.jsonl", compiles=lambda c: True)
    assert not result.breakdown.inputs.compiled
    assert result.breakdown.peak_reserved == eager and not result.fits
    assert result.little_room is not None  # what apply_speed hands decide_compile: it stays eager
    events = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(events) == 1 and json.loads(events[0])["inputs"]["compiled"] is False
    assert capsys.readouterr().out.count("memory estimate (before loading the model)") == 1
    # the same GPU with room for the compiled estimate: compiled
    gpu(free_gib=compiled / (1 - 2 * AUTO_MARGIN) / GIB)
    assert pf.preflight(config, CUDA, dataset, compiles=lambda c: True).breakdown.inputs.compiled


def test_a_micro_batch_too_large_to_compile_is_estimated_eager(tmp_path, dataset, gpu):
    """batch_size auto: `compiles` is asked again for the micro-batch chosen (a larger one means fewer steps); where
    auto no longer compiles then, the run is sized again eager."""
    gpu(free_gib=79)
    config = make_config(tmp_path)
    result = pf.preflight(config, CUDA, dataset, compiles=lambda c: c.training.batch_size == "auto")
    batch = result.config.training.batch_size
    assert isinstance(batch, int) and not result.breakdown.inputs.compiled
    assert result.breakdown.peak_reserved == _estimate(result.config, dataset, batch).peak_reserved


@pytest.fixture
def cuda_compiler(monkeypatch):
    """A CUDA GPU of compute capability 9.0 with Triton and a C compiler, as far as the compile policy can tell."""
    from vlmtune.speed import compile_policy

    monkeypatch.setattr(compile_policy, "_c_compiler", lambda: "/usr/bin/cc")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    real = compile_policy.importlib.util.find_spec
    monkeypatch.setattr(compile_policy.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "triton" else real(name, *a))


def test_auto_compiles_is_decide_compile_without_memory(cuda_compiler):
    from vlmtune.families import get_family
    from vlmtune.speed.compile_policy import MIN_STEPS, auto_compiles

    def config(**speed) -> VlmtuneConfig:
        return VlmtuneConfig.model_validate({"speed": speed})

    qwen2 = get_family("qwen2_vl")
    assert auto_compiles(config(), "cuda", qwen2, steps=MIN_STEPS)
    assert not auto_compiles(config(compile=True), "cuda", qwen2, steps=MIN_STEPS)  # estimated compiled already
    assert not auto_compiles(config(compile=False), "cuda", qwen2, steps=MIN_STEPS)
    assert not auto_compiles(config(), "cpu", qwen2, steps=MIN_STEPS)
    assert not auto_compiles(config(), "cuda", qwen2, steps=MIN_STEPS - 1)
    assert not auto_compiles(config(), "cuda", qwen2, world=2, steps=MIN_STEPS)
    assert not auto_compiles(config(), "cuda", qwen2, steps=MIN_STEPS, deepspeed=True)
    refusing = SimpleNamespace(packed_span_modules=(), compile_refusal=lambda device: "layers on the reference")
    assert not auto_compiles(config(), "cuda", refusing, steps=MIN_STEPS)
    spans = SimpleNamespace(packed_span_modules=("linear_attn",), compile_refusal=lambda device: None)
    assert not auto_compiles(config(packing=True), "cuda", spans, steps=MIN_STEPS)
    assert auto_compiles(config(packing=False), "cuda", spans, steps=MIN_STEPS)


def test_engine_hands_the_preflight_auto_compiles(run_config, monkeypatch):
    """The engine asks auto_compiles with the run's device, family, processes and steps over the training set (the
    config's batch size: the resolved one once the preflight asks again), and never with packing."""
    from vlmtune.speed import compile_policy
    from vlmtune.train.engine import train

    asked: list[tuple] = []
    seen: dict = {}

    def auto_compiles(config, device, family, world, steps, deepspeed):
        asked.append((device, family.name, world, steps, deepspeed))
        return True

    def preflight(config, plan, dataset, log_path=None, compiles=lambda c: False):
        seen.update(config=config, samples=len(dataset), compiles=compiles)
        raise VlmtuneError("stopped after the preflight")

    monkeypatch.setattr(compile_policy, "auto_compiles", auto_compiles)
    monkeypatch.setattr(pf, "preflight", preflight)
    with pytest.raises(VlmtuneError, match="stopped after the preflight"):
        train(run_config(training={"max_steps": None, "epochs": 2, "batch_size": 2}))
    config, samples, compiles = seen["config"], seen["samples"], seen["compiles"]
    assert compiles(config) and asked == [("cpu", "qwen2_vl", 1, 2 * -(-samples // 2), False)]
    packed = config.model_copy(update={"speed": config.speed.model_copy(update={"packing": True})})
    assert not compiles(packed) and len(asked) == 1


def test_dry_run_says_what_compiled_layers_would_give_under_auto(tmp_path):
    """The dry run estimates speed.compile=auto eager (whether it compiles depends on the training machine) and says
    what the compiled estimate is, the one training's preflight uses where auto compiles; nothing under true/false."""
    from vlmtune.memory import estimate
    from vlmtune.train.dry_run import dry_run, report

    config = make_config(tmp_path, training={"batch_size": 4}, hardware={"gradient_checkpointing": False})
    result = dry_run(config, "H100 80GB")
    compiled = estimate(result.breakdown.inputs.with_(compiled=True))
    # more compiled: those layers run PEFT's LoRA, the fused eager ones keep less with dropout (fused_lora_bytes)
    assert not result.breakdown.inputs.compiled and compiled.peak_total > result.breakdown.peak_total
    assert f"{compiled.peak_total / GIB:.2f} GiB" in result.compiled and "speed.compile=auto" in result.compiled
    assert result.compiled in report(result)
    for setting in (True, False):
        fixed = make_config(tmp_path, training={"batch_size": 4}, hardware={"gradient_checkpointing": False},
                            speed={"compile": setting})
        assert dry_run(fixed, "H100 80GB").compiled is None
