"""speed.checkpoint_every_n_layers = n > 1 checkpoints the decoder layers the memory estimate counts as checkpointed
(index in the language model a multiple of n) and every vision block, whatever transformers' own numbering (which
counts the vision tower's blocks first: with Qwen3-VL's tiny 3-block tower it would pick decoder layer 1, not 0)."""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

from vlmtune.families import get_family
from vlmtune.speed.loss_hook import unwrap_peft
from vlmtune.train.engine import train


class Flags(TrainerCallback):
    """The checkpointing flags as the first step starts: decoder layers in order, and the other blocks."""

    def __init__(self, prefix: str):
        self.prefix, self.decoder, self.others = prefix, None, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.decoder is None:
            hf = unwrap_peft(model)
            layers = list(hf.get_submodule(self.prefix))
            self.decoder = [bool(layer.gradient_checkpointing) for layer in layers]
            self.others = [bool(m.gradient_checkpointing) for m in hf.modules()
                           if isinstance(m, GradientCheckpointingLayer) and not any(m is x for x in layers)]


def test_every_second_decoder_layer_by_its_index_in_the_language_model(run_config, tmp_path):
    family = get_family("qwen3_vl")
    flags = Flags(family.language_layers_prefix)
    config = run_config("qwen3_vl", "lora", out=tmp_path / "run", training={"max_steps": 1},
                        hardware={"precision": "fp32", "gradient_checkpointing": True},
                        speed={"checkpoint_every_n_layers": 2})
    train(config, callbacks=[flags])
    assert len(flags.others) % 2 == 1  # an odd number of vision blocks first: transformers' count would shift
    assert flags.decoder == [index % 2 == 0 for index in range(len(flags.decoder))]
    assert flags.others and all(flags.others)


def test_every_layer_keeps_transformers_flags(run_config, tmp_path):
    family = get_family("qwen3_vl")
    flags = Flags(family.language_layers_prefix)
    config = run_config("qwen3_vl", "lora", out=tmp_path / "run", training={"max_steps": 1},
                        hardware={"precision": "fp32", "gradient_checkpointing": True},
                        speed={"checkpoint_every_n_layers": 1})
    train(config, callbacks=[flags])
    assert all(flags.decoder) and all(flags.others)
