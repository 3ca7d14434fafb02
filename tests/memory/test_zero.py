"""ZeRO / DDP / offload arithmetic against hand-computed values (DeepSpeed's estimators and the ZeRO paper)."""

from __future__ import annotations

import pytest

from vlmtune.memory.zero import StateSizes, check_plan, plan

PSI = 1_000_000_000  # parameters, all trainable (full fine-tuning in bf16)
LARGEST = 100_000_000
FULL = StateSizes(
    frozen_weight_bytes=0,
    trainable=PSI,
    param_bytes=2,
    grad_bytes=2,
    optimizer_bytes=4,
    largest_unit=LARGEST,
    bucket_elements=4096 * 4096,
)
BUCKETS = 2 * 4096 * 4096 * 2


def _gpu(p) -> int:
    return p.resident + p.grads_transient


@pytest.mark.parametrize("g", [1, 2, 4, 8])
def test_stage0_is_vlmtune_alone_or_ddp(g):
    p = plan(FULL, 0, "none", g)
    ddp = 2 * PSI if g > 1 else 0  # DDP's gradient buckets: a second copy of the gradients
    assert (p.weights, p.grads, p.optimizer, p.buffers) == (2 * PSI, 2 * PSI, 4 * PSI, ddp)
    assert p.cpu_ram == 0 and not p.deepspeed


@pytest.mark.parametrize("g,expected", [(1, 20e9), (2, 12e9), (4, 8e9), (8, 6e9)])
def test_stage1_partitions_optimizer_states(g, expected):
    # 2 (bf16 weights) + 2 (bf16 grads) + 4/G (fp32 grads) + 12/G (fp32 master + Adam) bytes per parameter
    assert _gpu(plan(FULL, 1, "none", g)) - BUCKETS == expected


@pytest.mark.parametrize("g,expected", [(1, 20e9), (2, 11e9), (4, 6.5e9), (8, 4.25e9)])
def test_stage2_matches_deepspeed_estimator(g, expected):
    # estimate_zero2_model_states_mem_needs: 2 * total + 18 * total / gpus
    assert _gpu(plan(FULL, 2, "none", g)) - BUCKETS == expected


@pytest.mark.parametrize("g,expected", [(1, 18e9), (2, 9e9), (4, 4.5e9), (8, 2.25e9)])
def test_stage3_matches_deepspeed_estimator(g, expected):
    # estimate_zero3_model_states_mem_needs: 4 * largest_layer + 18 * total / gpus
    assert _gpu(plan(FULL, 3, "none", g)) - BUCKETS == expected + 4 * LARGEST


@pytest.mark.parametrize("g", [1, 2, 4, 8])
def test_offload_optimizer(g):
    z2 = plan(FULL, 2, "optimizer", g)
    assert _gpu(z2) - BUCKETS == 2 * PSI  # DeepSpeed: gpu_mem = 2 * total with cpu_offload
    assert z2.offloaded == 16 * PSI // g
    assert z2.cpu_ram == 24 * PSI  # 16 bytes x 1.5 buffer factor for the node (no model-loading copies)
    z3 = plan(FULL, 3, "optimizer", g)
    assert _gpu(z3) - BUCKETS == 2 * PSI // g + 4 * LARGEST  # largest layer + 2 * total / gpus
    assert z3.cpu_ram == 24 * PSI


@pytest.mark.parametrize("g", [1, 2, 4, 8])
def test_offload_everything(g):
    p = plan(FULL, 3, "all", g)
    assert _gpu(p) - BUCKETS == 4 * LARGEST  # DeepSpeed: gpu_mem = largest_layer_memory
    assert p.cpu_ram == 27 * PSI  # 18 bytes x 1.5 (zero_init)


@pytest.mark.parametrize("g", [1, 2, 4, 8])
def test_lora_frozen_weights_replicated_until_stage3(g):
    frozen, adapters = 10 * PSI, 20_000_000
    lora = StateSizes(
        frozen_weight_bytes=frozen,
        trainable=adapters,
        param_bytes=4,
        grad_bytes=4,
        optimizer_bytes=8,
        largest_unit=LARGEST,
        bucket_elements=1024,
    )
    assert plan(lora, 0, "none", g).weights == frozen + 4 * adapters  # PEFT's fp32 adapters
    assert plan(lora, 2, "none", g).weights == frozen + 2 * adapters  # DeepSpeed casts the module to bf16
    assert plan(lora, 2, "none", g).optimizer == 12 * adapters // g
    assert plan(lora, 3, "none", g).weights == (frozen + 2 * adapters) // g


def test_impossible_combinations_are_explained():
    assert check_plan(0, "optimizer", 1) == [
        "offload needs DeepSpeed: use zero_stage 1, 2 or 3 (offload=optimizer) or 3 (offload=all)"
    ]
    assert "needs zero_stage 3" in check_plan(2, "all", 4)[0]
    assert len(check_plan(5, "disk", 0)) == 3
    assert check_plan(3, "all", 8) == []
