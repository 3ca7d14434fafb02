"""torch.compile per block of a frozen vision tower (`speed.compile_vision`, with speed.compile).

Why: speed.compile compiles the language model's decoder layers; the vision tower stays eager. A frozen tower runs
once per step, forward only, under no_grad (`frozen_vision.py`), so its FLOPs are small, but eagerly it is a chain of
small elementwise kernels (fp32 norms, rotary embeddings, the gated MLP's activation) between its matmuls. Measured on
an H100 (W3, Qwen2.5-VL-7B LoRA, 4 images of 448 px per step, no checkpointing, eager; benchmarks/RESULTS.md session
19): the vision tower's forward took 48 ms of GPU kernels a step for about 5.2 TFLOP of matmuls (8 ms at 650 TFLOP/s),
17% of the step's kernel time; with the decoder layers compiled its share grows.

What compiles: every block of the tower's block lists, i.e. each `nn.ModuleList` under the family's vision prefixes
whose two or more entries are all of one class named "...Layer" or "...Block" (Qwen2/2.5/3-VL `visual.blocks`,
SigLIP / CLIP / Idefics3 / InternViT `encoder.layers`, Mllama's local and global layers), and only blocks none of whose
parameters train: a block that trains would need its backward compiled too, and the first one's input would not
require grad while the others' do (the reason `compile_layers` leaves the first decoder layer eager). Blocks of one
class share one compiled graph per input shape; Qwen2.5-VL's window and full-attention blocks make two.
"""

from __future__ import annotations

from torch import nn

from vlmtune.speed.compile_layers import CompiledLayers

_BLOCK_WORDS = ("layer", "block")


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) < 2:
        return False
    kinds = {type(m) for m in module}
    if len(kinds) != 1:
        return False
    name = next(iter(kinds)).__name__.lower()
    return any(name.endswith(word) or name.endswith(word + "s") for word in _BLOCK_WORDS)


def vision_blocks(hf_model: nn.Module, vision_prefixes: tuple[str, ...]) -> tuple[list[nn.Module], list[str]]:
    """The frozen blocks of the vision tower's block lists, and the names of the lists left eager (with why)."""
    blocks: list[nn.Module] = []
    left: list[str] = []
    for prefix in vision_prefixes:
        try:
            root = hf_model.get_submodule(prefix)
        except AttributeError:
            continue
        taken: list[str] = []
        for name, module in root.named_modules(prefix=prefix):
            if any(name.startswith(t + ".") for t in taken) or not _is_block_list(module):
                continue
            taken.append(name)
            if any(p.requires_grad for p in module.parameters()):
                left.append(f"{name} (it trains)")
                continue
            blocks += list(module)
    return blocks, left


def compile_vision(
    hf_model: nn.Module,
    vision_prefixes: tuple[str, ...],
    backend: str = "inductor",
    mode: str | None = None,
) -> CompiledLayers | str:
    """Compile each frozen vision block; the handle (`remove()` makes them eager again), or why nothing compiled."""
    blocks, left = vision_blocks(hf_model, vision_prefixes)
    if not blocks:
        where = ", ".join(vision_prefixes)
        return f"no frozen vision blocks under {where}" + (f": {'; '.join(left)}" if left else "")
    return CompiledLayers(blocks, backend, mode)
