"""Qwen-VL (Qwen/Qwen-VL-Chat, Qwen/Qwen-VL) as a transformers model: `transformer` (word embeddings `wte`,
decoder blocks `h`, final norm `ln_f`, vision side `visual`) and an untied `lm_head`, the checkpoint's names.

Images: the processor writes `<img>`, one `<imgpad>` per resampler query (256), `</img>`; this model puts the image
features on the `<imgpad>` positions, in order. The original tokenizer writes the image's path there instead
and its model overwrites the whole span between `<img>` and `</img>` with the features: the same hidden states.
The loss is the mean next-token cross-entropy over labelled positions (transformers' causal-LM loss, which the
original's CrossEntropyLoss equals when no `num_items_in_batch` is passed).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from vlmtune.families.qwen_vl_model.configuration import IMAGE_OFFSET, QwenVLConfig
from vlmtune.families.qwen_vl_model.language import (
    QwenAttention,
    QwenBlock,
    RMSNorm,
    RotaryEmbedding,
    ntk_alpha,
)
from vlmtune.families.qwen_vl_model.visual import Resampler, VisionTransformer, sincos_2d


class QwenVLPreTrainedModel(PreTrainedModel):
    config_class = QwenVLConfig
    config: QwenVLConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QwenBlock", "VisionBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r"attn\.masked_bias", r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, QwenAttention):
            # the original scales output projections by 1 / sqrt(2 x layers) (GPT-2's rule)
            init.normal_(module.c_proj.weight, std=std / math.sqrt(2 * self.config.num_hidden_layers))
        elif isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.copy_(module.pos_embed, sincos_2d(module.pos_embed.shape[1], module.grid))
            init.xavier_uniform_(module.attn.in_proj_weight)
            init.zeros_(module.attn.in_proj_bias)
        elif isinstance(module, VisionTransformer):
            width, out = module.positional_embedding.shape[1], module.proj.shape[0]
            init.normal_(module.positional_embedding, std=width ** -0.5)
            init.normal_(module.proj, std=out ** -0.5)


class QwenVLModel(QwenVLPreTrainedModel):
    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.rotary_emb = RotaryEmbedding(config)
        self.h = nn.ModuleList(QwenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.visual = VisionTransformer(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """(images, queries, hidden) for pixel_values (images, 3, side, side)."""
        return self.visual(pixel_values)

    def _place_images(self, input_ids: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        slots = input_ids == self.config.image_pad_id
        features = features.to(embeds.dtype)
        if int(slots.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(f"Qwen-VL: {int(slots.sum())} <imgpad> tokens in the input for {features.shape[0]} "
                             f"image(s) of {features.shape[1]} tokens each; each image needs exactly "
                             f"{features.shape[1]} <imgpad> tokens between <img> and </img>")
        return embeds.masked_scatter(slots.unsqueeze(-1), features.reshape(-1, features.shape[-1]))

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, **kwargs: object) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Qwen-VL: give exactly one of input_ids and inputs_embeds")
        # after the prefill, a decoding step's input has no <imgpad> left: the images are in the cache. The tower
        # runs before the word embeddings, where vlmtune's multi-process keep-alive runs it for a batch without
        # images (a pre-hook on `wte`), so every rank runs the modules in the same order.
        features = None
        if pixel_values is not None and input_ids is not None and bool((input_ids == self.config.image_pad_id).any()):
            features = self.get_image_features(pixel_values)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        hidden = self.drop(inputs_embeds)
        if features is not None:
            hidden = self._place_images(input_ids, hidden, features)

        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        length = hidden.shape[1]
        positions = torch.arange(past, past + length, device=hidden.device)

        if self.config.use_dynamic_ntk and not self.training and past == 0:
            self.rotary_emb.alpha = ntk_alpha(length, self.config.seq_length)
        logn = None
        if self.config.use_logn_attn and not self.training and past + length > self.config.seq_length:
            index = (positions + 1).float()
            scale = torch.where(index > self.config.seq_length, index.log() / math.log(self.config.seq_length),
                                torch.ones_like(index))
            logn = scale[None, None, :, None]

        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  past_key_values=past_key_values, position_ids=positions.unsqueeze(0))
        rotary = self.rotary_emb(positions)
        for block in self.h:
            hidden = block(hidden, rotary, attention_mask=mask, logn=logn, past_key_values=past_key_values,
                           **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden),
                                       past_key_values=past_key_values if use_cache else None)


class QwenVLForCausalLM(QwenVLPreTrainedModel, GenerationMixin):
    """The checkpoint's `QWenLMHeadModel` (its `architectures` entry), without remote code."""

    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.transformer = QwenVLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.transformer.get_image_features(pixel_values)

    @property
    def chat_stop_ids(self) -> list[int]:
        """`<|endoftext|>`, `<|im_end|>`, `<|im_start|>`: where the original's `chat()` stops (eos + ChatML stop
        words). The special tokens are contiguous, so their ids follow from `<img>`'s (`visual.image_start_id`)."""
        end_of_text = self.config.image_start_id - IMAGE_OFFSET
        return [end_of_text, end_of_text + 2, end_of_text + 1]

    def generate(self, *args: object, **kwargs: object) -> torch.LongTensor:
        """As transformers' generate, also stopping at the ChatML stop words unless `eos_token_id` is given: the
        Hub's generation_config.json names only `<|endoftext|>`, and the original code adds them in `chat()`."""
        if "eos_token_id" not in kwargs:
            configured = self.generation_config.eos_token_id
            configured = [] if configured is None else [configured] if isinstance(configured, int) else configured
            kwargs["eos_token_id"] = list(dict.fromkeys([*configured, *self.chat_stop_ids]))
        return super().generate(*args, **kwargs)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs: object) -> CausalLMOutputWithPast:
        out = self.transformer(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                               position_ids=position_ids, past_key_values=past_key_values,
                               inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
