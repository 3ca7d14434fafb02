"""SDPA's backends at one attention shape, forward + backward, each alone (`torch.nn.attention.sdpa_kernel`):

    python3 -m benchmarks.sdpa_backends                       # Gemma-3-12B in F5: batch 2 x 775, 16 heads of 256
    python3 -m benchmarks.sdpa_backends --heads 12 --head-dim 128 --batch 4 --length 768   # Qwen2-VL-2B, W1

The mask is Gemma 3's for a training batch, as transformers 5.x builds it for SDPA: boolean (batch, 1, L, L), causal
OR the image's 256 soft tokens (from position 6) attending to each other; keys and values repeated to the query
heads (transformers' sdpa path repeats them whenever there is a mask), queries / keys / values laid out as the
projections give them ((batch, L, heads, dim) transposed). `--no-mask`: causal without a mask (is_causal), what an
unpadded Qwen batch gives SDPA. A backend that cannot take the shape prints why (PyTorch's own warning, shortened).

What it settles (benchmarks/results/2026-12-07-gemma3-step/): with speed.sdpa_cudnn=false SDPA picks the
memory-efficient kernel for Gemma 3's masked 256-wide heads, where the plain loop's SDPA picks cuDNN (first on
Hopper); the times below say what each kernel costs per layer call.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def inputs(batch: int, length: int, heads: int, head_dim: int, device: str, dtype: torch.dtype,
           image_at: int = 6, image_tokens: int = 256):
    g = torch.Generator(device="cpu").manual_seed(0)

    def projected() -> torch.Tensor:
        x = torch.randn(batch, length, heads, head_dim, generator=g, dtype=torch.float32) * 0.5
        return x.to(device, dtype).transpose(1, 2).requires_grad_()

    q, k, v = projected(), projected(), projected()
    index = torch.arange(length, device=device)
    causal = index[None, :] <= index[:, None]
    image = (index >= image_at) & (index < image_at + image_tokens)
    block = image[:, None] & image[None, :]
    mask = (causal | block)[None, None].expand(batch, 1, length, length)
    return q, k, v, mask


def timed(backend: SDPBackend, q, k, v, mask, causal: bool, repeats: int) -> tuple[float, float] | str:
    """(forward ms, backward ms) per call, or why the backend refused."""
    scale = q.shape[-1] ** -0.5
    cuda = q.is_cuda

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    try:
        with sdpa_kernel([backend]), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            forward = backward = 0.0
            for i in range(repeats + 2):
                sync()
                t0 = time.perf_counter()
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=None if causal else mask, is_causal=causal, scale=scale)
                sync()
                t1 = time.perf_counter()
                out.backward(torch.ones_like(out))
                sync()
                t2 = time.perf_counter()
                if i >= 2:
                    forward, backward = forward + t1 - t0, backward + t2 - t1
                q.grad = k.grad = v.grad = None
    except RuntimeError as exc:
        why = [str(w.message).split(".")[0] for w in caught] or [str(exc).splitlines()[0]]
        return "; ".join(dict.fromkeys(why))[:300]
    return forward / repeats * 1e3, backward / repeats * 1e3


def choice(q, k, v, mask, causal: bool, cudnn_on: bool) -> str:
    """The backend SDPA dispatches these inputs to (torch._fused_sdp_choice), with cuDNN's switched on or off."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cudnn_on)
    try:
        picked = torch._fused_sdp_choice(q, k, v, None if causal else mask, 0.0, causal)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
    return next((name for name, b in SDPBackend.__members__.items() if int(b.value) == int(picked)), str(picked))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=775)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=48, help="per-step total: calls x layers (x2 forward: GC)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-mask", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, mask = inputs(args.batch, args.length, args.heads, args.head_dim, device, dtype)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    cudnn = torch.backends.cudnn.version() if device == "cuda" else None
    print(f"{where}, torch {torch.__version__}, cuDNN {cudnn}; q/k/v {tuple(q.shape)} {dtype}, "
          f"{'is_causal, no mask' if args.no_mask else 'boolean mask ' + str(tuple(mask.shape))}")
    print(f"SDPA's own choice: {choice(q, k, v, mask, args.no_mask, cudnn_on=True)} with cuDNN on (the plain loop), "
          f"{choice(q, k, v, mask, args.no_mask, cudnn_on=False)} with it off (speed.sdpa_cudnn=false)")
    print("| backend | forward ms | backward ms | per step (x layers, forward twice: GC) ms |")
    print("|---|---|---|---|")
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                    SDPBackend.MATH):
        result = timed(backend, q, k, v, mask, args.no_mask, args.repeats)
        if isinstance(result, str):
            print(f"| {backend.name} | refused: {result} | | |")
        else:
            fwd, bwd = result
            print(f"| {backend.name} | {fwd:.3f} | {bwd:.3f} | {(2 * fwd + bwd) * args.layers:.1f} |")


if __name__ == "__main__":
    main()
