"""`python -m vlmtune.train ARGS`: `vlmtune train ARGS` as a module, for launchers that start one per process:

    torchrun --standalone --nproc_per_node 2 -m vlmtune.train config.yaml
    deepspeed --num_gpus 2 --module vlmtune.train config.yaml

Under torchrun, `record` writes an uncaught exception of any rank to torchrun's error file, and torchrun's summary
names the rank that failed first.
"""

import sys
import warnings

from torch.distributed.elastic.multiprocessing.errors import record

from vlmtune.cli.main import main
from vlmtune.train.launch import close_process_group


@record
def _main() -> int:
    # DeepSpeed calls torch.distributed collectives that torch 2.13 renamed; the warning repeats every step.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    try:
        return main(["train", *sys.argv[1:]])
    finally:
        close_process_group()


sys.exit(_main())
