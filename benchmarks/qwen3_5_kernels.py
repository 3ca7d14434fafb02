"""What Qwen3.5's gated DeltaNet layers cost without their fused kernels (the `linear_attention_kernels` entry of the
qwen3_5 capability map): forward + backward of Qwen3.5-9B decoder layers (3 DeltaNet + 1 gated attention, the real
repeat) in bf16 on one GPU, through transformers' PyTorch reference path and through flash-linear-attention.

    python benchmarks/qwen3_5_kernels.py --kernels torch   # hides the fla package: transformers' reference path
    python benchmarks/qwen3_5_kernels.py --kernels fla     # fla installed (carry its wheels: flash-linear-attention,
                                                           # fla-core, einops)

causal-conv1d (a CUDA build) is absent in both: its reference is one grouped F.conv1d per layer. Prints one JSON
line: milliseconds per step (median of 10 after 3 warm-up steps), tokens/s, peak GiB, and which implementation
transformers picked.
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import statistics
import sys
import time


class _Hide(importlib.abc.MetaPathFinder):
    """Makes `import fla` fail, as on a machine without flash-linear-attention."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name == "fla" or name.startswith("fla."):
            raise ModuleNotFoundError(name)
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernels", choices=["torch", "fla"], required=True)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="CPU, toy widths: checks the script itself")
    args = parser.parse_args()
    if args.kernels == "torch":
        sys.meta_path.insert(0, _Hide())

    import torch
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

    small = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
             "linear_value_head_dim": 16} if args.smoke else {}
    config = Qwen3_5TextConfig(num_hidden_layers=args.layers, vocab_size=1024, **small)  # else the 9B widths
    config._attn_implementation = "sdpa"
    device = "cpu" if args.smoke else "cuda"
    layers = torch.nn.ModuleList(q35.Qwen3_5DecoderLayer(config, i) for i in range(args.layers)).to(device).bfloat16()
    rotary = q35.Qwen3_5TextRotaryEmbedding(config).to(device)
    x = torch.randn(args.batch, args.tokens, config.hidden_size, device=device, dtype=torch.bfloat16,
                    requires_grad=True)
    positions = torch.arange(args.tokens, device=device)[None, None].expand(3, args.batch, -1)
    embeddings = rotary(x, positions)
    mask = None  # causal: SDPA's is_causal for the attention layer, the DeltaNet layers are causal by construction

    def step() -> None:
        h = x
        for layer in layers:
            h = layer(h, position_embeddings=embeddings, attention_mask=mask, position_ids=positions[0])
            h = h[0] if isinstance(h, tuple) else h
        h.float().pow(2).mean().backward()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(10):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1000
    print(json.dumps({
        "kernels": args.kernels, "fla_loaded": "fla" in sys.modules,
        "layer_types": config.layer_types, "tokens": args.tokens, "batch": args.batch, "ms_per_step": round(ms, 1),
        "tokens_per_s": round(args.batch * args.tokens / ms * 1000),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
