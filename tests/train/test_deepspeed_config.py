"""DeepSpeed without starting it: the rendered JSON, a user's JSON validated, the CLI flags, the launch commands,
the estimator reading the same stage and offload, and the one-line message when DeepSpeed is missing."""

from __future__ import annotations

import json
import sys

import pytest

from vlmtune.cli.main import parse_args
from vlmtune.cli.train_cmd import resolve_config
from vlmtune.config.distributed import uses_deepspeed, world_size, zero_plan
from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import ConfigError, MissingDependencyError
from vlmtune.memory.inputs import inputs_from_config
from vlmtune.methods.base import PrecisionPlan
from vlmtune.train import deepspeed_config as dsc
from vlmtune.train.launch import launch_command, launch_env, should_launch

GPU_BF16 = PrecisionPlan("cuda", None, True, False, "test")  # type: ignore[arg-type]
CPU_FP32 = PrecisionPlan("cpu", None, False, False, "test")  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _not_launched(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def cfg(**distributed) -> VlmtuneConfig:
    return VlmtuneConfig.model_validate({"distributed": distributed})


def train_cfg(*argv: str) -> VlmtuneConfig:
    return resolve_config(parse_args(["train", *argv]))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_render_leaves_the_training_arguments_auto(stage):
    ds = dsc.render(cfg(zero_stage=stage), hidden_size=64)
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == ds["fp16"]["enabled"] == "auto"
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and "optimizer" not in ds
    if stage:
        assert zero["reduce_bucket_size"] == 64 * 64
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # saved adapters are never empty
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
        assert zero["stage3_param_persistence_threshold"] == 640
    json.dumps(ds)  # plain JSON


def test_render_offload_and_stage3_knobs():
    ds = dsc.render(cfg(zero_stage=3, offload="optimizer_and_params", max_live_parameters=5, max_reuse_distance=6,
                        prefetch_bucket_size=7, param_persistence_threshold=8), hidden_size=None)
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert (zero["stage3_max_live_parameters"], zero["stage3_max_reuse_distance"]) == (5, 6)
    assert (zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (7, 8)
    assert zero["reduce_bucket_size"] == "auto"  # no hidden size known: the Trainer fills it from the model
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == "auto"  # CPU Adam


def test_engine_auto_and_world_size(monkeypatch):
    assert not uses_deepspeed(cfg().distributed) and (zero_plan(cfg()).stage, zero_plan(cfg()).offload) == (0, "none")
    assert uses_deepspeed(cfg(num_gpus=2).distributed) and (zero_plan(cfg(num_gpus=2)).stage, zero_plan(cfg(num_gpus=2)).offload) == (2, "none")
    assert uses_deepspeed(cfg(offload="optimizer").distributed)
    assert not uses_deepspeed(cfg(num_gpus=2, engine="none").distributed)  # plain DDP
    assert world_size(cfg(num_gpus=4, num_nodes=2).distributed) == 8
    monkeypatch.setenv("WORLD_SIZE", "3")  # inside torchrun: the launcher's count wins
    assert world_size(cfg().distributed) == 3 and uses_deepspeed(cfg().distributed)


def test_estimator_reads_the_rendered_stage_offload_and_gpus(tmp_path):
    inputs = inputs_from_config(cfg(num_gpus=4, num_nodes=2, zero_stage=3, offload="optimizer_and_params"))
    assert (inputs.zero_stage, inputs.offload, inputs.num_gpus) == (3, "all", 8)
    assert inputs_from_config(cfg()).zero_stage == 0  # one process, no DeepSpeed
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}))
    inputs = inputs_from_config(cfg(deepspeed_config=str(user)))
    assert (inputs.zero_stage, inputs.offload, inputs.num_gpus) == (1, "optimizer", 1)
    assert inputs_from_config(cfg(num_gpus=2), zero_stage=1, num_gpus=4).num_gpus == 4  # explicit overrides win


def test_user_json_is_checked_against_the_config(tmp_path):
    config = VlmtuneConfig.model_validate({"training": {"batch_size": 2, "gradient_accumulation_steps": 4}})
    bad = {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": "auto",
        "train_batch_size": 64,
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
    }
    problems = dsc.check_user_config(bad, config, GPU_BF16, world=2)
    text = "\n".join(problems)
    assert "train_micro_batch_size_per_gpu=3 disagrees with training.batch_size=2" in text
    assert "train_batch_size=64" in text and "bf16.enabled=False" in text
    assert "stage3_gather_16bit_weights_on_model_save" in text and "\"optimizer\" section" in text
    good = {**bad, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": 16, "bf16": {"enabled": "auto"},
            "optimizer": {"type": "AdamW"},
            "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    assert dsc.check_user_config(good, config, GPU_BF16, world=2) == []

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="disagrees") as err:
        dsc.deepspeed_config(config.model_copy(update={"distributed": cfg(deepspeed_config=str(path)).distributed}),
                             GPU_BF16, world=2)
    assert str(path) in str(err.value)
    path.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match=r"line 1\b.*column \d+"):
        dsc.deepspeed_config(cfg(deepspeed_config=str(path)), GPU_BF16, world=1)


def test_impossible_combinations_fail_at_validation():
    with pytest.raises(ValueError) as err:
        VlmtuneConfig.model_validate({"method": {"name": "qlora"}, "training": {"optimizer": "adamw_8bit"},
                                      "distributed": {"zero_stage": 3, "offload": "optimizer_and_params"}})
    text = str(err.value)
    assert "cannot be offloaded" in text and "ZeRO-3 partitioned" in text and "4-bit weights" in text
    with pytest.raises(ValueError, match="needs zero_stage 3"):
        cfg(zero_stage=2, offload="optimizer_and_params")
    with pytest.raises(ValueError, match="trains on the CPU already"):
        VlmtuneConfig.model_validate({"hardware": {"use_cpu": True}, "distributed": {"offload": "optimizer"}})
    # QLoRA on every stage, with optimizer offload too, is a valid config.
    for stage in (1, 2, 3):
        VlmtuneConfig.model_validate({"method": {"name": "qlora"}, "distributed": {"zero_stage": stage,
                                                                                   "offload": "optimizer"}})


def test_cli_flags(tmp_path):
    c = train_cfg("--num-gpus", "2", "--zero-stage", "3", "--offload", "optimizer", "--num-nodes", "2",
                  "--hostfile", "hosts", "--master-addr", "10.0.0.1", "--master-port", "29501")
    d = c.distributed
    assert (d.engine, d.num_gpus, d.zero_stage, d.offload, d.num_nodes) == ("deepspeed", 2, 3, "optimizer", 2)
    assert (str(d.hostfile), d.master_addr, d.master_port) == ("hosts", "10.0.0.1", 29501)
    c = train_cfg("--deepspeed", "ds_config.json")
    assert c.distributed.engine == "deepspeed" and str(c.distributed.deepspeed_config) == "ds_config.json"
    assert train_cfg("--num-gpus", "2", "--no-deepspeed").distributed.engine == "none"
    assert train_cfg("--local_rank=1").distributed.num_gpus == 1  # what the deepspeed launcher appends


def test_launch_commands(monkeypatch):
    c = train_cfg("--num-gpus", "2")
    assert should_launch(c) and not should_launch(train_cfg())
    assert should_launch(train_cfg("--zero-stage", "2"))  # DeepSpeed on one process also needs a launcher
    cmd = launch_command(c, ["cfg.yaml", "--num-gpus", "2"], python="py")
    assert cmd == ["py", "-m", "vlmtune.train.torchrun", "--nproc_per_node", "2", "--standalone", "-m",
                   "vlmtune.train", "cfg.yaml", "--num-gpus", "2"]
    c = train_cfg("--num-gpus", "8", "--num-nodes", "2", "--hostfile", "hosts", "--master-addr", "n1",
                  "--master-port", "29600")
    cmd = launch_command(c, ["cfg.yaml"], python="py")
    assert cmd[:3] == ["py", "-m", "deepspeed.launcher.runner"]
    assert cmd[3:] == ["--num_gpus", "8", "--num_nodes", "2", "--hostfile", "hosts", "--master_addr", "n1",
                       "--master_port", "29600", "--no_local_rank", "--module", "vlmtune.train", "cfg.yaml"]
    with pytest.raises(ConfigError, match="needs distributed.hostfile"):
        launch_command(train_cfg("--num-nodes", "2"), [], python="py")
    assert launch_env(train_cfg("hardware.use_cpu=true"), base={})["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not should_launch(c)  # inside a launched process nothing is launched again


def test_missing_deepspeed_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(MissingDependencyError) as err:
        dsc.prepare(cfg(engine="deepspeed"), GPU_BF16, tmp_path, world=1, writer=True)
    message = str(err.value)
    assert "\n" not in message and "pip install 'vlmtune[deepspeed]'" in message
    assert dsc.prepare(cfg(), GPU_BF16, tmp_path, world=1, writer=True) is None  # not asked for: not imported


def test_partial_optimizer_offload_renders_validates_and_reaches_the_estimator(tmp_path):
    config = cfg(zero_stage=3, offload="optimizer", offload_ratio=0.65, sub_group_size=500_000_000)
    zero = dsc.render(config, hidden_size=64)["zero_optimization"]
    assert zero["offload_optimizer"]["ratio"] == 0.65 and zero["sub_group_size"] == 500_000_000
    assert "ratio" not in dsc.render(cfg(zero_stage=3, offload="optimizer"), 64)["zero_optimization"][
        "offload_optimizer"]  # the default (everything offloaded) is DeepSpeed's own default
    inputs = inputs_from_config(config)
    assert (inputs.offload_ratio, inputs.sub_group_size) == (0.65, 500_000_000)
    for bad in ({"zero_stage": 2, "offload": "optimizer"}, {"zero_stage": 3}):
        with pytest.raises(ValueError, match="offload_ratio=0.5 .*needs zero_stage 3"):
            cfg(offload_ratio=0.5, **bad)
    user = tmp_path / "ds.json"  # a user's JSON: its ratio and sub-group size are what the estimate uses
    user.write_text(json.dumps({"zero_optimization": {"stage": 3, "sub_group_size": 2e8,
                                                      "offload_optimizer": {"device": "cpu", "ratio": 0.3}}}))
    inputs = inputs_from_config(cfg(deepspeed_config=str(user)))
    assert (inputs.zero_stage, inputs.offload, inputs.offload_ratio, inputs.sub_group_size) == (
        3, "optimizer", 0.3, 200_000_000)
