"""Two-process DeepSpeed runs on the CPU (gloo), through both launch forms: `vlmtune train --num-gpus 2` and
`torchrun -m`-style workers. ZeRO-2 and ZeRO-3 with LoRA, full and QLoRA finish with falling loss; ZeRO-3 on a data
set that mixes image and text-only records does not hang (every run has a timeout); the adapter or model a ZeRO-3
run saves reloads in a plain process with the outputs the training processes had; a resumed run continues from the
ZeRO checkpoint at the right step with the same losses.

DeepSpeed compiles a small op on its first start (~40 s), cached in build/torch_extensions for later runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlmtune.config.schema import DataConfig
from vlmtune.data.collate import Collator
from vlmtune.data.processing import encode
from vlmtune.data.records import read_records
from vlmtune.data.synthetic import text_only_every_second
from vlmtune.export.predict import load_for_inference
from vlmtune.families import all_families, get_family
from vlmtune.families.capabilities import Unsupported

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ds_worker.py")
STEPS = 6


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    env.pop("WORLD_SIZE", None)
    return env


def run(args: list[str], timeout: float) -> str:
    """Run a command in its own process group; on timeout the whole group (launcher and workers) is killed."""
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"no result after {timeout:.0f} s (hung?):\n{output[-4000:]}")
    if proc.returncode != 0 and TEARDOWN_ABORT in output and "Traceback" not in output.split(TEARDOWN_ABORT)[0]:
        # Seen once in five CI runs (session 5): a worker aborts in C++ teardown after training finished and wrote
        # its results. The callers' checks of the run's log, checkpoints and logits still decide the test.
        warnings.warn(
            f"a worker aborted at exit after finishing ({TEARDOWN_ABORT!r}); its results are checked", stacklevel=2
        )
        return output
    assert proc.returncode == 0, output[-6000:]
    return output


TEARDOWN_ABORT = "terminate called without an active exception"


@pytest.fixture(scope="module")
def mixed_data(shapes_data) -> Path:
    """The shapes records with every second one text-only (no image, a text answer)."""
    train = shapes_data[0]
    return text_only_every_second(train, train.with_name("mixed.jsonl"))  # beside train.jsonl: images stay valid


def write_config(folder: Path, model: Path, data: Path, method: str, stage: int = 2, **training: object) -> Path:
    config = {
        "output_dir": str(folder / "run"),
        "model": {"name_or_path": str(model)},
        "data": {"train_path": str(data)},
        "method": {"name": method},
        "training": {"max_steps": STEPS, "batch_size": 1, "learning_rate": 5e-3, "logging_steps": 1,
                     "save_steps": 100, "report_to": ["none"], **training},
        "hardware": {"precision": "bf16", "use_cpu": True},
        "distributed": {"zero_stage": stage},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check_run(out: Path, stage: int, method: str) -> list[float]:
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    start = next(e for e in logs if e.get("event") == "start")
    assert start["processes"] == 2 and start["deepspeed_zero_stage"] == stage
    assert json.loads((out / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == stage
    losses = {e["step"]: e["loss"] for e in logs if "loss" in e}
    assert sorted(losses) == list(range(1, STEPS + 1))  # one writer: each step logged once
    assert losses[STEPS] < losses[1], losses
    weights = load_file(out / "final" / ("model.safetensors" if method == "full" else "adapter_model.safetensors"))
    assert weights and all(t.numel() > 0 for t in weights.values())  # gathered, not empty shards
    return [losses[s] for s in sorted(losses)]


def reload_logits(final: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    loaded = load_for_inference(final, device="cpu")
    loaded.model.eval()
    with torch.no_grad():
        return loaded.model(**batch).logits.float()


@pytest.fixture(scope="module")
def batch_file(tiny_model_dir, mixed_data, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Four records (two with an image, two without), encoded and collated, saved for the workers."""
    family = get_family("qwen2_vl")
    processor = family.load_processor(tiny_model_dir("qwen2_vl"))
    samples = [encode(r, processor, family, DataConfig()) for r in read_records(mixed_data)[:4]]
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    path = tmp_path_factory.mktemp("batch") / "batch.pt"
    torch.save(batch, path)
    return path, batch


def zero3_worker_run(folder: Path, model: Path, data: Path, method: str, batch: Path, *flags: str,
                     **training: object) -> Path:
    config = write_config(folder, model, data, method, stage=3, **training)
    logits = folder / "trained_logits.pt"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
         str(config), str(batch), str(logits), *flags], timeout=240)
    return folder


@pytest.fixture(scope="module")
def zero3_lora(tiny_model_dir, mixed_data, batch_file, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zero3-lora")
    zero3_worker_run(folder, tiny_model_dir("qwen2_vl"), mixed_data, "lora", batch_file[0], save_steps=3)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_zero2_through_vlmtune_train(method, tiny_model_dir, shapes_data, tmp_path):
    # CI runs the LoRA case (the same `--num-gpus 2 --zero-stage 2` launch); full fine-tuning under ZeRO-2 stays in
    # CI through test_killed_run_resumes_bit_for_bit[zero2-rename]. The full case (~20 s on CI) runs in the script.
    if method == "full" and not os.environ.get("VLMTUNE_ALL_FAMILIES"):
        pytest.skip("run by scripts/families.sh (VLMTUNE_ALL_FAMILIES=1): the LoRA case launches the same way")
    config = write_config(tmp_path, tiny_model_dir("qwen2_vl"), shapes_data[0], method, batch_size=2)
    output = run([sys.executable, "-m", "vlmtune.cli", "train", str(config), "--num-gpus", "2", "--zero-stage", "2"],
                 timeout=300)
    assert "launching 2 process(es)" in output and output.count("fine-tuning of a qwen2_vl model") == 1  # rank 0
    check_run(tmp_path / "run", stage=2, method=method)


@pytest.mark.slow
def test_zero3_lora_mixed_batches_and_the_adapter_reloads(zero3_lora, batch_file):
    out = zero3_lora / "run"
    check_run(out, stage=3, method="lora")
    trained = torch.load(zero3_lora / "trained_logits.pt")
    torch.testing.assert_close(reload_logits(out / "final", batch_file[1]), trained, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_zero3_resume_continues_at_the_right_step(zero3_lora, tmp_path):
    whole = zero3_lora / "run"
    split = tmp_path / "run"
    shutil.copytree(whole, split, ignore=shutil.ignore_patterns(f"checkpoint-{STEPS}", "final", "train_log.jsonl"))
    assert sorted(p.name for p in split.glob("checkpoint-*")) == ["checkpoint-3"]
    assert list((split / "checkpoint-3").glob("global_step*"))  # a ZeRO checkpoint (sharded optimizer states)
    run([sys.executable, "-m", "vlmtune.cli", "train", str(zero3_lora / "config.yaml"), f"output_dir={split}",
         "--num-gpus", "2", "--resume"], timeout=240)
    logs = [json.loads(line) for line in (split / "train_log.jsonl").read_text().splitlines()]
    start = next(e for e in logs if e.get("event") == "start")
    assert start["resumed_from"].endswith("checkpoint-3")
    resumed = {e["step"]: e["loss"] for e in logs if "loss" in e}
    original = {e["step"]: e["loss"] for e in map(json.loads, (whole / "train_log.jsonl").read_text().splitlines())
                if "loss" in e}
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(original[step], abs=1e-4), step


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "qlora"])
def test_zero3_full_and_qlora_mixed_batches_reload(method, tiny_model_dir, mixed_data, batch_file, tmp_path):
    pytest.importorskip("bitsandbytes") if method == "qlora" else None
    zero3_worker_run(tmp_path, tiny_model_dir("qwen2_vl"), mixed_data, method, batch_file[0])
    check_run(tmp_path / "run", stage=3, method=method)
    trained = torch.load(tmp_path / "trained_logits.pt")
    # QLoRA trained with its 4-bit weights stored as bf16 (so ZeRO-3 shards them) and reloads them as uint8.
    torch.testing.assert_close(reload_logits(tmp_path / "run" / "final", batch_file[1]), trained,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_zero3_lora_in_bf16_as_on_a_gpu(tiny_model_dir, mixed_data, batch_file, tmp_path):
    # On a GPU, DeepSpeed trains in bf16: ZeRO-3 builds the base model in bf16 but leaves the adapters, created
    # after it, in fp32 unless vlmtune casts them (the H100 run of 2026-11-24 failed there: bf16 != float).
    zero3_worker_run(tmp_path, tiny_model_dir("qwen2_vl"), mixed_data, "lora", batch_file[0], "--gpu-bf16")
    check_run(tmp_path / "run", stage=3, method="lora")
    assert json.loads((tmp_path / "run" / "deepspeed_config.json").read_text())["bf16"]["enabled"] == "auto"


@pytest.mark.slow
def test_zero3_chunked_loss_trains_an_untied_head_as_the_plain_loss(tiny_model_dir, shapes_data, tmp_path):
    # Qwen2.5-VL's lm_head is its own weight (not tied to the embeddings), and full fine-tuning trains it. Under
    # ZeRO-3 on two processes its gradient reached a released (0-element) weight when the chunked loss bypassed
    # lm_head's output hooks (the H200 x2 run of 2026-11-24: "size of tensor a (0) must match ... (3584)").
    model = tiny_model_dir("qwen2_5_vl")
    losses = {}
    for chunked in (True, False):
        folder = tmp_path / f"chunked-{chunked}"
        folder.mkdir()
        config = write_config(folder, model, shapes_data[0], "full", stage=3)
        run([sys.executable, "-m", "vlmtune.cli", "train", str(config), "--num-gpus", "2",
             f"speed.chunked_loss={str(chunked).lower()}"], timeout=300)
        losses[chunked] = check_run(folder / "run", stage=3, method="full")
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def _family_data(family_name: str, mixed_data: Path, shapes_train: Path) -> Path:
    """The mixed records (every second one text-only) where the family's prompt format holds them and its several
    processes take text-only batches, else the image records (InstructBLIP: exactly one image per record; Mllama:
    a text-only batch skips its cross-attention layers, see test_mllama_text_only_batch_stops_a_multi_process_run)."""
    family = get_family(family_name)
    mixed_ok = "zero3" not in family.capabilities and all(
        family.record_problem(r) is None for r in read_records(mixed_data))
    return mixed_data if mixed_ok else shapes_train


ZERO3_QUICK = {"gemma3", "instructblip", "smolvlm"}
"""The families CI runs ZeRO-3 on (per-token type ids, the Q-Former's own text inputs, tiles: each a different way
extra inputs meet sharded weights); every family with VLMTUNE_ALL_FAMILIES=1 (scripts/families.sh), ~1-3 min each."""


@pytest.mark.slow
@pytest.mark.parametrize("family_name", sorted(f.name for f in all_families() if f.name != "qwen2_vl"
                                                and not isinstance(f.capabilities.get("zero3"), Unsupported)))
def test_zero3_lora_every_family(family_name, tiny_model_dir, mixed_data, shapes_data, tmp_path):
    """ZeRO-3 LoRA on two processes for each family besides Qwen2-VL (covered above in more depth): finishes with
    falling loss, and the adapter it gathers reloads with the outputs the training processes had (the README
    support matrix's ZeRO-3 column)."""
    if family_name not in ZERO3_QUICK and not os.environ.get("VLMTUNE_ALL_FAMILIES"):
        pytest.skip("run by scripts/families.sh (VLMTUNE_ALL_FAMILIES=1)")
    family = get_family(family_name)
    model = tiny_model_dir(family_name)
    data = _family_data(family_name, mixed_data, shapes_data[0])
    processor = family.load_processor(model)
    samples = [encode(r, processor, family, DataConfig()) for r in read_records(data)[:4]]
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    torch.save(batch, tmp_path / "batch.pt")
    zero3_worker_run(tmp_path, model, data, "lora", tmp_path / "batch.pt")
    check_run(tmp_path / "run", stage=3, method="lora")
    trained = torch.load(tmp_path / "trained_logits.pt")
    torch.testing.assert_close(reload_logits(tmp_path / "run" / "final", batch), trained, atol=1e-5, rtol=1e-5)
