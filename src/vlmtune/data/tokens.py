"""The token-length function used by `data check` and by training's pre-flight check."""

from __future__ import annotations

from collections.abc import Callable

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.data.records import Record
from vlmtune.errors import VlmtuneError


def token_counter(config: VlmtuneConfig) -> Callable[[Record], int]:
    """Tokens of a record (image tokens included) with the model's own processor and chat template."""
    from vlmtune.data.processing import count_tokens
    from vlmtune.families import family_for_model

    family = family_for_model(config.model.name_or_path)
    processor = family.load_processor(config.model.name_or_path, config.data)
    return lambda record: count_tokens(record, processor, family, config.data)


def token_counter_for(config: VlmtuneConfig, explicit: bool) -> tuple[Callable[[Record], int] | None, str | None]:
    """For `data check`: with no model named, a missing default model skips the length check with a note."""
    try:
        return token_counter(config), None
    except VlmtuneError as exc:
        if explicit:
            raise
        return None, (f"note: token lengths were not checked ({exc}). "
                      "Pass --model DIR or --config FILE to count tokens with your model's processor.")
