"""The estimate's result: every term in bytes per GPU, a readable table and a JSON-ready dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vlmtune.memory.gpus import GIB
from vlmtune.memory.inputs import EstimateInputs

WEIGHTS = "weights: "
"""Label prefix of the weight parts in `Breakdown.allocated_terms`."""


@dataclass(frozen=True)
class Verdict:
    gpu: str
    capacity: int
    """Bytes a process can use on that GPU."""
    headroom: int
    """capacity - peak_total (negative: does not fit)."""
    status: str
    """fits / tight / does not fit."""


@dataclass(frozen=True)
class Breakdown:
    model: str
    params_source: str
    inputs: EstimateInputs
    total_params: int
    trainable_params: int
    weights: dict[str, int]
    """Frozen base weights on this GPU by part (vision, projector, language, embeddings, lm_head)."""
    weights_quantized: bool
    adapters: int
    """Trainable weights as stored on the GPU (LoRA adapters, or the trained parts under full fine-tuning)."""
    gradients: int
    """Gradients live at the peak (none for LoRA before its first backward completes, unless accumulating)."""
    optimizer_states: int
    zero_gathered: int
    comm_buffers: int
    activations_vision: int
    activations_language: int
    logits_loss: int
    transient: int
    """Largest step transient: optimizer temporaries, autocast weight caches or QLoRA dequantization."""
    runtime: int
    """cuBLAS workspaces, embeddings of the batch, pixel values."""
    seq_len: int
    image_tokens: int
    vit_patches: int
    offloaded: int
    cpu_ram: int
    peak_phase: str
    phases: dict[str, int]
    """Allocated bytes at each phase of a step; the table's rows are those of the peak phase."""
    peak_allocated: int
    """What torch.cuda.max_memory_allocated() should report."""
    allocator_overhead: int
    peak_reserved: int
    """What torch.cuda.max_memory_reserved() should report."""
    cuda_context: int
    peak_total: int
    """What nvidia-smi should report for the process at the peak."""
    verdict: Verdict | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def peak_summary(self) -> str:
        """One line with the peak's numbers, as `recommend`, `train --dry-run` and the training preflight print it."""
        return (
            f"memory estimate: {self.peak_total / GIB:.2f} GiB at the peak as nvidia-smi shows it "
            f"({self.peak_reserved / GIB:.2f} GiB reserved by PyTorch, {self.peak_allocated / GIB:.2f} allocated, "
            f"at {self.peak_phase})"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["inputs"] = self.inputs.to_dict()
        out["units"] = "bytes (per GPU unless named cpu_ram)"
        return out

    def setup(self) -> str:
        """The configuration in one line: method, micro-batch, precision, checkpointing, ZeRO, GPUs."""
        i = self.inputs
        return (
            f"{i.method}"
            + (f" r={i.lora_rank}" if i.method != "full" else "")
            + f", micro-batch {i.batch_size} x accumulation {i.gradient_accumulation_steps}, {i.precision}, "
            f"checkpointing {'on' if i.gradient_checkpointing else 'off'}, ZeRO {i.zero_stage}"
            + (f" offload {i.offload}" if i.offload != "none" else "")
            + (f" (ratio {i.offload_ratio:g})" if i.offload != "none" and i.offload_ratio < 1 else "")
            + f", {i.num_gpus} GPU(s)"
        )

    def allocated_terms(self) -> list[tuple[str, int]]:
        """(label, bytes) of the allocated terms at the peak phase, in table order: each weight part (labelled
        `weights: PART`), then the rest; ZeRO-3 gathers and communication buffers only when present. They add up to
        `peak_allocated`."""
        rows = [(f"{WEIGHTS}{part.replace('_', ' ')}", value) for part, value in self.weights.items()]
        rows += [
            ("trainable weights / adapters", self.adapters),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer_states),
        ]
        rows += [(label, value) for label, value in (("ZeRO-3 gathered parameters", self.zero_gathered),
                                                    ("communication buffers", self.comm_buffers)) if value]
        return rows + [
            ("activations: vision tower", self.activations_vision),
            ("activations: language model", self.activations_language),
            ("logits and loss", self.logits_loss),
            ("step transients", self.transient),
            ("runtime (workspaces, batch)", self.runtime),
        ]

    def to_table(self) -> str:
        quant = " (4-bit NF4 where quantized)" if self.weights_quantized else ""
        lines = [
            f"Model      {self.model}  ({self.total_params / 1e9:.2f} B parameters; {self.params_source})",
            f"Setup      {self.setup()}",
            f"Sequence   {self.seq_len} tokens per sample ({self.image_tokens} image tokens), "
            f"{self.vit_patches} vision patches per micro-batch",
            f"Trainable  {self.trainable_params:,} parameters ({100 * self.trainable_params / self.total_params:.2f}%)",
            "",
            f"{'per GPU':<38}{'GiB':>9}",
        ]

        def row(label: str, value: int, indent: int = 2) -> None:
            lines.append(f"{' ' * indent}{label:<{36 - indent + 2}}{value / GIB:>9.2f}")

        lines.append(f"  weights{quant}")
        for label, value in self.allocated_terms():
            if label.startswith(WEIGHTS):
                row(label[len(WEIGHTS) :], value, 4)
            else:
                row(label, value)
        lines.append(f"  {'peak allocated':<36}{self.peak_allocated / GIB:>9.2f}   at {self.peak_phase}")
        lines.append("    (phases: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.phases.items()) + ")")
        row("allocator overhead", self.allocator_overhead)
        row("CUDA context", self.cuda_context)
        lines.append(f"  {'PEAK (nvidia-smi)':<36}{self.peak_total / GIB:>9.2f}")
        if self.offloaded:
            lines.append(
                f"  offloaded to CPU RAM {self.offloaded / GIB:.2f} GiB per GPU; "
                f"the node needs {self.cpu_ram / GIB:.1f} GiB of CPU RAM for it"
            )
        if self.verdict:
            v = self.verdict
            lines += [
                "",
                f"Verdict    {v.status.upper()} on {v.gpu} ({v.capacity / GIB:.1f} GiB usable): "
                f"headroom {v.headroom / GIB:+.2f} GiB ({100 * v.headroom / v.capacity:+.0f}%)",
            ]
        lines += [f"Note       {n}" for n in self.notes]
        return "\n".join(lines)
