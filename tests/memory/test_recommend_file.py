"""`recommend` writes what it recommends: the file holds every setting (the distributed section included), and
`vlmtune train FILE --dry-run --gpu NAME` on it prints the estimate the recommendation printed (offline)."""

from __future__ import annotations

import re

import pytest
import yaml

from vlmtune.cli.main import main
from vlmtune.config.loader import load_config
from vlmtune.memory import estimate, get_gpu, inputs_from_config
from vlmtune.memory.advice import config_yaml
from vlmtune.memory.recommend import lean_qlora, recommend
from vlmtune.train.dry_run import dry_run_estimate

MODELS = ("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "llava-hf/llava-1.5-7b-hf",
          "llava-hf/llava-1.5-13b-hf")
CARDS = {  # card class -> (a catalogue card, the guide's preset for it)
    8: ("RTX 4060 8GB", "ultra_low_memory"),
    12: ("RTX 3060 12GB", "ultra_low_memory"),
    16: ("RTX 4060 Ti 16GB", "consumer_16gb"),
    24: ("RTX 4090 24GB", "consumer_24gb"),
    80: ("H100 80GB", "high_capacity"),
}
PEAK = re.compile(r"memory estimate: ([\d.]+) GiB at the peak as nvidia-smi shows it \(([\d.]+) GiB reserved by "
                  r"PyTorch, ([\d.]+) allocated, at ([a-z ]+)\)")


def _recommend(tmp_path, capsys, argv):
    out = tmp_path / "rec.yaml"
    assert main(["recommend", *argv, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    return out, printed


@pytest.mark.parametrize("card", sorted(CARDS))
@pytest.mark.parametrize("model", MODELS)
def test_recommend_file_dry_run_agree(tmp_path, capsys, model, card):
    gpu, preset = CARDS[card]
    path, printed = _recommend(tmp_path, capsys, ["--gpu", gpu, "--model", model, "--preset", preset])
    recommended = PEAK.search(printed).groups()
    assert main(["train", str(path), "--dry-run", "--gpu", gpu]) == 0  # fits: exit 0
    checked = capsys.readouterr().out
    assert PEAK.search(checked).groups() == recommended
    assert f"{gpu}:" in checked and ": fits" in checked
    # the whole breakdown agrees, not only the printed figures
    config = load_config(path)
    written = yaml.safe_load(path.read_text())
    assert written["distributed"]["num_gpus"] == 1
    assert dry_run_estimate(config, gpu).peak_total <= get_gpu(gpu).usable_bytes
    if card == 8 and "7b" in model.lower():  # 7B on 8 GB: QLoRA, not parameter offload
        assert written["method"]["name"] == "qlora" and written["distributed"]["offload"] == "none"


def test_breakdown_of_the_written_file_is_the_recommendation(tmp_path):
    config = load_config(overrides=["model.name_or_path=Qwen/Qwen2.5-VL-7B-Instruct", "data.max_length=512",
                                    "data.image_size=336"])
    rec = recommend(inputs_from_config(config), get_gpu("RTX 4060"), 1, 16)
    assert rec.best is not None and lean_qlora(rec.best.inputs)
    path = tmp_path / "r.yaml"
    path.write_text(config_yaml(rec, config, str(path)))
    loaded = load_config(path)
    assert loaded.method.quantization.lean and loaded.training.optimizer == "paged_adamw_8bit"
    assert loaded.speed.embeddings_on_cpu and loaded.speed.loss_chunk_tokens == rec.best.inputs.loss_chunk_tokens
    again = estimate(inputs_from_config(loaded, gpu=rec.best.inputs.gpu))
    assert again == rec.best.breakdown


@pytest.mark.parametrize(("gpus", "stage", "engine"), [(2, None, "none"), (8, 3, "deepspeed")])
def test_num_gpus_and_zero_are_written(tmp_path, capsys, gpus, stage, engine):
    argv = ["--gpu", "A100 80GB", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--num-gpus", str(gpus)]
    if stage:  # full fine-tuning of a 7B on 8 cards: DeepSpeed (ZeRO) shards its states
        argv += ["--method", "full"]
    path, printed = _recommend(tmp_path, capsys, argv)
    dist = yaml.safe_load(path.read_text())["distributed"]
    assert dist["num_gpus"] == gpus
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"starts the {gpus} processes" in line for line in header)
    assert not any("not config fields" in line for line in header)
    config = load_config(path)
    inputs = inputs_from_config(config)
    assert inputs.num_gpus == gpus
    if stage:
        assert dist["engine"] == "deepspeed" and inputs.zero_stage == dist["zero_stage"] >= 1
        assert config.training.learning_rate == 1e-5  # full: its method's default, not LoRA's
    else:
        assert dist["engine"] == engine and inputs.zero_stage == 0
    assert main(["train", str(path), "--dry-run", "--gpu", "A100 80GB"]) == 0
    assert PEAK.search(capsys.readouterr().out).groups() == PEAK.search(printed).groups()


def test_parameter_offload_only_when_nothing_else_fits():
    base = inputs_from_config(load_config(overrides=["model.name_or_path=Qwen/Qwen2.5-VL-7B-Instruct"]))
    # 4,096-token samples: even lean QLoRA misses the 8 GB card's margin, so ZeRO-3 parameter offload it is (3,072
    # fit it with the allocator's expandable segments, hardware.expandable_segments auto)
    rec = recommend(base.with_(seq_len=4096), get_gpu("RTX 4060"), 1, 16)
    assert rec.best.inputs.offload == "all"
    assert any(r.startswith("lean qlora (without parameter offload) does not fit") for r in rec.reasons)
    # 1,024 and 2,048 tokens: lean QLoRA fits and wins, though parameter offload would fit too
    for seq_len in (1024, 2048):
        rec = recommend(base.with_(seq_len=seq_len), get_gpu("RTX 4060"), 1, 16)
        assert lean_qlora(rec.best.inputs) and rec.best.inputs.zero_stage == 0


def test_offload_spellings_agree(capsys):
    from vlmtune.cli.main import parse_args
    from vlmtune.cli.train_cmd import resolve_config

    for spelling in ("all", "optimizer_and_params"):
        cfg = resolve_config(parse_args(["train", "--zero-stage", "3", "--offload", spelling]))
        assert cfg.distributed.offload == "optimizer_and_params"
        assert main(["estimate", "--zero-stage", "3", "--offload", spelling, "--json"]) == 0
        assert '"offload": "all"' in capsys.readouterr().out  # the estimator's inputs: parameters offloaded
    assert load_config(overrides=["distributed.zero_stage=3", "distributed.offload=all"]).distributed.offload == (
        "optimizer_and_params")


def test_dry_run_needs_a_gpu_and_gpu_needs_dry_run(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--dry-run"]) == 2
    assert "--gpu NAME" in capsys.readouterr().err
    assert main(["train", "--gpu", "RTX 4090"]) == 2
    assert "only applies with --dry-run" in capsys.readouterr().err
    # a config that does not fit: exit 1 and says what to do
    assert main(["train", "--dry-run", "--gpu", "RTX 4060", "model.name_or_path=Qwen/Qwen2.5-VL-7B-Instruct"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_with_data_the_dry_run_sizes_the_same_batch(tmp_path, capsys):
    """recommend --data writes data.train_path; the dry run scans that file as recommend did."""
    import json

    from PIL import Image

    lines = []
    for n, (w, h) in enumerate([(448, 448), (1920, 1080), (640, 480)]):
        Image.new("RGB", (w, h)).save(tmp_path / f"img{n}.png")
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"img{n}.png"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A picture. " * 30 * (n + 1)}]}))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    path, printed = _recommend(tmp_path, capsys, ["--gpu", "RTX 4090", "--model", "Qwen/Qwen2-VL-2B-Instruct",
                                                  "--data", str(data)])
    assert yaml.safe_load(path.read_text())["data"]["train_path"] == str(data)
    assert main(["train", str(path), "--dry-run", "--gpu", "RTX 4090"]) == 0
    checked = capsys.readouterr().out
    assert f"data {data}: 3 samples" in checked
    assert PEAK.search(checked).groups() == PEAK.search(printed).groups()


def test_dry_run_on_the_visible_gpu(tmp_path, capsys, monkeypatch):
    """Without --gpu the dry run checks the visible GPU as the training preflight does (reserved vs free, the
    memory_fraction cap included)."""
    import torch

    from vlmtune.memory.gpus import GIB
    from vlmtune.train import gpu_memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_memory, "read_gpu_memory",
                        lambda index: gpu_memory.GpuMemory("Fake GPU", 24 * GIB, 23 * GIB, True))
    argv = ["train", "--dry-run", "--preset", "ultra_low_memory", "model.name_or_path=Qwen/Qwen2.5-VL-7B-Instruct"]
    assert main(argv) == 0
    assert "Fake GPU: 23.00 of 24.00 GiB free: fits" in capsys.readouterr().out
    assert main([*argv, "hardware.memory_fraction=0.2"]) == 1  # capped at 4.8 GiB
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_a_value_set_for_another_method_follows_the_recommended_one(tmp_path, capsys):
    """full_finetune sets 1e-5 for full fine-tuning; recommended LoRA gets LoRA's rate, and the header says why."""
    path, _ = _recommend(tmp_path, capsys, ["--gpu", "RTX 4090", "--preset", "full_finetune"])
    text = path.read_text()
    assert "# training.learning_rate: lora's default; the config's 1e-05 was set for full" in text
    assert "learning_rate" not in yaml.safe_load(text)["training"]
    assert load_config(path).training.learning_rate == 2e-4
    path, _ = _recommend(tmp_path, capsys, ["--gpu", "H100", "--preset", "full_finetune", "--method", "full"])
    assert load_config(path).training.learning_rate == 1e-5  # the same method: the preset's value stays


def test_max_length_raised_where_the_images_fill_it(tmp_path, capsys):
    """ultra_low_memory's max_length 512 holds a 336 px Qwen2.5-VL image (144 tokens) and text, but not LLaVA-1.5's
    576-token image: the file recommend writes must leave room for text, and say why it changed the length."""
    path, printed = _recommend(tmp_path, capsys, ["--gpu", "RTX 4060 8GB", "--model", "llava-hf/llava-1.5-7b-hf",
                                                  "--preset", "ultra_low_memory"])
    written = yaml.safe_load(path.read_text())
    assert written["data"]["max_length"] == 832  # 576 image tokens + 256 of text, rounded up to 64
    assert "data.max_length raised from 512 to 832" in path.read_text()
    assert "data.max_length raised" in printed
    assert main(["train", str(path), "--dry-run", "--gpu", "RTX 4060 8GB"]) == 0
    assert "no room" not in capsys.readouterr().out
    # where the images leave room, the configured length stays
    path, _ = _recommend(tmp_path, capsys, ["--gpu", "RTX 4060 8GB", "--model", "Qwen/Qwen2.5-VL-7B-Instruct",
                                            "--preset", "ultra_low_memory"])
    assert yaml.safe_load(path.read_text())["data"]["max_length"] == 512
    assert "data.max_length raised" not in path.read_text()
