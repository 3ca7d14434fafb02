"""The Hub checkpoint's `config.json` (Qwen/Qwen-VL-Chat, Qwen/Qwen-VL) as a transformers config class.

Field names and defaults are those the checkpoint's `configuration_qwen.py` declares, so the file loads as it is
and what `save_pretrained` writes loads with the original remote code again. `visual` stays the plain dict the
checkpoint has (heads, image_size, image_start_id, layers, mlp_ratio, output_dim, patch_size, width; optional
n_queries, default 256). The properties at the end name numbers the rest of vlmtune reads (estimator dims).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

DEFAULT_QUERIES = 256
IMAGE_SPECIAL_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
"""The tokenizer's image special tokens in id order; `<img>` is `visual.image_start_id`, `</img>` +1, `<imgpad>` +2."""
IMAGE_OFFSET = 3 + 205 + 6
"""`<img>`'s id minus `<|endoftext|>`'s: the special tokens are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, 205
`<|extra_N|>`, then the image tokens, `<img>` the 7th of them (151857 - 151643 in the release)."""
REMOTE_ARCHITECTURE = "QWenLMHeadModel"
REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}
"""The Hub checkpoint's auto_map (the remote-code files beside the weights); written on save so the original code
loads vlmtune's exports. vlmtune itself never reads it."""


class QwenVLConfig(PreTrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    scale_attn_weights: bool = True
    use_cache: bool = True
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    kv_channels: int = 128
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_flash_attn: Any = "auto"
    intermediate_size: int = 22016
    """Twice the width of each MLP branch (w1, w2: intermediate_size // 2), as the checkpoint counts it."""
    no_bias: bool = True
    tie_word_embeddings: bool = False
    seq_length: int = 2048
    """The training context: dynamic NTK rotary scaling and log-n attention scaling start beyond it (inference)."""
    visual: dict | None = None
    auto_map: dict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.visual is None:
            self.visual = {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48,
                           "mlp_ratio": 4.9231, "output_dim": 4096, "patch_size": 14, "width": 1664}
        if self.auto_map is None:
            self.auto_map = dict(REMOTE_AUTO_MAP)
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        problems = []
        if self.num_attention_heads * self.kv_channels != self.hidden_size:
            problems.append(f"num_attention_heads x kv_channels ({self.num_attention_heads} x {self.kv_channels}) "
                            f"must equal hidden_size ({self.hidden_size})")
        if self.visual["output_dim"] != self.hidden_size or self.visual["output_dim"] % 128:
            problems.append(f"visual.output_dim ({self.visual['output_dim']}) must equal hidden_size and be a "
                            "multiple of 128 (the resampler has output_dim / 128 heads)")
        if int(self.queries ** 0.5) ** 2 != self.queries:
            problems.append(f"visual.n_queries ({self.queries}) must be a square (the queries form a grid)")
        if problems:
            raise ValueError("Qwen-VL config.json: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """As the Hub writes it: `architectures` names the original class (`save_pretrained` would write this
        port's class name there), so the remote code's `auto_map` and tools reading `architectures` see the
        checkpoint they know."""
        data = super().to_dict()
        data["architectures"] = [REMOTE_ARCHITECTURE]
        return data

    # ---- derived numbers ----
    @property
    def queries(self) -> int:
        """Image tokens per image (the resampler's learned queries)."""
        return int(self.visual.get("n_queries", DEFAULT_QUERIES))

    @property
    def image_start_id(self) -> int:
        return int(self.visual["image_start_id"])

    @property
    def image_pad_id(self) -> int:
        """`<imgpad>`: the token whose positions receive the image features."""
        return self.image_start_id + 2

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size // 2

    @property
    def vision_width(self) -> int:
        return int(self.visual["width"])

    @property
    def vision_depth(self) -> int:
        return int(self.visual["layers"])

    @property
    def vision_mlp_width(self) -> int:
        return int(self.visual["width"] * self.visual["mlp_ratio"])
