"""The model-family contract: one `FamilyDescriptor` instance per VLM family (see docs/ARCHITECTURE.md).

Generic code (methods, data, train) only reads descriptor attributes; it never names a family. Module prefixes are
transformers 5 names as instantiated (`model.language_model.layers.N...`), checked by tests on tiny models.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from vlmtune.errors import ConfigError, VlmtuneError
from vlmtune.families.capabilities import Capability, check_capabilities

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, ProcessorMixin

    from vlmtune.config.schema import DataConfig, VlmtuneConfig
    from vlmtune.data.records import Record
    from vlmtune.families.linear_attention import LinearAttentionKernel

LoraKind = Literal["minimal", "attention", "all"]
Component = Literal["vision", "projector", "language", "lm_head"]

LORA_TARGET_SETS: dict[str, tuple[str, ...]] = {
    "minimal": ("q_proj", "v_proj", "o_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}

_PEFT_WRAPPER = "base_model.model."


def _fix_processor_class(path: Path, name: str) -> None:
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if "processor_class" in data:
            data["processor_class"] = name
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class UpstreamNamedProcessor:
    """Mixin for our processor subclasses: saved folders name the upstream class (`processor_class`), so what we
    write loads with plain transformers elsewhere (e.g. a GPU machine with torchvision, vLLM) like the original."""

    upstream_class: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()  # type: ignore[misc]
        data["processor_class"] = self.upstream_class
        return data

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        files = super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        # ProcessorMixin.save_pretrained stamps the tokenizer config with our class name; put the upstream one back.
        _fix_processor_class(Path(save_directory) / "tokenizer_config.json", self.upstream_class)
        return files


def _has_prefix(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class FamilyDescriptor(ABC):
    """Everything vlmtune knows about one VLM family. Subclasses set the class attributes below."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    """HF `config.model_type` values of this family."""
    default_model: ClassVar[str]
    description: ClassVar[str] = ""

    vision_prefixes: ClassVar[tuple[str, ...]]
    """Vision tower (the projector may lie inside it: the longest prefix wins, see `component_of`)."""
    projector_prefixes: ClassVar[tuple[str, ...]]
    language_prefixes: ClassVar[tuple[str, ...]]
    lm_head_names: ClassVar[tuple[str, ...]]
    language_layers_prefix: ClassVar[str]
    """The decoder-layer list of the language model; LoRA targets are matched only below it."""
    vision_layers_prefix: ClassVar[str]
    """The vision tower's block list; vision LoRA targets are matched only below it."""
    lora_target_sets: ClassVar[Mapping[str, tuple[str, ...]]] = LORA_TARGET_SETS
    lora_target_parameters: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    """Per target set, parameters (not modules) that get adapters through PEFT's `target_parameters`, named from a
    decoder layer (`mlp.experts.gate_up_proj`): weights held as bare (e.g. fused 3-D expert) parameters that no
    nn.Linear wraps. Sets missing here, and explicit target lists, add none."""
    vision_lora_targets: ClassVar[tuple[str, ...]]
    """Linear-layer leaf names inside the vision blocks (for `method.lora.adapt_vision_tower`)."""
    projector_layers_prefix: ClassVar[str | None] = None
    """The projector's layer list, for families whose projector is a deep network (`method.lora.adapt_projector`)."""
    projector_lora_targets: ClassVar[tuple[str, ...]] = ()
    """Linear-layer leaf names inside the projector's layers; empty: adapt_projector is refused."""
    images_per_sample: ClassVar[bool] = False
    """Whether the model takes its image tensors per sample, (samples, images, ...), instead of concatenated on dim 0
    (Mllama: each sample's text cross-attends to its own images). Data processing then keeps a sample's image
    tensors without the batch dim and the collator stacks them, zero-padded on every dim (`EncodedSample`)."""

    packed_row_attention: ClassVar[Literal["per_sample", "family_mask"]] = "per_sample"
    """How the samples of a packed row (`speed.packing`: positions restarting at 0 per sample, no attention_mask)
    are kept apart in the language model. per_sample: causal attention within each sample, from the positions alone
    (vlmtune's span attention or transformers' block-diagonal mask, `speed.packed_attention`). family_mask: the
    family's attention is not causal-per-sample (Gemma 3's image tokens attend to each other both ways), so it
    builds the row's masks itself in `packed_attention_masks`, which `apply_speed` passes as `attention_mask` to the
    module `packed_mask_module` names (a forward pre-hook); `speed.packed_attention` does not apply. Those masks are
    dense (rows x length^2 booleans per mask type) and SDPA with a mask runs no flash kernel."""
    packed_mask_module: ClassVar[str | None] = None
    """With packed_row_attention=family_mask: the module (name in the transformers model) whose forward takes the
    mask `packed_attention_masks` builds as its `attention_mask`."""
    language_attention_masked: ClassVar[bool] = False
    """The language model hands SDPA an explicit mask on every batch, padded or not (Gemma 3: each image's tokens
    attend to each other both ways), so SDPA's flash kernel never runs there. With a fixed-resolution vision tower
    (`dynamic_resolution` False) `speed.sdpa_cudnn=auto` then keeps cuDNN's attention on: without it the masked
    attention falls to the memory-efficient kernel, and the shapes stay few enough for cuDNN's plan cache
    (speed/attention_backend.py)."""
    packed_span_modules: ClassVar[tuple[str, ...]] = ()
    """Leaf names of language-model modules that carry state along the sequence (e.g. a gated DeltaNet
    `linear_attn`: a recurrent state and a causal conv window), which no attention mask keeps apart: with
    `speed.packing`, `apply_speed` runs each of them once per sample span of a packed row (speed/span_layers.py),
    beside `packed_row_attention` for the attention layers. Their parent module must take `position_ids` and pass its
    other keyword arguments on to them, as transformers' decoder layers do."""

    linear_attention_functions: ClassVar[tuple[str, ...]] = ()
    """transformers' module-level linear-attention functions ("module:function") the family's layers call, which
    transformers binds to flash-linear-attention's kernel whenever `fla` imports
    (`use_kernel_func_from_hub_with_fallback`). Where that kernel cannot train (`linear_attention_kernel`),
    `apply_speed` points them at their PyTorch reference for the run. Empty: the family has no such layers."""
    reference_compile_cost: ClassVar[str | None] = None
    """What torch.compile was measured to cost the linear-attention layers on the PyTorch reference; set, it keeps
    speed.compile=auto eager where they run it (`compile_refusal`)."""

    capabilities: ClassVar[Mapping[str, Capability]]
    image_placeholder: ClassVar[str]
    """What the chat template emits per image (the processor expands its image token to the image's tokens)."""
    end_of_turn: ClassVar[str]
    """The text that closes an assistant turn in the chat template (labelled, so the model learns to stop)."""
    chat_template: ClassVar[str]
    """The Jinja template vlmtune trains and predicts with (set on every processor `load_processor` returns)."""
    dynamic_resolution: ClassVar[bool]
    processor_class: ClassVar[type[ProcessorMixin]]
    architectures: ClassVar[Mapping[str, dict[str, Any]]] = {}
    """Full-size config numbers by size name (e.g. "2b"), for `build_tiny(out, arch="2b")` (benchmarks)."""

    # ---- tiny models (numbers per family; the generic builder is families/tiny.py) ----
    tiny_special_tokens: ClassVar[tuple[str, ...]]
    """Special tokens of the tiny tokenizer, in id order (ids 0..n-1)."""
    tiny_token_roles: ClassVar[Mapping[str, str]]
    """Tokenizer roles -> token, e.g. {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}."""
    tiny_add_bos: ClassVar[bool] = False
    """Whether the tiny tokenizer prepends bos_token with add_special_tokens=True (as Llama's does)."""
    tiny_extra_eos: ClassVar[tuple[str, ...]] = ()
    """Tokens that also stop generation, besides eos_token."""

    def __repr__(self) -> str:
        return f"<FamilyDescriptor {self.name}>"

    # ---- module layout ----
    def component_of(self, name: str) -> Component | None:
        """Which part of the model a parameter or module name belongs to (longest matching prefix wins)."""
        name = name.removeprefix(_PEFT_WRAPPER)
        best: tuple[int, Component | None] = (-1, None)
        groups: tuple[tuple[Component, tuple[str, ...]], ...] = (
            ("vision", self.vision_prefixes), ("projector", self.projector_prefixes),
            ("language", self.language_prefixes), ("lm_head", self.lm_head_names))
        for component, prefixes in groups:
            for prefix in prefixes:
                if _has_prefix(name, prefix) and len(prefix) > best[0]:
                    best = (len(prefix), component)
        return best[1]

    def lora_targets(self, kind: LoraKind | list[str]) -> list[str]:
        """Leaf names of the language-model linear layers for a target set; an explicit list passes through."""
        if isinstance(kind, list):
            return list(kind)
        if kind not in self.lora_target_sets:
            raise ConfigError([f"method.lora.target_modules={kind!r}: use one of "
                               f"{', '.join(self.lora_target_sets)} or a list of module names"])
        return list(self.lora_target_sets[kind])

    def lora_parameter_targets(self, kind: LoraKind | list[str]) -> list[str]:
        """Parameter names (from a decoder layer) that `kind` adapts through PEFT's `target_parameters`."""
        return [] if isinstance(kind, list) else list(self.lora_target_parameters.get(kind, ()))

    def lora_target_regex(self, kind: LoraKind | list[str], adapt_vision_tower: bool = False) -> str:
        """A PEFT `target_modules` regex (PEFT full-matches it against module names) reaching only the language
        model's decoder layers, plus the vision blocks when `adapt_vision_tower`. Short names alone would also hit
        vision towers, which reuse the leaf names (`q_proj`, `gate_proj`, ...)."""
        parts = [_scoped(self.language_layers_prefix, self.lora_targets(kind))]
        if adapt_vision_tower:
            parts.append(_scoped(self.vision_layers_prefix, self.vision_lora_targets))
        return "|".join(f"(?:{p})" for p in parts)

    # ---- capabilities ----
    def check(self, config: VlmtuneConfig) -> list[str]:
        """Problems with `config` for this family, each naming the field and saying why."""
        problems, _ = check_capabilities(self.name, self.capabilities, config)
        if (config.method.name.value in ("lora", "qlora") and config.method.lora.adapt_projector
                and not self.projector_lora_targets):
            problems.append(f"method.lora.adapt_projector: {self.name} names no projector layers for adapters (its "
                            "projector is small); use method.lora.train_projector to train it fully")
        lora = config.method.lora
        if (config.method.name.value in ("lora", "qlora") and lora.dropout and "dropout" in lora.model_fields_set
                and self.lora_parameter_targets(lora.target_modules)):
            problems.append(
                f"method.lora.dropout={lora.dropout}: target_modules={lora.target_modules!r} adapts {self.name}'s "
                f"parameters {self.lora_parameter_targets(lora.target_modules)} through PEFT's target_parameters, "
                "which takes no dropout; set method.lora.dropout: 0 (the default for it), or target_modules: attention")
        return problems + self._check_extra(config)

    def notes(self, config: VlmtuneConfig) -> list[str]:
        """Experimental features `config` asks for (to log, not to fail on)."""
        return check_capabilities(self.name, self.capabilities, config)[1]

    def _check_extra(self, config: VlmtuneConfig) -> list[str]:
        return []

    # ---- kernels ----
    def linear_attention_kernel(self, device: str) -> LinearAttentionKernel | None:
        """Which kernel the linear-attention layers train with on `device`, and why (families/linear_attention.py);
        None where the family has none (`linear_attention_functions`)."""
        if not self.linear_attention_functions:
            return None
        from vlmtune.families.linear_attention import linear_attention_kernel

        return linear_attention_kernel(device)

    def compile_refusal(self, device: str) -> str | None:
        """Why speed.compile=auto should leave this family's layers eager on `device`; None: nothing against it."""
        kernel = self.linear_attention_kernel(device)
        if kernel is None or kernel.name != "torch" or not self.reference_compile_cost:
            return None
        return f"the linear-attention layers run the PyTorch reference ({kernel.reason}); {self.reference_compile_cost}"

    # ---- records and extra model inputs ----
    def record_problem(self, record: Record) -> str | None:
        """Why this family cannot train on (or answer) `record` as it is, e.g. a conversation shape its prompt
        format has no place for; None when it can. Data processing raises it as a DataError naming the line, so
        `vlmtune data check --model ...` reports it before training. Several images where the capability map says
        `multi_image` is Unsupported are refused by data processing itself."""
        return None

    def extra_text_inputs(self, record: Record, processor: ProcessorMixin) -> dict[str, torch.Tensor]:
        """Per-sample model inputs beside the token sequence, built from the record's text (e.g. a
        Q-Former text, `qformer_input_ids` / `qformer_attention_mask`): 1-D tensors, one row per sample in a batch.

        Collation rule (data/collate.py): each is right-padded with 0 to the longest in the batch and stacked, so
        an `*attention_mask` among them masks the padding and padded ids are never attended. Keys the processor also
        returns per text segment are replaced by these. Data processing and `predict` call it; default: none."""
        return {}

    sequence_input_names: ClassVar[tuple[str, ...]] = ()
    """The names `sequence_inputs` returns (data processing drops the processor's per-segment versions)."""

    def sequence_inputs(self, input_ids: torch.Tensor, images: Mapping[str, torch.Tensor],
                        processor: ProcessorMixin) -> dict[str, torch.Tensor]:
        """Per-token model inputs that depend on the whole token sequence, built after its segments are joined:
        tensors of shape (length, ...) (Mllama's `cross_attention_mask`: which images each token attends to, from
        the image tokens' positions). They replace processor outputs of the same names, are cut with the sequence and
        padded with 0 on every dim by the collator. Default: none."""
        return {}

    def packed_attention_masks(self, inputs: Mapping[str, Any], text_config: Any) -> Mapping[str, Any] | None:
        """With packed_row_attention=family_mask: the masks of a packed batch, from the keyword inputs of
        `packed_mask_module`'s forward (no attention_mask there): boolean, True where a query may attend to a key,
        (rows, 1, length, length), keyed as the module takes them; None where `inputs` is not a packed batch."""
        raise NotImplementedError(f"{self.name} keeps packed samples apart by their positions (per_sample)")

    # ---- processor ----
    def load_processor(self, path: str | Path, data_cfg: DataConfig | None = None) -> ProcessorMixin:
        """The family's processor (image processor + tokenizer, never a bare tokenizer) with vlmtune's chat
        template and `data_cfg`'s image size settings applied."""
        try:
            processor = self.processor_class.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise VlmtuneError(
                f"cannot load the {self.name} processor from '{path}': {exc}. The folder needs the tokenizer files "
                "and preprocessor_config.json / processor_config.json (what save_pretrained writes); for a hub id, "
                "the model must be downloaded or the hub reachable.") from exc
        if not isinstance(processor, self.processor_class) or getattr(processor, "image_processor", None) is None:
            raise VlmtuneError(f"'{path}' gave a {type(processor).__name__}, not a {self.name} processor with an "
                               "image processor; check that the folder holds a complete processor.")
        processor.chat_template = self.chat_template
        if data_cfg is not None:
            self._configure_image_processor(processor, data_cfg)
        return processor

    @abstractmethod
    def _configure_image_processor(self, processor: ProcessorMixin, data_cfg: DataConfig) -> None:
        """Apply data.image_size / min_pixels / max_pixels (or reject them, for fixed-resolution families)."""

    def _check_fixed_resolution(self, side: int, data_cfg: DataConfig) -> None:
        """For a family whose vision tower sees every image at `side` x `side` px. data.image_size bounds an image's
        side ("fit in image_size x image_size"), so `side` or more is met as it is (a preset's 336 px suits a 224 px
        tower); a smaller bound cannot be met and is refused, as are per-image pixel bounds."""
        problems = []
        if data_cfg.image_size is not None and data_cfg.image_size < side:
            problems.append(f"data.image_size={data_cfg.image_size}: {self.name} sees every image at its vision "
                            f"tower's fixed resolution of {side} px, which cannot be lowered; remove data.image_size "
                            f"or set it to {side} or more")
        if data_cfg.min_pixels is not None or data_cfg.max_pixels is not None:
            problems.append(f"data.min_pixels / data.max_pixels: {self.name} has no dynamic resolution "
                            f"(every image is {side}x{side} px); remove them")
        if problems:
            raise ConfigError(problems)

    @abstractmethod
    def image_token_count(self, height: int, width: int, processor: ProcessorMixin) -> int:
        """Tokens the language model sees for one image of `height` x `width` pixels with this processor: what the
        processor puts in place of the template's one image token (the image tokens, plus any text it wraps them in,
        as SmolVLM's tile markers or Gemma 3's `<start_of_image>` ... `<end_of_image>` and blank lines)."""

    # ---- tiny models ----
    @abstractmethod
    def tiny_config(self, token_ids: Mapping[str, int], vocab_size: int,
                    arch: Mapping[str, Any] | None) -> PretrainedConfig:
        """The model config: tiny numbers, overlaid with `arch`; token ids from the tiny tokenizer."""

    @abstractmethod
    def tiny_processor(self, tokenizer: Any, config: PretrainedConfig, full_size: bool) -> ProcessorMixin:
        """A processor matching `config` (patch size, image size) around `tokenizer`; `full_size` gives the real
        checkpoint's image defaults instead of the tiny ones."""

    def image_features(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> Any:
        """Run the vision tower (and projector) on image-processor `inputs`, as the model's own forward does: what
        the multi-process keep-alive runs on a batch without images (train/vision_keepalive.py)."""
        return model.get_image_features(**inputs)

    def tiny_init(self, model: torch.nn.Module) -> None:
        """Change the tiny model's random weights where the architecture's own initialisation would hide what the
        tests must exercise (Mllama's cross-attention gates start at 0, which cuts the images off). Default: none."""
        return None

    def build_tiny(self, out_dir: str | Path, arch: str | Mapping[str, Any] | None = None, *, seed: int = 0,
                   with_weights: bool | None = None, device: str = "cpu") -> Path:
        """Write a tiny model of this family (config, random weights, trained tokenizer, image processor, chat
        template) loadable with `AutoModelForImageTextToText.from_pretrained` and `load_processor`.

        `arch` (a size name from `architectures` or a dict of config numbers, nested `text_config` /
        `vision_config` allowed) builds that architecture instead; then only config + processor are written unless
        `with_weights` (use `model.random_init`); `device` "cuda" builds those weights on the GPU in bf16."""
        from vlmtune.families.tiny import build_tiny

        if isinstance(arch, str):
            if arch not in self.architectures:
                known = ", ".join(self.architectures)
                raise VlmtuneError(f"unknown {self.name} architecture '{arch}'; known: {known}")
            arch = self.architectures[arch]
        return build_tiny(self, Path(out_dir), arch, seed=seed,
                          with_weights=arch is None if with_weights is None else with_weights, device=device)


def _scoped(layers_prefix: str, leaves: list[str] | tuple[str, ...]) -> str:
    names = "|".join(re.escape(leaf) for leaf in leaves)
    return rf"{re.escape(layers_prefix)}\.\d+\.(?:[\w.]+\.)?(?:{names})"
