"""speed.compile on every registered family: dynamo traces each family's decoder layers (LoRA on all language linear
layers, the training batch of mixed images and lengths) and the compiled layers give the eager loss and gradients.
This backs the README support matrix's compile column; the speed it buys is measured on the GPU (RESULTS.md)."""

from __future__ import annotations

import pytest
import torch
from speed_helpers import assert_same, lora_model, loss_and_grads

from vlmtune.data.collate import Collator
from vlmtune.families import all_families


@pytest.mark.slow
@pytest.mark.parametrize("family_name", sorted(f.name for f in all_families()))
def test_compiled_layers_train_as_the_eager_ones(tiny_model_dir, varied_jsonl, family_name):
    from vlmtune.config.schema import DataConfig
    from vlmtune.data.processing import encode
    from vlmtune.data.records import read_records
    from vlmtune.families import get_family
    from vlmtune.speed.compile_layers import compile_layers
    from vlmtune.speed.loss_hook import unwrap_peft

    family = get_family(family_name)
    processor = family.load_processor(tiny_model_dir(family_name), DataConfig())
    # the records this family's prompt format holds (InstructBLIP: one image, one turn), three of them
    records = [r for r in read_records(varied_jsonl) if family.record_problem(r) is None][:3]
    samples = [encode(r, processor, family, DataConfig()) for r in records]
    assert len(samples) >= 2 and all(s is not None for s in samples)
    batch = {**Collator(processor.tokenizer.pad_token_id)(samples), "use_cache": False}
    model = lora_model(tiny_model_dir(family_name), family_name)
    traced: list = []

    def counting(gm, example_inputs):  # dynamo's graphs, run as traced (no inductor: no C compiler needed)
        traced.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)  # the same dropout masks outside the compiled layers (InstructBLIP's Q-Former)
    reference = loss_and_grads(model, batch)
    handle = compile_layers(unwrap_peft(model), family.language_layers_prefix, backend=counting)
    assert not isinstance(handle, str), handle
    try:
        torch.manual_seed(0)
        compiled = loss_and_grads(model, batch)
    finally:
        handle.remove()
        torch._dynamo.reset()
    assert traced, "no decoder layer went through dynamo"
    assert_same(reference, compiled, rel=1e-5, cosine=0.9999)
