"""Tokens/s of one TopK SAE training step (forward + backward, no optimizer) on CPU, by path.

Paths, interleaved over repeats (median time each):
  floor     one dense encoder product (x - b_dec) @ W_enc, no grad: the least any step must pay
  dense     plain dense torch: autograd through topk/gather (dense [B, F] grad), decode by dense
            scatter + matmul
  autograd  what TopK SAEs did before kernels/: autograd topk + F.embedding_bag decode
  torch     kernels' torch path: topk_encode + sparse_decode (sparse backward everywhere)

    python benchmarks/train_step.py [--d-in 768 --latents 16384 --k 32 --tokens 4096 --repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sae_kit.kernels import topk_encode
from sae_kit.kernels.reference import densify
from sae_kit.kernels.torch_path import sparse_decode_torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    d, n, k, B = args.d_in, args.latents, args.k, args.tokens

    W_dec = torch.randn(n, d)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {
        "W_enc": W_dec.T.clone().requires_grad_(),
        "b_enc": torch.zeros(n, requires_grad=True),
        "b_dec": torch.zeros(d, requires_grad=True),
        "W_dec": W_dec.requires_grad_(),
    }
    x = torch.randn(B, d)
    variance = (x - x.mean(0)).pow(2).sum(1).mean()

    def loss_of(x_hat: torch.Tensor) -> torch.Tensor:
        return (x_hat - x).pow(2).sum(1).mean() / variance

    def floor() -> None:
        with torch.no_grad():
            (x - params["b_dec"]) @ params["W_enc"]

    def dense() -> None:
        pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        values, indices = pre.topk(k, dim=1)
        codes = densify(indices, values.relu(), n)
        loss_of(codes @ params["W_dec"] + params["b_dec"]).backward()

    def autograd() -> None:
        pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        values, indices = pre.topk(k, dim=1)
        x_hat = F.embedding_bag(indices, params["W_dec"], per_sample_weights=values.relu(), mode="sum")
        loss_of(x_hat + params["b_dec"]).backward()

    def torch_path() -> None:
        values, indices = topk_encode(x, params["W_enc"], params["b_enc"], params["b_dec"], k)
        x_hat = sparse_decode_torch(indices, values.relu(), params["W_dec"])
        loss_of(x_hat + params["b_dec"]).backward()

    paths = {"floor": floor, "dense": dense, "autograd": autograd, "torch": torch_path}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for name, fn in paths.items():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in paths.items():
            for p in params.values():
                p.grad = None
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    print(f"d_in={d} latents={n} k={k} tokens={B} fp32 threads={torch.get_num_threads()} repeats={args.repeats}")
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{'path':<10}{'median s':>10}{'tokens/s':>12}{'x floor':>9}{'vs dense':>10}")
    for name, t in median.items():
        print(f"{name:<10}{t:>10.4f}{B / t:>12.0f}{t / median['floor']:>9.2f}{median['dense'] / t:>10.2f}")


if __name__ == "__main__":
    main()
