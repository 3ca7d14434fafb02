"""Starting the processes of a multi-GPU (or multi-node) run: `vlmtune train --num-gpus N` hands itself to torchrun
or the deepspeed launcher, which start `python -m vlmtune.train` with the same arguments once per GPU.

Inside a launched process (WORLD_SIZE is set) nothing is launched again, so these forms are equivalent:

    vlmtune train config.yaml --num-gpus 2
    torchrun --standalone --nproc_per_node 2 -m vlmtune.train config.yaml
    deepspeed --num_gpus 2 --module vlmtune.train config.yaml

Multi-node: `--hostfile` (`host slots=N` per line) lets the deepspeed launcher reach the other nodes over ssh (pdsh);
with torchrun, start `torchrun --nnodes M --node_rank R --master_addr A --master_port P --nproc_per_node N -m
vlmtune.train ...` on every node yourself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

from vlmtune.config.distributed import launched_world_size, uses_deepspeed
from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import ConfigError, require
from vlmtune.methods.base import on_cpu

MODULE = "vlmtune.train"


def should_launch(config: VlmtuneConfig) -> bool:
    """This process was not started by a launcher, and the run needs one: several processes, or DeepSpeed (which
    initialises its process group from the launcher's environment, also for a single process)."""
    dist = config.distributed
    world = dist.num_gpus * dist.num_nodes
    return launched_world_size() is None and (world > 1 or uses_deepspeed(dist, world))


def _uses_deepspeed_launcher(config: VlmtuneConfig) -> bool:
    dist = config.distributed
    if dist.num_nodes > 1 and dist.hostfile is None:
        raise ConfigError(
            [
                f"distributed.num_nodes={dist.num_nodes} needs distributed.hostfile (`host slots=N` per line) so the "
                "deepspeed launcher can reach the nodes; or start torchrun on every node yourself: torchrun --nnodes "
                f"{dist.num_nodes} --node_rank R --master_addr HOST --master_port PORT --nproc_per_node "
                f"{dist.num_gpus} -m {MODULE} ..."
            ]
        )
    return dist.launcher == "deepspeed" or dist.num_nodes > 1 or dist.hostfile is not None


def launch_command(config: VlmtuneConfig, train_args: list[str], python: str = sys.executable) -> list[str]:
    """The launcher command line that starts `python -m vlmtune.train TRAIN_ARGS` in every process."""
    dist = config.distributed
    if _uses_deepspeed_launcher(config):
        cmd = [
            python,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(dist.num_gpus),
            "--num_nodes",
            str(dist.num_nodes),
        ]
        if dist.hostfile is not None:
            cmd += ["--hostfile", str(dist.hostfile)]
        if dist.master_addr:
            cmd += ["--master_addr", dist.master_addr]
        if dist.master_port:
            cmd += ["--master_port", str(dist.master_port)]
        return [*cmd, "--no_local_rank", "--module", MODULE, *train_args]
    cmd = [python, "-m", "vlmtune.train.torchrun", "--nproc_per_node", str(dist.num_gpus)]  # torchrun, quiet on failures
    if dist.master_port or dist.master_addr:
        cmd += [
            "--master_addr",
            dist.master_addr or "127.0.0.1",
            "--master_port",
            str(dist.master_port or 29500),
        ]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", MODULE, *train_args]


def launch_env(config: VlmtuneConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The children's environment. On a CPU-only run DeepSpeed is told so (it would guess, with a warning), and the
    cores are shared out between the processes (torchrun does so itself; the deepspeed launcher does not)."""
    env = dict(os.environ if base is None else base)
    if on_cpu(config):
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.distributed.num_gpus)))
    return env


def launch(config: VlmtuneConfig, train_args: list[str]) -> int:
    """Run the launcher in the foreground; returns its exit code (non-zero when any process failed)."""
    dist = config.distributed
    world = dist.num_gpus * dist.num_nodes
    if _uses_deepspeed_launcher(config) or uses_deepspeed(dist, world):
        require("deepspeed", "deepspeed", f"training with DeepSpeed on {world} process(es)")
    cmd = launch_command(config, train_args)
    print(f"launching {world} process(es): {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    code = subprocess.call(cmd, env=launch_env(config))
    if code != 0:
        print(
            f"error: training failed in at least one of the {world} processes (exit code {code}); the failing "
            "rank's message is above, marked with its rank",
            file=sys.stderr,
        )
    return code


def close_process_group() -> None:
    """In a launched process, at its end: tear the process group down before the interpreter does. Left to
    interpreter exit, gloo's threads can be destroyed while still joinable and abort a rank after a finished run
    ("terminate called without an active exception", seen in CI on the 2-process ZeRO-3 tests)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
