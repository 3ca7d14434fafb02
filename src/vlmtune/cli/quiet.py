"""Quiet by default: what the CLI prints is vlmtune's own messages and one progress display (issue 20 item 6).

Other libraries' notes that ask nothing of the user are hidden unless `--verbose` (or `--debug`): deprecation and
future warnings from inside torch / transformers / PEFT / DeepSpeed, bitsandbytes' optional-kernel notes (`Failed to
load CPU gemm_4bit_forward from kernels-community`), DeepSpeed's `Setting accelerator to CPU`, transformers' info
notes and its own progress bars (`Loading weights`, `Writing model shards`). Hub download bars stay: a download is
long and worth seeing. Errors always show.

Log records are written through `tqdm.write`, so a message printed while the training bar is on screen lands above
the bar instead of inside it. Set up once by `cli.main` (the CLI boundary); the library itself configures nothing.
"""

from __future__ import annotations

import logging
import sys
import warnings

THIRD_PARTY = r"^(torch|transformers|peft|accelerate|deepspeed|bitsandbytes|tokenizers|safetensors|huggingface_hub)\b"
"""Modules whose warnings are library internals for a vlmtune user (shown with --verbose)."""

QUIET_LOGGERS = ("bitsandbytes", "DeepSpeed", "deepspeed", "accelerate", "torch.distributed", "peft")
"""Loggers whose warnings are notes about optional kernels and detected hardware, not problems: errors only."""


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


class _QuietChildren(logging.Filter):
    """On vlmtune's handler: below-error records of the QUIET_LOGGERS' child loggers (bitsandbytes' kernel note comes
    from `bitsandbytes.backends.cpu.ops`), which a filter on the parent logger never sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        quiet = any(record.name == n or record.name.startswith(n + ".") for n in QUIET_LOGGERS)
        return not quiet or record.levelno >= logging.ERROR


class TqdmHandler(logging.StreamHandler):
    """A log handler that prints above an active tqdm bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream or sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise; the handler reports it as logging does
            self.handleError(record)


def configure(verbose: bool, debug: bool, loads_models: bool) -> None:
    """Logging for the CLI: vlmtune's INFO (DEBUG with --debug) through tqdm; third-party noise off unless asked.
    loads_models: the command imports transformers anyway, so its logging is set here too (else it is left
    unimported: `vlmtune --version` stays instant)."""
    handler = TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logging.DEBUG if debug else logging.INFO
    # Other libraries' INFO (an HTTP line per hub request, ...) only with --verbose; vlmtune's own at INFO.
    logging.basicConfig(level=level if verbose or debug else logging.WARNING, handlers=[handler])  # no-op if set up
    logging.getLogger("vlmtune").setLevel(level)
    if verbose or debug:
        return
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY)
    for name in QUIET_LOGGERS:  # a filter on the logger survives DeepSpeed's own setLevel when it is imported
        logging.getLogger(name).addFilter(_BelowError())
    handler.addFilter(_QuietChildren())  # their child loggers propagate to this handler past the filters above
    if loads_models:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        # transformers' own bars (loading weights, writing shards) off; huggingface_hub's download bars stay.
        hf_logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
