"""The gated delta rule's PyTorch reference as one opaque operator (speed/opaque_delta_rule.py): the same outputs and
gradients as the reference, and compiled Qwen3.5 layers that do not compile again for each new chunk count."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from speed_helpers import assert_same, lora_model, loss_and_grads

from vlmtune.families import get_family

FAMILY = get_family("qwen3_5")


def _reference():
    import transformers.models.qwen3_5.modeling_qwen3_5 as modeling

    bound = modeling.torch_chunk_gated_delta_rule
    return getattr(bound, "__wrapped__", bound)


def _inputs(length: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    b, heads, dim = 2, 3, 16
    q, k, v = (torch.randn(b, length, heads, dim, generator=generator, dtype=dtype) for _ in range(3))
    g = -torch.rand(b, length, heads, generator=generator).to(dtype)  # log decay <= 0
    beta = torch.rand(b, length, heads, generator=generator).to(dtype)
    return [t.requires_grad_(True) for t in (q, k, v, g, beta)]


def _out_and_grads(fn, inputs, weights):
    out, state = fn(*inputs[:3], g=inputs[3], beta=inputs[4], initial_state=None, output_final_state=False,
                    use_qk_l2norm_in_kernel=True)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    return state, out.detach(), grads


@pytest.mark.parametrize("length", [64, 150, 300])  # in the operator's chunks: one, two with padding, three
def test_operator_gives_the_reference_outputs_and_gradients(length):
    """As transformers runs it (64-token chunks, traced) up to fp32 rounding; exactly the reference at the operator's
    own chunk size."""
    from vlmtune.speed.opaque_delta_rule import CHUNK, opaque

    reference = _reference()
    inputs = _inputs(length)
    weights = torch.randn(2, length, 3, 16)
    _, expected, expected_grads = _out_and_grads(reference, inputs, weights)
    state, out, grads = _out_and_grads(opaque(reference), inputs, weights)
    assert state is None
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
    _, same, same_grads = _out_and_grads(functools.partial(reference, chunk_size=CHUNK), inputs, weights)
    torch.testing.assert_close(out, same, rtol=0, atol=0)
    for grad, same_grad in zip(grads, same_grads, strict=True):
        torch.testing.assert_close(grad, same_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("needs", [(True,) * 5, (False, True, True, False, True)])
def test_the_custom_operator_itself_gives_the_eager_forms_gradients(needs):
    """What compiled layers call (the torch.library operator, backward by torch.func.vjp) against the eager form
    (`Recomputed`, backward by autograd): the same output and gradients, also when only some inputs need one."""
    from vlmtune.speed.opaque_delta_rule import Recomputed, gated_delta_rule

    inputs = [t.detach().requires_grad_(need) for t, need in zip(_inputs(150), needs, strict=True)]
    weights = torch.randn(2, 150, 3, 16)
    results = []
    for run in (gated_delta_rule, Recomputed.apply):
        out = run(*inputs, True, "")
        wanted = [t for t in inputs if t.requires_grad]
        results.append((out.detach(), torch.autograd.grad((out * weights).sum(), wanted)))
    (out_op, grads_op), (out_eager, grads_eager) = results
    torch.testing.assert_close(out_op, out_eager, rtol=0, atol=0)
    assert len(grads_op) == sum(needs)
    for a, b in zip(grads_op, grads_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_operator_keeps_the_callers_autocast():
    """A custom operator's body runs with autocast off; the operator puts the caller's back: under bf16 autocast (the
    CPU's here) it gives what the delta rule gives called under autocast directly, not its fp32 result, and stays
    within bf16 rounding of transformers' reference under autocast."""
    from vlmtune.speed.delta_rule import chunk_gated_delta_rule
    from vlmtune.speed.opaque_delta_rule import CHUNK, opaque

    def direct(q, k, v, g, beta, **_):
        return chunk_gated_delta_rule(q, k, v, g, beta, CHUNK, use_qk_l2norm=True), None

    inputs = _inputs(150)
    weights = torch.randn(2, 150, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, expected, expected_grads = _out_and_grads(direct, inputs, weights)
        _, out, grads = _out_and_grads(opaque(_reference()), inputs, weights)
        _, transformers_out, _ = _out_and_grads(_reference(), inputs, weights)
    _, fp32, _ = _out_and_grads(direct, inputs, weights)
    assert not torch.equal(expected, fp32)  # autocast changes the result
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, transformers_out, rtol=2e-2, atol=2e-3)


def test_other_calls_run_the_reference_as_it_is():
    """Generation's call (an initial state, the final state asked for) is not the operator's: the reference runs it."""
    from vlmtune.speed.opaque_delta_rule import opaque

    reference = _reference()
    q, k, v, g, beta = (t.detach() for t in _inputs(70))
    state = torch.randn(2, 3, 16, 16)
    expected = reference(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True)
    out = opaque(reference)(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True)
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], expected[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        opaque(reference)(q, k, v, g=g, beta=beta, cu_seqlens=torch.tensor([0, 30, 70]))


@pytest.fixture(scope="module")
def deltanet_model_dir(tmp_path_factory):
    """The tiny Qwen3.5 with two gated DeltaNet layers after the first (compile_layers leaves layer 0 eager)."""
    out = FAMILY.build_tiny(tmp_path_factory.mktemp("tiny-qwen3_5-deltanet"))
    config = json.loads((out / "config.json").read_text())
    config["text_config"].update(num_hidden_layers=3,
                                 layer_types=["full_attention", "linear_attention", "linear_attention"])
    (out / "config.json").write_text(json.dumps(config))
    return out


def _compiled_run(model_dir, opaque: bool, lengths) -> tuple[list, list]:
    """(loss and gradients per batch, graphs dynamo made after each) of checkpointed LoRA layers compiled on the
    reference, plain or opaque."""
    from vlmtune.families.linear_attention import reference_kernels
    from vlmtune.speed.compile_layers import compile_layers
    from vlmtune.speed.loss_hook import unwrap_peft

    model = lora_model(model_dir, "qwen3_5")
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kernels = reference_kernels(FAMILY.linear_attention_functions, opaque=opaque)
    assert not isinstance(kernels, str), kernels
    graphs: list = []

    def counting(gm, example_inputs):  # dynamo's graphs, run as traced (no inductor: no C compiler needed)
        graphs.append(gm)
        return gm.forward

    vocab = model.config.get_text_config().vocab_size
    batches = [torch.randint(5, vocab, (2, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    eager = [loss_and_grads(model, {"input_ids": ids, "labels": ids, "use_cache": False}) for ids in batches]
    torch._dynamo.reset()
    handle = compile_layers(unwrap_peft(model), FAMILY.language_layers_prefix, backend=counting)
    compiled, counts = [], []
    try:
        for ids in batches:
            compiled.append(loss_and_grads(model, {"input_ids": ids, "labels": ids, "use_cache": False}))
            counts.append(len(graphs))
    finally:
        handle.remove()
        kernels.remove()
        torch._dynamo.reset()
    for reference, other in zip(eager, compiled, strict=True):
        assert_same(reference, other, rel=1e-5, cosine=0.9999)
    return compiled, counts


@pytest.mark.slow
def test_compiled_layers_do_not_compile_again_per_chunk_count(deltanet_model_dir):
    """Sequence lengths of 2, 3, 4 and 6 chunks: traced, the reference's loop makes a new graph for each; as the
    operator, the layers compile for the first shape and once more with dynamic shapes, and never after. Both give
    the eager loss and gradients."""
    lengths = [70, 140, 200, 330]
    _, opaque_counts = _compiled_run(deltanet_model_dir, True, lengths)
    assert opaque_counts[0] > 0 and opaque_counts[1:] == [opaque_counts[1]] * 3, opaque_counts
    _, traced_counts = _compiled_run(deltanet_model_dir, False, lengths)
    assert traced_counts[-1] > traced_counts[1], traced_counts  # what the operator avoids


def test_operators_pass_torch_library_opcheck():
    """The custom operators' schemas, fake (meta) kernels and autograd registration, as torch.library checks them
    (a wrong fake stride broke the compiled layers once)."""
    from vlmtune.speed.opaque_delta_rule import gated_delta_rule, gated_delta_rule_backward

    q, k, v, g, beta = (t.detach().requires_grad_(True) for t in _inputs(150))
    torch.library.opcheck(gated_delta_rule, (q, k, v, g, beta, True, ""))
    grad_out = torch.randn(2, 150, 3, 16)
    # the backward's body (torch.func.vjp: wrapper tensors without storage) cannot run under opcheck's modes, which
    # read every argument's storage: its fake kernel is compared with the real outputs here
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = [t.detach() for t in (q, k, v, g, beta, grad_out)]
    real = gated_delta_rule_backward(*args, True, "")
    with FakeTensorMode() as mode:
        fake = gated_delta_rule_backward(*(mode.from_tensor(t) for t in args), True, "")
    assert [(t.shape, t.dtype, t.stride()) for t in fake] == [(t.shape, t.dtype, t.stride()) for t in real]
