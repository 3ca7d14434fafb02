"""Use a trained result: load it, answer questions about images (greedy), and score a JSONL file by exact match.

loaded = load_for_inference("output/run/final")          # an adapter folder finds its base by itself
print(answer(loaded, [Path("cat.png")], "What is this?"))
result = predict_file(loaded, Path("val.jsonl"), Path("predictions.jsonl"))
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlmtune import outputs
from vlmtune.errors import VlmtuneError
from vlmtune.export.loading import LoadedModel, load_for_inference

if TYPE_CHECKING:
    from vlmtune.data.records import Message
    from vlmtune.families.base import FamilyDescriptor

__all__ = [
    "LoadedModel",
    "PredictResult",
    "answer",
    "generate_answer",
    "load_for_inference",
    "normalize_answer",
    "predict_file",
]

_TRAILING_PUNCT = ".,;:!?\u3002\uff01\uff1f"


def normalize_answer(text: str) -> str:
    """Case, inner whitespace and trailing punctuation do not count: ' Red. ' == 'red'."""
    return re.sub(r"\s+", " ", text).strip().rstrip(_TRAILING_PUNCT).strip().casefold()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_answer(
    model: torch.nn.Module,
    processor: Any,
    messages: list[Message],
    max_new_tokens: int = 64,
    max_megapixels: float = 100.0,
    family: FamilyDescriptor | None = None,
) -> str:
    """Greedy answer to the conversation `messages` (ending with a user turn), images in conversation order.
    `family` (the loaded model's) refuses conversations it cannot take and adds its extra text inputs."""
    from vlmtune.data.images import open_image
    from vlmtune.data.records import Record

    record = Record(line=0, messages=messages)
    if family is not None and (problem := family.record_problem(record)):
        raise VlmtuneError(f"cannot ask {family.name} this: {problem}")
    text = processor.apply_chat_template(record.to_chat(), add_generation_prompt=True, tokenize=False)
    images = [open_image(path, max_megapixels) for path in record.images]
    # the chat template writes the special tokens itself (as in training), so the tokenizer adds none
    inputs = processor(text=[text], images=images or None, add_special_tokens=False, return_tensors="pt")
    if family is not None:
        inputs.update({k: v[None] for k, v in family.extra_text_inputs(record, processor).items()})
    inputs = {k: v.to(_device(model)) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    pad = processor.tokenizer.pad_token_id
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad if pad is not None else processor.tokenizer.eos_token_id,
    )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def answer(loaded: LoadedModel, image_paths: list[Path], prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy answer to one question about `image_paths` (images first, then the question, in one user turn)."""
    from vlmtune.data.records import ImagePart, Message, TextPart

    parts: list[Any] = [ImagePart(Path(p).absolute()) for p in image_paths] + [TextPart(prompt)]
    return generate_answer(loaded.model, loaded.processor, [Message("user", parts)], max_new_tokens,
                           family=loaded.family)


@dataclass
class PredictResult:
    path: Path
    """predictions.jsonl: one line per record (line, prediction, reference, correct)."""
    total: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def predict_file(
    loaded: LoadedModel,
    data_path: Path | str,
    out_path: Path | str,
    max_new_tokens: int = 64,
    overwrite: bool = False,
    image_root: Path | str | None = None,
) -> PredictResult:
    """Answer every record of a JSONL file: the prompt is the conversation before its last assistant turn, the
    reference is that turn's text. Writes `out_path` (JSONL) and returns exact-match accuracy.

    An existing `out_path` is replaced only if vlmtune wrote it (and it is unchanged since) or `overwrite` is set;
    never when it is the data file itself (see `vlmtune.outputs`). `image_root`: data.image_root, where relative
    image paths resolve first (then the data file's folder)."""
    from vlmtune.config.schema import DataConfig
    from vlmtune.data.records import read_records

    data_path, out_path = Path(data_path), Path(out_path)
    outputs.check_file(out_path, what="the predictions", overwrite=overwrite, inputs={"the data file": data_path})
    records = read_records(data_path, DataConfig(image_root=image_root))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{outputs.STAGING_PREFIX}-{out_path.name}")
    correct, done, written = 0, 0, 0

    def needed() -> int:  # the bytes written so far, scaled to every record
        return written * len(records) // max(done, 1)

    try:
        with outputs.disk_full_guard(out_path.parent, needed, "the predictions"), open(tmp, "w", encoding="utf-8") as fh:
            for record in records:  # read_records guarantees an assistant turn after a user turn
                last = max(i for i, m in enumerate(record.messages) if m.role == "assistant")
                prediction = generate_answer(loaded.model, loaded.processor, record.messages[:last], max_new_tokens,
                                             family=loaded.family)
                reference = record.messages[last].text
                ok = normalize_answer(prediction) == normalize_answer(reference)
                correct += ok
                row = {"line": record.line, "prediction": prediction, "reference": reference, "correct": ok}
                line = json.dumps(row, ensure_ascii=False) + "\n"
                written, done = written + len(line.encode("utf-8")), done + 1
                fh.write(line)
        os.replace(tmp, out_path)
        outputs.record(out_path.parent, [out_path.name], by="predict")
    finally:
        tmp.unlink(missing_ok=True)
    return PredictResult(out_path, len(records), correct)
