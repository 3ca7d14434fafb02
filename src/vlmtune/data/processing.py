"""Turning a record into model inputs: chat template, exact assistant spans, label masking, safe truncation.

The conversation is rendered once with the processor's chat template. Assistant spans are found by rendering the
conversation up to each assistant turn with the generation prompt and up to the end of that turn; the template
must be prefix-stable for that (checked, loudly). The rendered text is cut at the span boundaries and each piece
is run through the processor on its own (with the images that appear in it, no special tokens added), so the
label mask is exact by construction instead of guessed from token ids. Labels keep the assistant contents and the
end-of-turn token of every trained assistant turn (all but those marked `loss: false`, `Message.train`); system,
user and image tokens are -100.

A family may refuse a record its format cannot hold (`record_problem`, an Unsupported `multi_image`: a DataError
naming the line, also from `count_tokens`, so `data check --model` reports it) and may add per-sample inputs built
from the record's text (`extra_text_inputs`, e.g. a Q-Former's text input), carried as `EncodedSample.extras`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vlmtune.errors import DataError, VlmtuneError

if TYPE_CHECKING:
    from PIL.Image import Image
    from transformers import ProcessorMixin

    from vlmtune.config.schema import DataConfig
    from vlmtune.data.records import Record
    from vlmtune.families.base import FamilyDescriptor

IGNORE_INDEX = -100
SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids")
"""Per-token tensors (padded in batches); every other processor output is an image tensor (concatenated)."""


@dataclass
class EncodedSample:
    line: int
    """Source line of the record."""
    sequence: dict[str, torch.Tensor]
    """1-D per-token tensors of equal length: input_ids, labels, attention_mask (+ mm_token_type_ids)."""
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    """Image tensors as the processor returns them (pixel_values, image_grid_thw, ...); empty without images."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-sample 1-D inputs from `family.extra_text_inputs` (e.g. qformer_input_ids); padded and stacked in a
    batch."""
    images_per_sample: bool = False
    """`images` hold this sample's image tensors without a batch dim (images, ...), stacked per sample in a batch
    (`family.images_per_sample`); else they are concatenated on dim 0."""

    @property
    def input_ids(self) -> torch.Tensor:
        return self.sequence["input_ids"]

    @property
    def labels(self) -> torch.Tensor:
        return self.sequence["labels"]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """A batch of one, as the model's forward takes it."""
        images = {k: v.unsqueeze(0) for k, v in self.images.items()} if self.images_per_sample else self.images
        return {**{k: v.unsqueeze(0) for k, v in self.sequence.items()}, **images,
                **{k: v.unsqueeze(0) for k, v in self.extras.items()}}


@dataclass(frozen=True)
class Dropped:
    line: int
    reason: str


@dataclass(frozen=True)
class Segment:
    text: str
    labelled: bool
    images: int


def _render(processor: ProcessorMixin, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def segments(record: Record, processor: ProcessorMixin, family: FamilyDescriptor) -> list[Segment]:
    """The rendered conversation cut at the labelled spans (assistant content + end-of-turn)."""
    check_record(record, family)
    chat = record.to_chat()
    full = _render(processor, chat, False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(chat):
        if message["role"] != "assistant" or not record.messages[i].train:  # `loss: false`: context only
            continue
        if i == 0:
            raise DataError(f"line {record.line}: the conversation starts with an assistant message; "
                            "it needs a user message first")
        if any(part.get("type") == "image" for part in message["content"]):
            raise DataError(f"line {record.line}: messages[{i}] is an assistant message with an image; "
                            "images may only appear in user (or system) messages")
        prompt, upto = _render(processor, chat[:i], True), _render(processor, chat[: i + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise VlmtuneError(
                f"the {family.name} chat template is not prefix-stable (rendering the conversation up to message "
                f"{i} is not a prefix of the whole), so assistant spans cannot be found exactly (line "
                f"{record.line}). Use a template that renders earlier turns the same way whatever follows.")
        end = upto.rfind(family.end_of_turn, len(prompt))
        if end < 0:
            raise VlmtuneError(f"the {family.name} chat template does not close assistant turns with "
                               f"{family.end_of_turn!r} (line {record.line}); the model would never learn to stop")
        spans.append((len(prompt), end + len(family.end_of_turn)))

    token = processor.image_token
    pieces, pos = [], 0
    for start, end in spans:
        pieces += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    pieces.append((full[pos:], False))
    out = [Segment(text, labelled, text.count(token)) for text, labelled in pieces if text]
    found, expected = sum(s.images for s in out), len(record.images)
    if found != expected:
        raise DataError(f"line {record.line}: the {family.name} chat template rendered {found} image token(s) "
                        f"{token!r} for the record's {expected} image(s): remove literal {token!r} from the message "
                        "text, and put images in user messages (this template may not render them elsewhere)")
    return out


def check_record(record: Record, family: FamilyDescriptor) -> None:
    """Raise DataError (naming the line) when `family` cannot take `record`: several images where its capability
    map says `multi_image` is Unsupported, or what its `record_problem` says."""
    from vlmtune.families.capabilities import Unsupported

    multi = family.capabilities.get("multi_image")
    if len(record.images) > 1 and isinstance(multi, Unsupported):
        raise DataError(f"line {record.line}: {len(record.images)} images in one record, but {family.name} takes one "
                        f"image per sample: {multi.reason}")
    problem = family.record_problem(record)
    if problem:
        raise DataError(f"line {record.line}: {problem}")


def _open(path: Any, data_cfg: DataConfig) -> Image:
    from vlmtune.data.images import open_image

    return open_image(path, data_cfg.max_image_megapixels)


def _image_span_end(input_ids: torch.Tensor, processor: ProcessorMixin, family: FamilyDescriptor) -> int:
    """Index just past the last image span: the image tokens plus the markup the processor puts after them (an
    end-of-image token, a closing tile marker); 0 without images."""
    positions = (input_ids == processor.image_token_id).nonzero()
    if positions.numel() == 0:
        return 0
    return int(positions[-1]) + 1 + _image_tail(processor, family)


def _image_tail(processor: ProcessorMixin, family: FamilyDescriptor) -> int:
    """How many tokens the processor puts after an image's last image token: read from the processor's own expansion
    of the placeholder for one image (once per processor), so what a family's processor wraps around its image
    tokens is never cut off at data.max_length, whatever the family."""
    cached = getattr(processor, "_vlmtune_image_tail", None)
    if cached is not None:
        return cached
    from PIL import Image

    try:
        out = processor(text=[family.image_placeholder], images=[Image.new("RGB", (448, 448))],
                        add_special_tokens=False, return_tensors="pt")
        ids = out["input_ids"][0]
        tail = int(ids.numel()) - int((ids == processor.image_token_id).nonzero()[-1]) - 1
    except Exception:  # a processor that cannot expand the bare placeholder: what the placeholder text itself adds
        suffix = family.image_placeholder.split(processor.image_token)[-1]
        tail = len(processor.tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else 0
    try:
        processor._vlmtune_image_tail = tail
    except AttributeError:
        pass
    return tail


def encode_or_drop(record: Record, processor: ProcessorMixin, family: FamilyDescriptor,
                   data_cfg: DataConfig) -> EncodedSample | Dropped:
    """Encode `record`, or say why it cannot be kept (see `encode`)."""
    images = [_open(path, data_cfg) for path in record.images]
    sequence: dict[str, list[torch.Tensor]] = {"input_ids": [], "labels": []}
    image_parts: dict[str, list[torch.Tensor]] = {}
    taken = 0
    segs = segments(record, processor, family)
    extras = family.extra_text_inputs(record, processor)
    for seg in segs:
        seg_images = images[taken: taken + seg.images]
        taken += seg.images
        out = processor(text=[seg.text], images=seg_images or None, add_special_tokens=False, return_tensors="pt")
        ids = out["input_ids"][0]
        if seg.labelled:
            labels = ids.clone()
            labels[ids == processor.image_token_id] = IGNORE_INDEX
        else:
            labels = torch.full_like(ids, IGNORE_INDEX)
        sequence["labels"].append(labels)
        for key, value in out.items():
            if key in extras or key in family.sequence_input_names:  # built from the whole record / sequence
                continue
            if key in SEQUENCE_KEYS:
                sequence.setdefault(key, []).append(value[0])
            else:
                image_parts.setdefault(key, []).append(value[0] if family.images_per_sample else value)
    seq = {key: torch.cat(parts) for key, parts in sequence.items()}
    imgs = {key: torch.cat(parts, dim=0) for key, parts in image_parts.items()}
    seq.update(family.sequence_inputs(seq["input_ids"], imgs, processor))

    length, limit = seq["input_ids"].shape[0], data_cfg.max_length
    if length > limit:
        image_end = _image_span_end(seq["input_ids"], processor, family)
        if image_end > limit:
            reason = (f"{length} tokens, over data.max_length={limit}, and the cut would fall inside or before an "
                      f"image (the last image ends at token {image_end})")
            if data_cfg.on_overflow == "error":
                raise DataError(f"line {record.line}: {reason}. Raise data.max_length, lower data.image_size, "
                                "or set data.on_overflow=drop")
            return Dropped(record.line, reason)
        seq = {key: value[:limit] for key, value in seq.items()}
    if not bool((seq["labels"] != IGNORE_INDEX).any()):
        why = f" after truncation to data.max_length={limit}" if length > limit else ""
        return Dropped(record.line, f"no assistant token left to train on{why}")
    return EncodedSample(record.line, seq, imgs, extras, family.images_per_sample)


def encode(record: Record, processor: ProcessorMixin, family: FamilyDescriptor,
           data_cfg: DataConfig) -> EncodedSample | None:
    """Model inputs for `record`, or None when it cannot be kept: the max_length cut would fall inside or before
    an image span (with data.on_overflow=drop; =error raises DataError) or no labelled token is left.
    Text after the last image is truncated to data.max_length."""
    result = encode_or_drop(record, processor, family, data_cfg)
    return None if isinstance(result, Dropped) else result


def count_tokens(record: Record, processor: ProcessorMixin, family: FamilyDescriptor, data_cfg: DataConfig) -> int:
    """Untruncated length of `record` in tokens, image tokens included. Reads image sizes from file headers only."""
    from vlmtune.data.images import image_size

    tokenizer = processor.tokenizer
    total = 0
    for seg in segments(record, processor, family):
        total += len(tokenizer(seg.text, add_special_tokens=False)["input_ids"])
    for path in record.images:
        width, height = image_size(path, data_cfg.max_image_megapixels)
        total += family.image_token_count(height, width, processor) - 1  # the placeholder token itself is counted
    return total
