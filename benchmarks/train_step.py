"""Tokens/s and peak memory of one SAE training step (forward + backward, no optimizer) on CPU.

Every path runs on the same synthetic activations and settings, interleaved over repeats (median
time each), so machine load hits them alike:

  floor           one dense encoder product (x - b_dec) @ W_enc without autograd: no step with a
                  dense encoder can take less time
  dense           a plain dense-torch TopK step (autograd through topk, dense [B, F] codes, matmul decode)
  ours            sae-kit's TopK SAE training step (the sparse kernels, what `sae-kit train` runs)
  ours+auxk       the same with a quarter of the latents dead, so AuxK runs (and trains the encoder)
  saelens         SAELens' TopKTrainingSAE.training_forward_pass (its defaults), without / with AuxK
  sparsify        EleutherAI sparsify's SparseCoder forward (fvu + auxk), without / with AuxK
  batchtopk, mutual_choice, feature_choice   sae-kit's other selection rules (against ours)
  jumprelu        sae-kit's JumpReLU step (mask selection, STE band, quadratic L0 penalty), thresholds
                  placed at L0 = k on the data; matryoshka: Matryoshka BatchTopK (default 4 prefixes)

Peak memory: each path again in a fresh process: the resident-set high-water mark of two steps
minus the resident set before them (weights and data excluded), in MiB.

    python benchmarks/train_step.py [--latents 16384 24576 --k 32 --tokens 4096 --repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

DEAD_FRACTION = 0.25
COMPARED = ("dense", "saelens", "sparsify")


def synthetic(tokens: int, d_in: int, seed: int) -> torch.Tensor:
    """Activations with a mean offset and a decaying spectrum, like a residual stream's."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.3, d_in)
    return torch.randn(tokens, d_in, generator=gen) * scales + torch.randn(d_in, generator=gen)


def dead_mask(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) < DEAD_FRACTION


def make_paths(names: list[str], x: torch.Tensor, n: int, k: int, seed: int) -> dict[str, Callable[[], None]]:
    """Each path: a closure doing one forward + backward on x (gradients cleared first)."""
    d_in = x.shape[1]
    variance = (x - x.mean(0)).pow(2).sum(1).mean()
    dead = dead_mask(n, seed)
    paths: dict[str, Callable[[], None]] = {}

    def step(module: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            loss().backward()

        return run

    for name in names:
        torch.manual_seed(seed)
        if name == "floor":
            W_enc, b_dec = torch.randn(d_in, n) / d_in**0.5, torch.zeros(d_in)

            def floor(W_enc=W_enc, b_dec=b_dec) -> None:
                with torch.no_grad():
                    (x - b_dec) @ W_enc

            paths[name] = floor
        elif name == "dense":
            module = torch.nn.Module()
            W_dec = torch.randn(n, d_in)
            module.W_dec = torch.nn.Parameter(W_dec / W_dec.norm(dim=1, keepdim=True))
            module.W_enc = torch.nn.Parameter(module.W_dec.detach().T.clone())
            module.b_enc = torch.nn.Parameter(torch.zeros(n))
            module.b_dec = torch.nn.Parameter(torch.zeros(d_in))

            def dense_loss(m=module) -> torch.Tensor:
                pre = (x - m.b_dec) @ m.W_enc + m.b_enc
                values, indices = pre.topk(k, dim=1)
                codes = torch.zeros_like(pre).scatter(1, indices, values.relu())
                return ((codes @ m.W_dec + m.b_dec) - x).pow(2).sum(1).mean() / variance

            paths[name] = step(module, dense_loss)
        elif name.split("+")[0] in ("ours", "batchtopk", "mutual_choice", "feature_choice", "jumprelu", "matryoshka"):
            from sae_kit.sae import SAEConfig, create_sae

            architecture = {"ours": "topk"}.get(name.split("+")[0], name.split("+")[0])
            options = {"target_l0": k} if architecture == "jumprelu" else {}
            sae = create_sae(SAEConfig(d_in=d_in, d_sae=n, architecture=architecture, k=k, options=options))
            if architecture == "jumprelu":
                sae.init_from_data(x)  # thresholds at the L0 = k quantile: the same L0 as TopK's k
            sae.train()
            if name.endswith("+auxk"):
                sae.tokens_since_fired[dead] = sae.cfg.dead_tokens_threshold
            paths[name] = step(sae, lambda sae=sae: sae.training_forward(x, variance).loss)
        elif name.startswith("saelens"):
            from sae_lens.saes.sae import TrainStepInput
            from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

            sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=n, k=k, dtype="float32", device="cpu"))
            step_input = TrainStepInput(sae_in=x, coefficients={}, n_training_steps=0, is_logging_step=False,
                                        dead_neuron_mask=dead if name.endswith("+auxk") else None)
            paths[name] = step(sae, lambda sae=sae, s=step_input: sae.training_forward_pass(s).loss)
        elif name.startswith("sparsify"):
            from sparsify import SparseCoder, SparseCoderConfig

            coder = SparseCoder(d_in, SparseCoderConfig(num_latents=n, k=k))
            mask = dead if name.endswith("+auxk") else None

            def sparsify_loss(coder=coder, mask=mask) -> torch.Tensor:
                out = coder(x, dead_mask=mask)
                return out.fvu + out.auxk_loss / 32  # sparsify's default auxk_alpha

            paths[name] = step(coder, sparsify_loss)
        else:
            raise SystemExit(f"unknown path {name!r}")
    return paths


def time_paths(paths: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    for run in paths.values():  # warm-up (and a first update of running statistics)
        run()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe_memory(args) -> None:
    """One path in this (fresh) process: the peak RSS of two steps above the RSS before the first,
    MiB, so buffers a path keeps between steps (our pre-activation buffer) count like temporaries."""
    x = synthetic(args.tokens, args.d_in, args.seed)
    run = make_paths([args.memory_probe], x, args.latents[0], args.k, args.seed)[args.memory_probe]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = status_kib("VmRSS")
    run()
    run()
    print((status_kib("VmHWM") - before) / 1024)


def peak_memory(name: str, args, latents: int) -> float | None:
    cmd = [sys.executable, __file__, "--memory-probe", name, "--latents", str(latents), "--k", str(args.k),
           "--tokens", str(args.tokens), "--d-in", str(args.d_in), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  (memory probe of {name} failed: {done.stderr.strip().splitlines()[-1:]})")
        return None
    return float(done.stdout.strip().splitlines()[-1])


def report(latents: int, args, median: dict[str, float], memory: dict[str, float | None]) -> None:
    B = args.tokens
    print(f"\nd_in={args.d_in} latents={latents} k={args.k} tokens={B} fp32 threads={torch.get_num_threads()} "
          f"repeats={args.repeats} (forward + backward, median)")
    header = f"{'path':<16}{'s/step':>8}{'tokens/s':>10}{'of floor':>9}" + "".join(f"{'vs ' + c:>13}" for c in COMPARED)
    print(header + f"{'peak MiB':>10}")
    for name, t in median.items():
        row = f"{name:<16}{t:>8.3f}{B / t:>10.0f}{median['floor'] / t:>9.2f}"
        for ref in COMPARED:
            same = ref + "+auxk" if name.endswith("+auxk") and ref + "+auxk" in median else ref
            row += f"{median[same] / t:>12.2f}x" if same in median else f"{'':>13}"
        mem = memory.get(name)
        print(row + (f"{mem:>10.0f}" if mem is not None else f"{'':>10}"))
    if "ours" in median:
        print("selection rules against our TopK step (time ratio, target <= 1.3):",
              ", ".join(f"{n} {median[n] / median['ours']:.2f}" for n in ("batchtopk", "mutual_choice", "feature_choice", "jumprelu", "matryoshka")
                         if n in median))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--latents", type=int, nargs="+", default=[16384, 24576])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paths", nargs="+", default=["floor", "dense", "ours", "ours+auxk", "saelens", "saelens+auxk",
                                                       "sparsify", "sparsify+auxk", "batchtopk", "mutual_choice",
                                                       "feature_choice"])
    parser.add_argument("--no-memory", action="store_true", help="skip the per-path peak-memory processes")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        probe_memory(args)
        return
    if "floor" not in args.paths:
        args.paths.insert(0, "floor")
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs")
    for latents in args.latents:
        x = synthetic(args.tokens, args.d_in, args.seed)
        median = time_paths(make_paths(args.paths, x, latents, args.k, args.seed), args.repeats)
        memory = {} if args.no_memory else {name: peak_memory(name, args, latents) for name in args.paths}
        report(latents, args, median, memory)
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
