#!/usr/bin/env python3
"""Times training steps of the PyTorch routing-transformer library's RoutingTransformerLM on this machine,
for comparison with `sparse-attn bench --model` (model kind `routing`): the same step (forward, next-token loss
+ auxiliary loss, backward, AdamW, k-means update), the same model size and the same thread count.

The library is not a dependency of this project and is not shipped with it: put it (and its imports
einops, local_attention) on PYTHONPATH yourself. Prints one JSON line with the median step time and tokens/s,
and the float32 GEMM rate PyTorch reaches here: Debian's python3-torch runs on whichever libblas.so.3 is
selected, and with the reference BLAS (libblas3 alone) every matmul is ~20x slower than with OpenBLAS
(apt install libopenblas0-pthread) -- a comparison is only fair with an optimised BLAS, so the script
refuses to time the model below --min-gemm-gflops.

  PYTHONPATH=/path/to/libs python3 scripts/torch-routing-lm-step.py --seq-len 8192 --threads 2 --runs 3
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from routing_transformer import RoutingTransformerLM


def gemm_gflops(n=2048, runs=3):
    """Median rate of an n x n float32 matmul (what bench's GEMM probe measures)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--min-gemm-gflops", type=float, default=20.0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    gemm = gemm_gflops()
    if gemm < a.min_gemm_gflops:
        raise SystemExit(f"float32 GEMM runs at {gemm:.1f} GFLOP/s here (reference BLAS?); install an optimised BLAS "
                         f"(e.g. libopenblas0-pthread) or pass --min-gemm-gflops 0 to time it anyway")
    torch.manual_seed(1)
    # As bench --model's `routing`: half the heads local (window = --window, one window back), half routing
    # (clusters = T / window), causal, rotary positions, ff ×4, byte vocabulary.
    model = RoutingTransformerLM(num_tokens=256, dim=a.dim, depth=a.depth, max_seq_len=a.seq_len, heads=a.heads,
                                 dim_head=a.dim // a.heads, window_size=a.window, local_attn_window_size=a.window,
                                 n_local_attn_heads=a.heads // 2, causal=True, ff_mult=4)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (1, a.seq_len), generator=torch.Generator().manual_seed(2))

    def step():
        optimizer.zero_grad()
        logits, aux = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), tokens[:, 1:].reshape(-1)) + aux
        loss.backward()          # the library updates its k-means from a backward hook
        optimizer.step()

    step()                       # warm-up (k-means initialisation)
    times = []
    for _ in range(a.runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1000
    print(json.dumps({"library": "routing-transformer (PyTorch)", "torch": torch.__version__, "threads": a.threads,
                      "seq_len": a.seq_len, "dim": a.dim, "heads": a.heads, "depth": a.depth, "window": a.window,
                      "gemm_gflops": round(gemm, 1), "ms_per_step": round(ms, 1), "tokens_per_s": round(a.seq_len / (ms / 1000), 1)}))


if __name__ == "__main__":
    main()
