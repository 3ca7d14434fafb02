"""InstructBLIP (Vicuna-7B): an EVA ViT-g vision tower at a fixed 224 px, a Q-Former whose 32 learned queries read
the image *and the instruction text*, a linear language projection, and a Vicuna (Llama) language model.

transformers 5.x layout (same in 5.17 and 5.23): `vision_model` (`encoder.layers.N.self_attn.qkv/projection`,
`mlp.fc1/fc2`), `query_tokens` (a bare parameter), `qformer` (a BERT encoder with cross-attention),
`language_projection`, `language_model` (a LlamaForCausalLM: `language_model.model.layers.N`,
`language_model.lm_head`). The projector is the Q-Former + query tokens + language projection.

Prompt format (LAVIS `blip2_vicuna_instruct`, which the released checkpoint was instruction-tuned with): no chat
template, no roles. The language model reads `[32 query outputs] <bos> instruction` followed directly by
`answer </s>`; the loss covers the answer and `</s>` only. The Vicuna tokenizer of the checkpoint uses `</s>` as its
bos token. The Q-Former reads the instruction alone (BERT tokenizer, at most 128 tokens, cut from the left).
How records map onto it:
- exactly one image (the Q-Former always reads one; multi-image is Unsupported), in the user message;
- one user turn and, for training, one assistant turn after it: the model was tuned on single-turn instructions and
  its format has no place for earlier turns (a record with several is refused: split it into one record per answer);
- a system message is prepended to the instruction (with a newline) for the language model only; the Q-Former
  reads the user's text.

Image tokens: transformers 5's processor puts `num_query_tokens` image tokens before the tokenized text (before
bos). vlmtune's template renders one `<image>` there and `InstructBlipImageTextProcessor` expands it, so the
rendered text says where the image is (`image_placeholder = "<image>"`, 32 tokens per image whatever its size).

Speed switches: the chunked loss (on `language_model.lm_head`), fused LoRA and the frozen vision tower without grad
(`vision_model`) apply through the prefixes below; packing, varlen vision attention and M-RoPE positions are declined
in the capability map with the reason. `method.lora.adapt_projector` puts adapters on the Q-Former's layers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import BatchFeature, InstructBlipProcessor

from vlmtune.errors import VlmtuneError
from vlmtune.families.base import FamilyDescriptor, UpstreamNamedProcessor, _fix_processor_class
from vlmtune.families.capabilities import Experimental, Supported, Unsupported
from vlmtune.families.tiny import corpus, overlay

if TYPE_CHECKING:
    from transformers import PretrainedConfig, ProcessorMixin

    from vlmtune.config.schema import DataConfig
    from vlmtune.data.records import Record

QFORMER_MAX_TEXT = 128
"""LAVIS `max_txt_len`: Q-Former text tokens (special tokens included), truncated from the left."""


class InstructBlipImageTextProcessor(UpstreamNamedProcessor, InstructBlipProcessor):
    """InstructBlipProcessor that reads the image's place from the text: a text starting with the image token gets
    `num_query_tokens` image tokens there (before whatever the tokenizer adds), a text without it gets them
    prepended when an image is passed (the stock behaviour); a bos token written out next is tokenized apart from
    the instruction after it. The image token is a string here (`image_token`, `image_token_id`), as vlmtune's data
    processing expects. The Q-Former text it returns is the text after the image token (vlmtune replaces it with
    the family's `extra_text_inputs`: the user's instruction alone).

    Trap (transformers 5.17-5.23): the stock `__call__` reads `self.image_token.content`, which fails with
    AttributeError when the tokenizer defines `image_token` (a str). This class does not use it."""

    upstream_class = "InstructBlipProcessor"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, qformer_tokenizer: Any = None,
                 num_query_tokens: int | None = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, qformer_tokenizer, num_query_tokens=num_query_tokens, **kwargs)
        self.image_token = str(getattr(self.image_token, "content", self.image_token))

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        files = super().save_pretrained(save_directory, *args, **kwargs)
        _fix_processor_class(Path(save_directory) / "qformer_tokenizer" / "tokenizer_config.json", self.upstream_class)
        return files

    def _bos_ids(self, text: str) -> list[int]:
        """[bos] when `text` starts with the bos token written out (vlmtune's template): tokenized apart from the
        instruction, as LAVIS did (its tokenizer added bos to the instruction), so the instruction's first word
        gets the word-start piece a SentencePiece tokenizer gives text at its start."""
        bos = self.tokenizer.bos_token
        return [self.tokenizer.bos_token_id] if bos and text.startswith(bos) else []

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.image_token))

    def __call__(self, images: Any = None, text: Any = None, return_tensors: str | None = None,
                 **text_kwargs: Any) -> BatchFeature:
        if text is None:
            raise ValueError("InstructBLIP's processor needs text (the instruction) with the image")
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else images if isinstance(images, (list, tuple)) else [images]
        text_kwargs.pop("images_kwargs", None)
        with_image = [t.startswith(self.image_token) or bool(images) for t in texts]
        if sum(with_image) != len(images) or any(t.count(self.image_token) > t.startswith(self.image_token)
                                                 for t in texts):
            raise ValueError(f"InstructBLIP takes one image per text, at its start ({self.image_token!r} first, or "
                             f"no image token at all): got {len(images)} image(s) for {len(texts)} text(s)")
        rests = [t.removeprefix(self.image_token) for t in texts]
        heads = [self._bos_ids(r) for r in rests]
        encoded = [self.tokenizer(r.removeprefix(self.tokenizer.bos_token) if h else r, **text_kwargs)
                   for r, h in zip(rests, heads, strict=True)]
        queries = [self.image_token_id] * (self.num_query_tokens or 0)
        data: dict[str, Any] = {"input_ids": [], "attention_mask": []}
        for e, w, h in zip(encoded, with_image, heads, strict=True):
            data["input_ids"].append(queries * w + h + list(e["input_ids"]))
            data["attention_mask"].append([1] * (len(queries) * w + len(h)) + list(e["attention_mask"]))
        qformer = self.qformer_tokenizer(rests, truncation=True, max_length=QFORMER_MAX_TEXT, padding=True)
        data["qformer_input_ids"], data["qformer_attention_mask"] = qformer["input_ids"], qformer["attention_mask"]
        if len(texts) > 1:
            data.update(self.tokenizer.pad({k: data[k] for k in ("input_ids", "attention_mask")}))
        if images:
            data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)


# Instruction then answer, nothing between: LAVIS concatenates the instruction's tokens (with bos) and the
# answer's (+ eos). A system message prefixes the instruction. Images render first in the user turn, whatever
# their place in the content (InstructBLIP's image always comes before the prompt).
INSTRUCTBLIP_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% set text = message['content'] if message['content'] is string else message['content'] "
    "| selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}{% set ns.system = text + '\n' %}"
    "{% elif message['role'] == 'user' %}"
    "{% if message['content'] is not string %}"
    "{% for content in message['content'] if content['type'] == 'image' %}<image>{% endfor %}{% endif %}"
    "{{ bos_token }}{{ ns.system }}{{ text }}"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

TINY_IMAGE_SIDE = 56
REAL_IMAGE_SIDE = 224
TINY_QFORMER_VOCAB = 512
QFORMER_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")

_MULTI_IMAGE = ("the Q-Former turns one image into the query tokens (32 in the released model) placed before the "
                "prompt, and the model was tuned with one image per instruction; give each image its own record")
_PACKING = ("InstructBLIP's forward replaces a missing attention_mask with ones, so transformers cannot see where "
            "the packed samples of a row begin: they would attend to each other; remove speed.packing")


@functools.cache
def _tiny_qformer_tokenizer_json() -> str:
    """A lower-casing WordPiece tokenizer (BERT's layout: [CLS] text [SEP]) trained on the tiny corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(
        vocab_size=TINY_QFORMER_VOCAB, special_tokens=list(QFORMER_SPECIAL_TOKENS), show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok.to_str()


def tiny_qformer_tokenizer() -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_qformer_tokenizer_json()), unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]", truncation_side="left")


class InstructBlipFamily(FamilyDescriptor):
    name = "instructblip"
    model_types = ("instructblip",)
    default_model = "Salesforce/instructblip-vicuna-7b"
    description = "InstructBLIP Vicuna-7B: EVA ViT-g at 224 px, Q-Former (32 queries, reads the instruction), Vicuna"

    vision_prefixes = ("vision_model",)
    projector_prefixes = ("qformer", "query_tokens", "language_projection")  # as in memory/models.yaml
    language_prefixes = ("language_model.model",)
    lm_head_names = ("language_model.lm_head",)
    language_layers_prefix = "language_model.model.layers"
    vision_layers_prefix = "vision_model.encoder.layers"
    vision_lora_targets = ("qkv", "projection", "fc1", "fc2")
    projector_layers_prefix = "qformer.encoder.layer"
    projector_lora_targets = ("query", "key", "value", "dense")
    """Every linear layer of the Q-Former's layers (self- and cross-attention, both feed-forward branches)."""

    capabilities = {
        "lora": Supported(), "qlora": Supported(), "full": Supported(),
        "adapt_vision_tower": Supported("LoRA on the EVA ViT blocks (qkv, projection, fc1, fc2)"),
        "adapt_projector": Supported("LoRA on the Q-Former's layers (query, key, value, dense); the query tokens "
                                     "and the language projection stay frozen"),
        "train_projector": Supported("the Q-Former and the language projection train fully; the 32 learned query "
                                     "tokens (a bare parameter, which PEFT's modules_to_save cannot hold) stay "
                                     "frozen"),
        "unfreeze_vision_tower": Supported("LAVIS kept the ViT frozen in instruction tuning"),
        "quantize_vision_tower": Experimental("4-bit EVA ViT layers are untested for accuracy; keep them 16-bit"),
        "quantize_lm_head": Experimental("a 4-bit lm_head costs accuracy for little memory"),
        "flash_attention_2": Experimental("needs the flash-attn package; sdpa already runs flash kernels"),
        "fp16": Supported(),
        "pixel_bounds": Unsupported("InstructBLIP sees every image at the ViT's fixed resolution (224 px); remove "
                                    "data.min_pixels / data.max_pixels"),
        "multi_image": Unsupported(_MULTI_IMAGE),
        "packing": Unsupported(_PACKING),
        "varlen_vision_attention": Unsupported("the EVA ViT attends over each image's 257 patches as one fixed-size "
                                               "sequence (no cu_seqlens); plain SDPA already runs it batched"),
        "mrope_positions": Unsupported("Vicuna uses 1-D rotary positions; there are no M-RoPE positions to build"),
    }
    image_placeholder = "<image>"
    end_of_turn = "</s>"
    chat_template = INSTRUCTBLIP_TEMPLATE
    dynamic_resolution = False
    processor_class = InstructBlipImageTextProcessor

    # The checkpoint's Vicuna tokenizer: bos = eos = unk = "</s>", pad "[PAD]", image token "<image>".
    tiny_special_tokens = ("<unk>", "<s>", "</s>", "[PAD]", "<image>")
    tiny_token_roles = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "[PAD]"}
    tiny_add_bos = True

    tiny_numbers: Mapping[str, Any] = {
        "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                        "rms_norm_eps": 1e-5},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": TINY_IMAGE_SIDE, "patch_size": 14},
        # cross-attention in every layer (the real one: every 2nd of 12), so both tiny layers read the image
        "qformer_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "cross_attention_frequency": 1,
                           "max_position_embeddings": QFORMER_MAX_TEXT, "vocab_size": TINY_QFORMER_VOCAB},
        "num_query_tokens": 4,
    }
    architectures = {
        # Salesforce/instructblip-vicuna-7b: EVA ViT-g (39 layers, 1408 wide, 224 px), Q-Former (12 layers, 768
        # wide, cross-attention every 2nd layer, BERT vocab + [DEC]), 32 queries, Vicuna-7B (vocab padded to 32064).
        "7b": {
            "text_config": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
            "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                              "num_attention_heads": 16, "image_size": REAL_IMAGE_SIDE, "patch_size": 14},
            "qformer_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                               "num_attention_heads": 12, "cross_attention_frequency": 2,
                               "max_position_embeddings": 512, "vocab_size": 30523},
            "num_query_tokens": 32,
        },
    }

    # ---- records ----
    def record_problem(self, record: Record) -> str | None:
        roles = [m.role for m in record.messages]
        body = roles[1:] if roles[:1] == ["system"] else roles
        if body not in (["user"], ["user", "assistant"]):
            return (f"{self.name} takes one instruction and one answer (an optional system message, one user message, "
                    f"one assistant message); this record has {' -> '.join(roles)}. InstructBLIP was tuned on "
                    "single-turn instructions and its prompt has no place for earlier turns: split the conversation "
                    "into one record per answer")
        user = record.messages[roles.index("user")]
        if len(record.images) != 1 or not user.images:
            return (f"{self.name} needs exactly one image per record, in the user message (the Q-Former always reads "
                    f"an image); this record has {len(record.images)}, {len(user.images)} of them in the user message")
        return None

    def extra_text_inputs(self, record: Record, processor: ProcessorMixin) -> dict[str, torch.Tensor]:
        """The Q-Former's text: the user message's text (the instruction), as LAVIS feeds it."""
        user = next(m for m in reversed(record.messages) if m.role == "user")
        out = processor.qformer_tokenizer(user.text, truncation=True, max_length=QFORMER_MAX_TEXT,
                                          return_tensors="pt")
        return {"qformer_input_ids": out["input_ids"][0], "qformer_attention_mask": out["attention_mask"][0]}

    # ---- processor ----
    def load_processor(self, path: str | Path, data_cfg: DataConfig | None = None) -> ProcessorMixin:
        processor = super().load_processor(path, data_cfg)
        if not processor.num_query_tokens:  # older saved processors: the model's config has it
            config = Path(path) / "config.json"
            queries = json.loads(config.read_text(encoding="utf-8")).get("num_query_tokens") \
                if config.is_file() else None
            if not queries:
                raise VlmtuneError(f"the {self.name} processor in '{path}' does not say how many query tokens an "
                                   "image becomes (num_query_tokens) and no config.json beside it does")
            processor.num_query_tokens = int(queries)
        return processor

    def _configure_image_processor(self, processor: ProcessorMixin, data_cfg: DataConfig) -> None:
        self._check_fixed_resolution(processor.image_processor.size.height, data_cfg)

    def image_token_count(self, height: int, width: int, processor: ProcessorMixin) -> int:
        return int(processor.num_query_tokens)

    # ---- tiny models ----
    def tiny_config(self, token_ids: Mapping[str, int], vocab_size: int,
                    arch: Mapping[str, Any] | None) -> PretrainedConfig:
        from transformers import InstructBlipConfig

        numbers = overlay(self.tiny_numbers, arch)
        text = overlay({"vocab_size": vocab_size}, numbers["text_config"])
        text.update(model_type="llama", bos_token_id=token_ids["</s>"], eos_token_id=token_ids["</s>"],
                    pad_token_id=token_ids["[PAD]"], tie_word_embeddings=False)
        vision = numbers["vision_config"]
        qformer = {**numbers["qformer_config"], "encoder_hidden_size": vision["hidden_size"]}
        return InstructBlipConfig(**{**numbers, "text_config": text, "qformer_config": qformer},
                                  image_token_index=token_ids["<image>"])

    def tiny_processor(self, tokenizer: Any, config: PretrainedConfig, full_size: bool) -> ProcessorMixin:
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        side = config.vision_config.image_size
        image_processor = BlipImageProcessorPil(size={"height": side, "width": side}, image_mean=OPENAI_CLIP_MEAN,
                                                image_std=OPENAI_CLIP_STD)
        return self.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    qformer_tokenizer=tiny_qformer_tokenizer(),
                                    num_query_tokens=config.num_query_tokens, chat_template=self.chat_template)


DESCRIPTOR = InstructBlipFamily()
