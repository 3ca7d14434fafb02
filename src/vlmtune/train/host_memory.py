"""CPU RAM for DeepSpeed offload, checked before weights load: a run that offloads more than the machine has is
killed by the operating system part-way into loading, with no message of ours.

The estimate's `cpu_ram` covers every GPU of the run (offloaded optimizer states, DeepSpeed's pinned buffers); this
node holds its own processes' share. Measured on an H100 machine (benchmarks/RESULTS.md, DeepSpeed with offload):
the machine's RAM use was the estimate -7% to +5% for full fine-tuning, plus what any training process takes
(libraries, dataloader workers: 2-9 GiB without offload).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vlmtune.errors import VlmtuneError
from vlmtune.memory.gpus import GIB

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.memory.breakdown import Breakdown

log = logging.getLogger(__name__)

PROCESS_RAM = 8 * GIB
"""CPU RAM of one training process itself, on top of what it offloads (libraries, the model's CPU-side buffers,
dataloader workers): 8.9 GiB measured for a 2B-3B run without offload on an H100 machine."""
TIGHT = 0.9
"""Above this share of the available RAM (process RAM included) a run is told it is tight."""


def available_host_ram(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes (Linux), or None where it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _local_processes(num_gpus: int) -> int:
    """Training processes on this node (all of them on one node)."""
    return max(min(int(os.environ.get("LOCAL_WORLD_SIZE", num_gpus) or num_gpus), num_gpus), 1)


def node_share(cpu_ram: int, num_gpus: int) -> int:
    """This node's part of the run's offload RAM: its local processes' share (all of it on one node)."""
    return cpu_ram * _local_processes(num_gpus) // max(num_gpus, 1)


def node_need(cpu_ram: int, num_gpus: int) -> int:
    """CPU RAM this node needs: its share of the offload plus PROCESS_RAM per local training process."""
    return node_share(cpu_ram, num_gpus) + PROCESS_RAM * _local_processes(num_gpus)


def check_host_ram(config: VlmtuneConfig, breakdown: Breakdown, available: int | None) -> str | None:
    """Raise when the offload cannot fit this node's available RAM (unless hardware.force_fit); returns a warning
    to log when it is tight or forced, None otherwise."""
    if not breakdown.cpu_ram or available is None:
        return None
    need = node_need(breakdown.cpu_ram, breakdown.inputs.num_gpus)
    offload = config.distributed.offload
    said = (f"distributed.offload={offload} needs about {need / GIB:.1f} GiB of CPU RAM on this node (the estimate's "
            f"offloaded states and buffers, plus {PROCESS_RAM // GIB} GiB per training process) "
            f"and {available / GIB:.1f} GiB is available (MemAvailable)")
    if need > available:
        if config.hardware.force_fit:
            return f"{said}: starting anyway (hardware.force_fit); the system may kill the run"
        raise VlmtuneError(
            f"{said}, so the operating system would kill the run while it loads. Options: more GPUs (ZeRO splits "
            "the offloaded states between them), distributed.offload=none or optimizer instead of "
            "optimizer_and_params if the GPU can hold the rest (`vlmtune estimate` shows it), LoRA instead of full "
            "fine-tuning, or a machine with more RAM. Start anyway with --force (hardware.force_fit=true)."
        )
    if need > TIGHT * available:
        return f"{said}: tight"
    return None
