"""speed.checkpoint_every_n_layers = n > 1 checkpoints the decoder layers the memory estimate counts as checkpointed
(index in the language model a multiple of n) and every vision block, whatever transformers' own numbering (which
counts the vision tower's blocks first: with Qwen3-VL's tiny 3-block tower it would pick decoder layer 1, not 0)."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("every", [2, 1])
def test_decoder_layers_checkpointed_by_their_index_in_the_language_model(run_config, tmp_path, every):
    """every=2: decoder layers 0, 2, ...; every=1: all (transformers' own flags)."""
    family = get_family("qwen3_vl")
    flags = Flags(family.language_layers_prefix)
    config = run_config("qwen3_vl", "lora", out=tmp_path / "run", training={"max_steps": 1},
                        hardware={"precision": "fp32", "gradient_checkpointing": True},
                        speed={"checkpoint_every_n_layers": every})
    train(config, callbacks=[flags])
    assert len(flags.others) % 2 == 1  # an odd number of vision blocks first: transformers' count would shift
    assert flags.decoder == [index % every == 0 for index in range(len(flags.decoder))]
    assert flags.others and all(flags.others)
