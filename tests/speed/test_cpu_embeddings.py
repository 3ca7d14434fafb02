"""Frozen input embeddings kept in CPU memory (speed.embeddings_on_cpu): where it applies, that the lookup's rows come
back to the model's device with the same loss and gradients (also with the input-gradient hook that gradient
checkpointing adds), that removing it restores the model, and what the estimator moves off the GPU."""

from __future__ import annotations

import torch
from speed_helpers import assert_same, lora_model, loss_and_grads

from vlmtune.data.collate import Collator
from vlmtune.memory import EstimateInputs, estimate
from vlmtune.speed.cpu_embeddings import CpuEmbeddings, embeddings_on_cpu


def test_where_it_does_not_apply(tiny_model_dir):
    untied = lora_model(tiny_model_dir("qwen2_5_vl"), "qwen2_5_vl").get_base_model()
    tied = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl").get_base_model()
    assert "only with method qlora" in embeddings_on_cpu(untied, "lora")
    assert "tied to lm_head" in embeddings_on_cpu(tied, "qlora")
    assert "on the CPU already" in embeddings_on_cpu(untied, "qlora")
    untied.get_input_embeddings().weight.requires_grad_(True)
    assert "train" in embeddings_on_cpu(untied, "qlora")


def test_same_loss_and_gradients_through_the_hooks(tiny_model_dir, encoded):
    processor, samples = encoded("qwen2_5_vl")
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    model = lora_model(tiny_model_dir("qwen2_5_vl"), "qwen2_5_vl")
    model.enable_input_require_grads()  # what gradient checkpointing adds: it must see the returned rows
    reference = loss_and_grads(model, batch)
    embedding = model.get_base_model().get_input_embeddings()
    moved: list[torch.Tensor] = []
    embedding.register_forward_hook(lambda m, a, out: moved.append(out))
    handle = CpuEmbeddings(embedding, torch.device("cpu"))
    assert handle.bytes == embedding.weight.numel() * embedding.weight.element_size()
    assert_same(reference, loss_and_grads(model, batch), rel=1e-6, cosine=0.99999)
    assert moved and moved[-1].requires_grad  # the input-gradient hook ran on the rows the model goes on with
    handle.remove()
    assert not embedding._forward_pre_hooks and len(embedding._forward_hooks) == 2
    assert_same(reference, loss_and_grads(model, batch), rel=1e-6, cosine=0.99999)


def test_estimator_moves_the_table_to_cpu_ram():
    base = EstimateInputs(model="Qwen/Qwen2.5-VL-7B-Instruct", method="qlora", batch_size=1, seq_len=400)
    lean = EstimateInputs(**{**base.__dict__, "embeddings_on_cpu": True})
    a, b = estimate(base), estimate(lean)
    table = 152_064 * 3_584 * 2  # vocab x hidden, bf16
    assert a.peak_allocated - b.peak_allocated == table
    assert b.cpu_ram - a.cpu_ram == table
    tied = EstimateInputs(model="Qwen/Qwen2-VL-2B-Instruct", method="qlora", embeddings_on_cpu=True)
    assert estimate(tied).peak_allocated == estimate(EstimateInputs(model="Qwen/Qwen2-VL-2B-Instruct",
                                                                    method="qlora")).peak_allocated


def test_the_gpu_block_goes_back_to_the_driver(monkeypatch):
    """Moving the table off the GPU frees its block to PyTorch's cache; empty_cache hands it to the driver, at install
    and when something moved the table back. (The move itself is faked: no GPU here.)"""
    emptied: list[int] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    embedding = torch.nn.Embedding(10, 4)
    where = {"device": "cuda"}
    monkeypatch.setattr(type(embedding.weight), "device", property(lambda self: torch.device(where["device"])),
                        raising=False)
    monkeypatch.setattr(torch.nn.Embedding, "to", lambda self, device: where.update(device=str(device)) or self)
    handle = CpuEmbeddings(embedding, torch.device("cuda"))
    assert where["device"] == "cpu" and emptied == [1]
    where["device"] = "cuda"  # the Trainer moved the model after install
    handle._inputs_to_cpu(embedding, (torch.tensor([1, 2]),))
    assert where["device"] == "cpu" and emptied == [1, 1] and handle.moved_back == 1
    handle._inputs_to_cpu(embedding, (torch.tensor([1, 2]),))  # on the CPU already: nothing to hand back
    assert emptied == [1, 1]
