"""torch.compile per language-model decoder layer (`speed.compile`): fused elementwise kernels (RMSNorm, RoPE, SwiGLU,
the LoRA adds and casts) and fewer kernel launches, the layer by layer recipe of torchtitan. Each layer compiles
through its checkpointing wrapper; identical layers share one compiled graph. The first steps pay for compilation
(tens of seconds on a GPU), so it pays on long runs; a new sequence length recompiles once with dynamic shapes.

The first layer stays eager. Its input does not require grad when the embeddings are frozen (LoRA, QLoRA) while every
later layer's does, and dynamo guards on that: the first layer would make every compilation twice (measured on an
H100, W1: 6 compilations of ~13 s in a 300-step run, each triggered by `hidden_states requires_grad mismatch` or by
a new shape for both kinds of input; benchmarks/RESULTS.md session 7). Running it eagerly costs about 1/layers of
the compiled speed-up.
"""

from __future__ import annotations

from torch import nn


class CompiledLayers:
    def __init__(self, layers: list[nn.Module], backend: str, mode: str | None = None):
        self.layers = layers
        for layer in layers:
            layer.compile(backend=backend, mode=mode)

    def remove(self) -> None:
        for layer in self.layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set; calls go back to the eager forward
        self.layers = []


def compile_layers(
    hf_model: nn.Module,
    layers_prefix: str,
    backend: str = "inductor",
    mode: str | None = None,
) -> CompiledLayers | str:
    """`mode`: torch.compile's mode ("reduce-overhead" replays each layer as a CUDA graph: one launch instead of
    its ~100 kernels, for launch-bound steps; None: the default).
    A new sequence length recompiles once with dynamic shapes (torch's default). Compiling dynamic from the first
    step (`dynamic=True`) was slower on the H100: its first step did not finish in 150 s."""
    layers = compiled_decoder_layers(hf_model, layers_prefix)
    return layers if isinstance(layers, str) else CompiledLayers(layers, backend, mode)


def compiled_decoder_layers(hf_model: nn.Module, layers_prefix: str) -> list[nn.Module] | str:
    """The decoder layers speed.compile compiles (all but the first), or why there are none."""
    try:
        layers = hf_model.get_submodule(layers_prefix)
    except AttributeError:
        return f"no decoder layers at {layers_prefix}"
    if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
        return f"{layers_prefix} is not a list of two or more decoder layers"
    return list(layers)[1:]
