"""The token-length function used by `data check` and by training's pre-flight check."""

from __future__ import annotations

from typing import Any

from vlmtune.config.schema import DataConfig, VlmtuneConfig
from vlmtune.data.records import Record
from vlmtune.errors import VlmtuneError


class TokenCounter:
    """Tokens of a record (image tokens included) with the model's own processor and chat template; `family` names
    the model family for the check's messages."""

    def __init__(self, processor: Any, family: Any, data_cfg: DataConfig):
        self.processor, self._family, self._data_cfg = processor, family, data_cfg
        self.family: str = family.name

    def __call__(self, record: Record) -> int:
        from vlmtune.data.processing import count_tokens

        return count_tokens(record, self.processor, self._family, self._data_cfg)


def token_counter(config: VlmtuneConfig) -> TokenCounter:
    """The token counter of `config`'s model (its processor is loaded, no weights)."""
    from vlmtune.families import family_for_model
    from vlmtune.hub import model_folder

    family = family_for_model(config.model.name_or_path, config.model.revision)
    folder = model_folder(config.model.name_or_path, config.model.revision)
    return TokenCounter(family.load_processor(folder, config.data), family, config.data)


def token_counter_for(config: VlmtuneConfig, explicit: bool) -> tuple[TokenCounter | None, str | None]:
    """For `data check`: with no model named, a missing default model skips the length check with a note."""
    from vlmtune.hub import in_cache, is_hub_id

    name = config.model.name_or_path
    if not explicit and is_hub_id(name) and not in_cache(name, config.model.revision):
        return None, ("note: token lengths were not checked (no model named). Pass --model (a folder or hub id) "
                      "or --config FILE to count tokens with your model's processor.")
    try:
        return token_counter(config), None
    except VlmtuneError as exc:
        if explicit:
            raise
        return None, (f"note: token lengths were not checked ({exc}). "
                      "Pass --model DIR or --config FILE to count tokens with your model's processor.")
