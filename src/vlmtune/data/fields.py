"""Which record fields vlmtune reads, and what it says about every other one (nothing is ignored silently).

A key that is neither read nor metadata is an error naming it, or with `data.on_ignored_field=warn` a warning
that `data check` counts per field. Fields known from other tools get advice on what to do instead; video is
always refused (a `<video>` placeholder would be trained on as literal text).
"""

from __future__ import annotations

import re

METADATA_KEYS = frozenset({"id", "source", "dataset", "metadata"})
"""Top-level keys accepted and not read: they describe a record, they do not change what is trained."""

IMAGE_KEYS = frozenset({"image", "images"})
"""Top-level image lists, read by every record style; each style's other keys are in `record_styles.STYLES`."""
TRAIN_KEYS = frozenset({"loss", "loss_weight"})
"""Per-turn training switches: ms-swift's `loss` (true / false) and LLaMA-Factory v1's `loss_weight` (1 / 0)."""
CHAT_MESSAGE_KEYS = frozenset({"role", "content"}) | TRAIN_KEYS
SHAREGPT_TURN_KEYS = frozenset({"from", "value"}) | TRAIN_KEYS
ITEM_KEYS = {
    "text": frozenset({"type", "text", "value"}),
    "image": frozenset({"type", "image", "path", "url", "base64", "index"}),
    "image_url": frozenset({"type", "image_url", "value"}),
}
"""Keys read per content item type: `value` is LLaMA-Factory v1's, `base64` axolotl's, `index` (the image's position
in the record's `images`) that of Hugging Face data sets made for TRL."""
IMAGE_URL_KEYS = frozenset({"url"})
VIDEO_KEYS = frozenset({"video", "videos", "video_url"})
VIDEO_PLACEHOLDER = "<video>"
IGNORED_CODE = "ignored-field"
"""`Problem.code` of an ignored-field warning (counted per field by `data check`)."""

_SIZES = (
    "per-image sizes are not read: every image is resized by data.image_size / data.min_pixels / data.max_pixels; "
    "remove the key, or resize the image file"
)
_LOSS = (
    "per-turn weights are not read: an assistant turn is trained on unless it says \"loss\": false (ms-swift) or "
    "\"loss_weight\": 0 (LLaMA-Factory v1); use one of those"
)
ADVICE = {
    "chat_template_kwargs": (
        "per-record chat template arguments are not read: every record is rendered by the model's chat template "
        "with its default arguments; remove the key"
    ),
    "tools": "tool definitions are not read (tool calling is not supported); remove the key",
    "weight": _LOSS,
    "train": _LOSS,
    "resized_height": _SIZES,
    "resized_width": _SIZES,
    "min_pixels": _SIZES,
    "max_pixels": _SIZES,
    "detail": _SIZES,
}

_INDEX = re.compile(r"\[\d+\]")


def unread_keys(obj: dict, known: frozenset[str]) -> list[str]:
    """Keys of `obj` that are neither in `known` nor video keys (reported separately), in the record's order."""
    if obj.keys() <= known:
        return []
    return [k for k in obj if k not in known and k not in VIDEO_KEYS]


def ignored_message(key: str, switch_hint: bool) -> str:
    """What is ignored and what to do (the field itself is named by the problem's `field`)."""
    advice = ADVICE.get(key) or "vlmtune does not read this field, so it would be ignored; remove it (check the spelling)"
    hint = "; or set data.on_ignored_field=warn to train without it" if switch_hint else ""
    return f"{advice}{hint}"


def field_kind(where: str) -> str:
    """The field with its list indices removed (`messages[3].loss` -> `messages[].loss`): what warnings count."""
    return _INDEX.sub("[]", where)
