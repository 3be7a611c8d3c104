"""GPU benchmark of the Triton kernels and the training step, in one command on a CUDA machine:

    .venv/bin/python benchmarks/gpu_kernels.py            # after bash scripts/setup.sh

1. Bandwidth: each kernel's bytes moved per second against a device-to-device copy measured in
   the same run (the practical peak): decode forward, its value gradient, its weight gradient
   (sort + per-latent sums), and the encoder's sparse backward (gather_pre_activations).
2. Training step (forward + backward, fp32): sae-kit's TopK SAE (with and without AuxK) against
   EleutherAI sparsify's SparseCoder (its Triton decoder) and one dense encoder product (the floor).
Both print ratios against references measured in the same run. ``--device cpu`` runs the same code
at toy sizes under TRITON_INTERPRET=1 (a smoke test of this script, not a measurement).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch


def timer(device: str, fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up, synchronising the device around each call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str, repeats: int, mib: int) -> float:
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = timer(device, lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / seconds


def bandwidth_table(args, device: str) -> None:
    from sae_kit.kernels import dense_pre_activations, triton_decode as td
    from sae_kit.kernels import gather_pre_activations

    B, K, d, F = args.tokens, args.k, args.d_in, args.latents
    gen = torch.Generator(device=device).manual_seed(0)
    elem = 4
    indices = torch.randint(0, F, (B, K), device=device, generator=gen)
    values = torch.rand(B, K, device=device, generator=gen)
    weight = torch.randn(F, d, device=device, generator=gen)
    grad = torch.randn(B, d, device=device, generator=gen)
    x_c = torch.randn(B, d, device=device, generator=gen)
    W_enc = weight.T.clone().requires_grad_()  # decoder-major, like the tied init
    b_enc = torch.zeros(F, device=device, requires_grad=True)
    pre = dense_pre_activations(x_c, W_enc, b_enc)
    peak = copy_bandwidth(device, args.repeats, args.copy_mib)
    slot_bytes = B * K * (8 + elem)  # indices + values

    def encoder_backward() -> None:
        W_enc.grad = b_enc.grad = None
        gather_pre_activations(x_c, W_enc, b_enc, pre, indices, backend="triton").backward(values)

    kernels = {
        # bytes: the K weight rows per token read, plus what is written
        "decode forward": (lambda: td.decode_forward(indices, values, weight), B * K * d * elem + B * d * elem + slot_bytes),
        "decode grad values": (lambda: td.decode_grad_values(indices, weight, grad, torch.float32),
                               B * K * d * elem + B * d * elem + slot_bytes),
        "decode grad weight": (lambda: td.decode_grad_weight(indices, values, grad, weight),
                               B * K * d * elem + F * d * elem + 2 * slot_bytes),
        "encoder backward": (encoder_backward, 2 * B * K * d * elem + F * d * elem + B * d * elem + 2 * slot_bytes),
    }
    print(f"\nkernels: tokens={B} k={K} d={d} latents={F} fp32; copy bandwidth {peak / 1e9:.0f} GB/s (the reference)")
    print(f"{'kernel':<22}{'ms':>9}{'GB/s':>9}{'of copy':>9}")
    for name, (fn, nbytes) in kernels.items():
        seconds = timer(device, fn, args.repeats)
        print(f"{name:<22}{seconds * 1e3:>9.3f}{nbytes / seconds / 1e9:>9.1f}{nbytes / seconds / peak:>9.2f}")


def step_table(args, device: str) -> None:
    from sae_kit.sae import SAEConfig, create_sae

    B, K, d = args.tokens, args.k, args.d_in
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, d, device=device, generator=gen) * torch.linspace(3.0, 0.3, d, device=device)
    variance = (x - x.mean(0)).pow(2).sum(1).mean()
    for F in args.step_latents:
        dead = torch.rand(F, device=device, generator=gen) < 0.25
        paths: dict[str, Callable[[], None]] = {}
        W_floor = torch.randn(d, F, device=device, generator=gen)

        def floor() -> None:
            with torch.no_grad():
                x @ W_floor

        paths["floor"] = floor
        for name, with_dead in (("ours", False), ("ours+auxk", True)):
            torch.manual_seed(0)
            sae = create_sae(SAEConfig(d_in=d, d_sae=F, architecture="topk", k=K)).to(device).train()
            if with_dead:
                sae.tokens_since_fired[dead] = sae.cfg.dead_tokens_threshold

            def ours(sae=sae) -> None:
                sae.zero_grad(set_to_none=True)
                sae.training_forward(x, variance).loss.backward()

            paths[name] = ours
        try:
            from sparsify import SparseCoder, SparseCoderConfig
        except ImportError:
            print("(sparsify not installed: its rows are skipped)")
        else:
            for name, mask in (("sparsify", None), ("sparsify+auxk", dead)):
                coder = SparseCoder(d, SparseCoderConfig(num_latents=F, k=K), device=device)

                def theirs(coder=coder, mask=mask) -> None:
                    coder.zero_grad(set_to_none=True)
                    out = coder(x, dead_mask=mask)
                    (out.fvu + out.auxk_loss / 32).backward()

                paths[name] = theirs
        median = {name: timer(device, fn, args.repeats) for name, fn in paths.items()}
        print(f"\ntraining step: tokens={B} d_in={d} latents={F} k={K} fp32 (forward + backward)")
        print(f"{'path':<16}{'ms':>9}{'tokens/s':>12}{'of floor':>9}{'vs sparsify':>13}")
        for name, seconds in median.items():
            ref = "sparsify+auxk" if name.endswith("+auxk") else "sparsify"
            versus = f"{median[ref] / seconds:>12.2f}x" if ref in median else f"{'':>13}"
            print(f"{name:<16}{seconds * 1e3:>9.2f}{B / seconds:>12.0f}{median['floor'] / seconds:>9.2f}{versus}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--latents", type=int, default=131072, help="latents for the kernel table")
    parser.add_argument("--step-latents", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--copy-mib", type=int, default=1024)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a CUDA device (use --device cpu with TRITON_INTERPRET=1 for a smoke test)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--device cpu runs Triton in its interpreter: set TRITON_INTERPRET=1")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, for us and for sparsify alike
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bandwidth_table(args, args.device)
    step_table(args, args.device)


if __name__ == "__main__":
    main()
