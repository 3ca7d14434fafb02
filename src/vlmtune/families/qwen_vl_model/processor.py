"""Images and text for the Qwen-VL port, read from and saved in the Hub checkpoint's layout.

The Hub checkpoint has no processor files: its tokenizer is `qwen.tiktoken` (+ `tokenizer_config.json` naming the
remote `QWenTokenizer`), its image transform lives in `visual.py` (bicubic resize to `visual.image_size` square,
CLIP mean / std). So a folder is read from `qwen.tiktoken` and `config.json`'s `visual`, or from the
`processor_config.json` vlmtune writes beside them (adapter folders have no config.json). `save_pretrained` writes
`qwen.tiktoken`, the remote `tokenizer_config.json` (so the original code loads an export) and that
`processor_config.json` (which the original code ignores).

The chat template renders each image as `<img><imgpad></img>`; the processor puts one `<imgpad>` per resampler
query (256) in place of the one, and the model fills those positions with the image's features.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature

from vlmtune.errors import VlmtuneError
from vlmtune.families.qwen_vl_model.configuration import DEFAULT_QUERIES
from vlmtune.families.qwen_vl_model.tokenizer import VOCAB_FILE, load_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "processor_config.json"
REMOTE_TOKENIZER_CONFIG = {
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}
"""The Hub checkpoint's tokenizer_config.json (the remote tokenizer reads qwen.tiktoken beside it)."""
REMOTE_CODE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "visual.py", "tokenization_qwen.py",
                     "qwen_generation_utils.py", "SimSun.ttf")
"""The checkpoint's own remote-code files. vlmtune never imports them; a save copies those present in the folder it
was loaded from, so an export of a downloaded checkpoint loads with the original code as the checkpoint did."""


class QwenVLImageProcessor:
    """What the original's `image_transform` does to a PIL image: bicubic resize to side x side (PIL's resize, which
    torchvision's Resize calls for PIL images), scale to [0, 1], normalise with CLIP's mean and std."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        from PIL import Image

        images = images if isinstance(images, (list, tuple)) else [images]
        mean, std = np.array(CLIP_MEAN, dtype=np.float32), np.array(CLIP_STD, dtype=np.float32)
        rows = []
        for image in images:
            resized = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            array = (np.asarray(resized, dtype=np.float32) / 255.0 - mean) / std
            rows.append(torch.from_numpy(array.transpose(2, 0, 1).copy()))
        return BatchFeature({"pixel_values": torch.stack(rows)}, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:
        return {"image_processor_type": "QwenVLImageProcessor", "image_size": self.image_size,
                "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}


class QwenVLProcessor:
    """Tokenizer + image processor with the interface vlmtune's data processing and predict use: `__call__(text,
    images)`, `apply_chat_template`, `tokenizer`, `image_processor`, `image_token` / `image_token_id`."""

    image_token = "<imgpad>"

    def __init__(self, tokenizer: Any, image_processor: QwenVLImageProcessor, queries: int, vocab_file: Path,
                 chat_template: str | None = None):
        self.tokenizer, self.image_processor, self.queries = tokenizer, image_processor, queries
        self.vocab_file, self.chat_template = vocab_file, chat_template

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.image_token))

    @classmethod
    def from_pretrained(cls, path: str | Path, chat_template: str | None = None) -> QwenVLProcessor:
        from vlmtune.hub import model_folder

        folder = model_folder(path)  # a hub id: its snapshot in the HF cache (downloaded where the hub is reachable)
        if not folder.is_dir():
            raise VlmtuneError(f"'{path}' (model.name_or_path) is not a folder on this machine, nor a hub id "
                               "(owner/name); check the path")
        settings = cls._image_settings(folder)
        return cls(load_tokenizer(folder), QwenVLImageProcessor(settings["image_size"]), settings["queries"],
                   folder / VOCAB_FILE, chat_template)

    @staticmethod
    def _image_settings(folder: Path) -> dict[str, int]:
        own, config = folder / PREPROCESSOR_FILE, folder / "config.json"
        try:
            if own.is_file():
                data = json.loads(own.read_text(encoding="utf-8"))
                if data.get("image_processor_type") == "QwenVLImageProcessor":
                    return {"image_size": int(data["image_size"]), "queries": int(data["image_tokens"])}
            if config.is_file():
                visual = json.loads(config.read_text(encoding="utf-8")).get("visual") or {}
                if "image_size" in visual:
                    return {"image_size": int(visual["image_size"]),
                            "queries": int(visual.get("n_queries", DEFAULT_QUERIES))}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VlmtuneError(f"cannot read the Qwen-VL image settings in {folder}: {exc}; the folder looks "
                               "damaged") from exc
        raise VlmtuneError(f"{folder} has neither {PREPROCESSOR_FILE} (written by vlmtune) nor a config.json with "
                           "a `visual` section (the Hub checkpoint's): the image size is unknown. Point at the whole "
                           "downloaded checkpoint folder.")

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any:
        kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def __call__(self, text: Any = None, images: Any = None, return_tensors: str | None = None,
                 **kwargs: Any) -> BatchFeature:
        if text is None:
            raise ValueError("the Qwen-VL processor needs text (the rendered chat) with the images")
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        found = sum(t.count(self.image_token) for t in texts)
        if found != len(images):
            raise ValueError(f"Qwen-VL: {found} {self.image_token} token(s) in the text for {len(images)} image(s); "
                             f"the chat template writes one per image")
        expanded = [t.replace(self.image_token, self.image_token * self.queries) for t in texts]
        kwargs.pop("images_kwargs", None)
        data = dict(self.tokenizer(expanded, **kwargs))
        if images:
            data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> list[str]:
        """qwen.tiktoken (the file read, byte for byte), the remote tokenizer_config.json, the checkpoint's remote
        code files where the source folder has them, and vlmtune's processor_config.json."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        vocab = out / VOCAB_FILE
        if self.vocab_file.resolve() != vocab.resolve():
            shutil.copyfile(self.vocab_file, vocab)
        (out / "tokenizer_config.json").write_text(json.dumps(REMOTE_TOKENIZER_CONFIG, indent=2) + "\n",
                                                   encoding="utf-8")
        for name in REMOTE_CODE_FILES:
            source = self.vocab_file.parent / name
            if source.is_file() and source.resolve() != (out / name).resolve():
                shutil.copyfile(source, out / name)
        settings = {**self.image_processor.to_dict(), "image_tokens": self.queries}
        (out / PREPROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        return [str(vocab), str(out / "tokenizer_config.json"), str(out / PREPROCESSOR_FILE)]
