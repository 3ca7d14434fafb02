"""The estimator counts the dense masks a packed row carries for families that build them (Gemma 3), and nothing
for families whose packed samples are kept apart by their positions."""

from __future__ import annotations

import pytest

from vlmtune.families import all_families
from vlmtune.memory import estimate
from vlmtune.memory.activations import activation_terms
from vlmtune.memory.catalogue import architectures, lookup_model
from vlmtune.memory.inputs import EstimateInputs
from vlmtune.memory.params import count_params as counts_of

GEMMA = "google/gemma-3-12b-it"
LAYERS = 48  # Gemma 3 12B's decoder layers


def _inputs(model: str, **changes) -> EstimateInputs:
    return EstimateInputs(model=model, method="lora", batch_size=2, seq_len=8192, **changes)


def test_every_family_mask_family_has_its_masks_in_the_catalogue():
    for family in all_families():
        for model_type in family.model_types:
            arch = architectures().get(model_type)
            if arch is None:
                continue
            assert (arch.packed_row_masks > 0) == (family.packed_row_attention == "family_mask"), model_type


@pytest.mark.parametrize("every", [1, 4])
def test_gemma3_packed_rows_add_their_masks(every):
    b, s = 2, 8192
    spec = lookup_model(GEMMA)
    plain = estimate(_inputs(GEMMA, checkpoint_every=every))
    packed = estimate(_inputs(GEMMA, checkpoint_every=every, packing=True))
    checkpointed = -(-LAYERS // every)
    saved = 2 * b * s * s + (LAYERS - checkpointed) * 2 * b * s * s  # two boolean masks, a 16-bit bias per kept layer
    terms = [activation_terms(i, spec, counts_of(spec), 2, spec.arch.lora_targets["all"], True)
             for i in (_inputs(GEMMA, checkpoint_every=every), _inputs(GEMMA, checkpoint_every=every, packing=True))]
    assert terms[1].language_saved - terms[0].language_saved == saved
    assert terms[1].layer_working - terms[0].layer_working == 2 * b * s * s
    assert packed.peak_allocated - plain.peak_allocated >= saved
    assert any("dense masks" in note for note in packed.notes)


def test_positions_only_families_add_nothing():
    plain = estimate(_inputs("Qwen/Qwen2-VL-2B-Instruct"))
    packed = estimate(_inputs("Qwen/Qwen2-VL-2B-Instruct", packing=True))
    assert packed.peak_reserved == plain.peak_reserved
