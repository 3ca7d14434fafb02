"""The fused LoRA layer's redrawn dropout mask on the GPU (speed/fused_lora.py): with dropout, `LoraLinearFunction`
keeps its input and the generator's state and draws the mask again in backward. On CUDA that relies on Philox drawing
the same mask from the same seed and offset for the same tensor, as torch.utils.checkpoint's dropout replay does.
This runs three layers reading one input (q/k/v_proj), W3's shapes (Qwen2.5-VL-7B, 4 x 767 tokens, bf16), and
compares outputs and gradients with the same layers written out with PyTorch's dropout from the same seed:

    python3 -m benchmarks.dropout_replay_check            # prints PASS or FAIL with the largest differences
"""

from __future__ import annotations

import argparse
import sys

import torch


def check(tokens: int, hidden: int, out: int, rank: int, p: float, device: str, dtype: torch.dtype) -> list[str]:
    from vlmtune.speed.fused_lora import LoraLinearFunction

    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_(True)
    weights = [(torch.randn(out, hidden, generator=gen) / hidden**0.5).to(device, dtype) for _ in range(3)]
    adapters = [((torch.randn(rank, hidden, generator=gen) / hidden**0.5).to(device, dtype).requires_grad_(True),
                 (torch.randn(out, rank, generator=gen) / rank).to(device, dtype).requires_grad_(True))
                for _ in range(3)]
    grads = [torch.randn(tokens, out, generator=gen).to(device, dtype) for _ in range(3)]

    def grads_of(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        got = [t.grad.clone() for t in tensors]
        for t in tensors:
            t.grad = None
        return got

    leaves = [x] + [t for pair in adapters for t in pair]
    torch.manual_seed(123)
    fused = [LoraLinearFunction.apply(x, None, w, None, a, b, a, b, 2.0, p) for w, (a, b) in zip(
        weights, adapters, strict=True)]
    state = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
    torch.autograd.backward(fused, grads)
    after = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
    got = grads_of(leaves)
    torch.manual_seed(123)
    plain = [x @ w.t() + 2.0 * (torch.nn.functional.dropout(x, p, training=True) @ a.t()) @ b.t()
             for w, (a, b) in zip(weights, adapters, strict=True)]
    torch.autograd.backward(plain, grads)
    want = grads_of(leaves)
    problems = []
    if not torch.equal(state, after):
        problems.append("the backward moved the random generator")
    names = ["x"] + [f"{n}{i}" for i in range(3) for n in ("A", "B")]
    for name, g, w in zip(names + [f"out{i}" for i in range(3)], got + fused, want + plain, strict=True):
        g, w = g.detach().double(), w.detach().double()
        cos = torch.nn.functional.cosine_similarity(g.flatten(), w.flatten(), dim=0).item()
        rel = ((g - w).norm() / w.norm()).item()
        if cos < 0.9999 or rel > 2e-2:
            problems.append(f"{name}: cosine {cos:.6f}, relative difference {rel:.2e}")
    return problems


def hash_check(tokens: int, hidden: int, p: float, device: str) -> list[str]:
    """speed.hash_dropout's mask (speed/hash_dropout.py) compiled by inductor (Triton on CUDA) against eager: the
    same integer arithmetic, so the same mask bit for bit, and a keep rate of 1 - p."""
    from vlmtune.speed.hash_dropout import keep_mask

    seed = torch.tensor(987654321, device=device)
    shape = torch.Size([tokens, hidden])
    eager = keep_mask(shape, seed, p, torch.device(device))
    compiled = torch.compile(keep_mask)(shape, seed, p, torch.device(device))
    problems = []
    if not torch.equal(eager, compiled):
        problems.append(f"hash mask: compiled differs from eager in {(eager != compiled).sum().item()} elements")
    rate = eager.float().mean().item()
    if abs(rate - (1 - p)) > 0.002:
        problems.append(f"hash mask keeps {rate:.4f}, not {1 - p:.4f}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4 * 767)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--out", type=int, default=3584)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--hash", action="store_true", help="also speed.hash_dropout's mask, compiled against eager")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    problems = check(args.tokens, args.hidden, args.out, args.rank, args.p, device, dtype)
    print(("FAIL " + "; ".join(problems)) if problems else f"PASS redrawn dropout masks ({device}, {dtype})")
    hashed = hash_check(args.tokens, args.hidden, args.p, device) if args.hash else []
    if args.hash:
        print(("FAIL " + "; ".join(hashed)) if hashed else f"PASS hashed dropout masks, compiled = eager ({device})")
    return 1 if problems or hashed else 0


if __name__ == "__main__":
    sys.exit(main())
