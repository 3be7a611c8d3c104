"""Tokens/s and peak memory of one SAE training step on CPU: forward + backward alone, and the whole
step a user waits for (optimizer, clipping, decoder constraint, dead-latent bookkeeping).

Every path runs on the same synthetic activations and settings, interleaved over repeats (median
time each), so machine load hits them alike. Forward + backward rows:

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

Whole-step rows (``step/...``), each one optimizer update:
  step/ours       ``Trainer.train_step`` of a TopK run: Adam, gradient clipping, decoder gradient
                  projection and renormalisation, dead-latent bookkeeping, plugin hooks, the logged record
  step/ours+auxk  the same with a quarter of the latents dead (kept marked through the forward, as the others)
  step/ARCH       ``Trainer.train_step`` for every registered architecture (against step/ours);
                  ``step/ARCH@OPTION=VALUE`` the same with one option changed (string-valued options)
  step/saelens    SAELens' ``SAETrainer.step`` (Adam, clip 1.0, its firing statistics), without / with AuxK
  step/sparsify   sparsify's per-step logic from its ``Trainer.fit`` (decoder renorm, forward, fvu +
                  auxk backward, gradient projection, Adam - its non-default optimizer, for a like
                  comparison; its default is signum - and its did_fire bookkeeping), without / with AuxK

Peak memory: each path again in a fresh process: the resident-set high-water mark of two steps
minus the resident set before them (weights and data excluded), in MiB.

    python benchmarks/train_step.py [--latents 16384 24576 --k 32 --tokens 4096 --repeats 3 --threads 2]
    python benchmarks/train_step.py --profile step/ours     # torch.profiler table of one path
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

# The shared bench_env.py beside this script (PYTHONSAFEPATH=1 drops the script folder from sys.path).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_env import load_average, machine  # noqa: E402  (benchmarks/ is the script's folder)

DEAD_FRACTION = 0.25
COMPARED = ("dense", "saelens", "sparsify")
STEP = "step/"


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
        if name.startswith(STEP):
            paths[name] = whole_step_path(name, x, n, k, seed, dead)
        elif name == "floor":
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
                keep_dead(sae, dead)
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


class InMemorySource:
    """The trainer's BatchSource over one fixed tensor (every batch is x itself)."""

    def __init__(self, x: torch.Tensor):
        self.x, self.d_in = x, x.shape[1]

    def sample(self, n: int, seed: int = 0, heldout_fraction: float = 0.0) -> torch.Tensor:
        return self.x[:n]

    def iter_batches(self, batch_size: int, **_):
        while True:
            yield self.x[:batch_size]


def keep_dead(sae, dead: torch.Tensor) -> None:
    """Keep ``dead`` marked dead through the forward. Our SAE updates its fire statistics with the
    batch before the auxiliary loss reads them, so a marked latent that fires in the batch would
    leave the dead set (at random init nearly all do: AuxK then ran on ~12 latents, not a quarter).
    sparsify and SAELens take the mask from before the batch, so the marked set stays whole there;
    this gives our path the same quarter."""
    update = sae.update_fire_stats

    def update_and_remark(codes) -> None:
        update(codes)
        sae.tokens_since_fired[dead] = sae.cfg.dead_tokens_threshold

    sae.update_fire_stats = update_and_remark
    sae.tokens_since_fired[dead] = sae.cfg.dead_tokens_threshold


def whole_step_path(name: str, x: torch.Tensor, n: int, k: int, seed: int, dead: torch.Tensor) -> Callable[[], None]:
    """One whole training step (optimizer update included) of ``step/<what>``."""
    what = name[len(STEP):]
    base, auxk = what.split("+")[0], what.endswith("+auxk")
    d_in = x.shape[1]
    if base == "saelens":
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=n, k=k, dtype="float32", device="cpu"))
        trainer = SAETrainer(SAETrainerConfig(total_training_samples=10**9, train_batch_size_samples=x.shape[0],
                                              lr=2e-4, lr_end=2e-4, dead_feature_window=1000),
                             sae, data_provider=iter(()))

        def saelens_step() -> None:
            # SAELens counts forward passes since firing; > dead_feature_window marks a latent dead.
            trainer.n_forward_passes_since_fired[dead] = 10**6 if auxk else 0
            trainer.step(x)

        return saelens_step
    if base == "sparsify":
        from sparsify import SparseCoder, SparseCoderConfig

        coder = SparseCoder(d_in, SparseCoderConfig(num_latents=n, k=k))
        optimizer = torch.optim.Adam(coder.parameters(), lr=2e-4 / (n / 2**14) ** 0.5)
        tokens_since_fired = torch.zeros(n, dtype=torch.long)
        did_fire = torch.zeros(n, dtype=torch.bool)

        def sparsify_step() -> None:  # sparsify.trainer.Trainer.fit, one step, auxk_alpha 1/32
            if auxk:
                tokens_since_fired[dead] = 10**8
            coder.set_decoder_norm_to_unit_norm()
            mask = tokens_since_fired > 10_000_000 if auxk else None
            out = coder(x, dead_mask=mask)
            did_fire[out.latent_indices.flatten()] = True
            (out.fvu + out.auxk_loss / 32).backward()
            coder.remove_gradient_parallel_to_decoder_directions()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                tokens_since_fired.add_(x.shape[0])
                tokens_since_fired[did_fire] = 0
                did_fire.zero_()

        return sparsify_step
    from sae_kit.train.trainer import Trainer, TrainConfig

    # step/ARCH@OPTION=VALUE: one option other than the default, timed in the same interleaved run.
    base, _, option = base.partition("@")
    architecture = "topk" if base == "ours" else base
    out = tempfile.mkdtemp(prefix="train_step_bench_")
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # the trainer's run folder, not wanted after
    # At the same mean L0 as TopK's k: the architecture's own knob (JumpReLU: its target-L0 controller).
    from sae_kit.sae import ARCHITECTURES

    knob = getattr(ARCHITECTURES[architecture], "sparsity_settings", None)
    settings = {"k": k, **(knob(k) if knob else {})}
    if option:
        key, _, value = option.partition("=")
        settings["options"] = {**settings.get("options", {}), key: value}
    cfg = TrainConfig(architecture=architecture, d_sae=n, batch_size=x.shape[0], tokens=10**12,
                      warmup_steps=0, init_tokens=min(x.shape[0], 4096), out=out, progress=False, seed=seed, **settings)
    trainer = Trainer(cfg, InMemorySource(x), data_parallel=False)
    if auxk:
        keep_dead(trainer.sae, dead)

    def ours_step() -> None:
        trainer.train_step(x)
        trainer.step += 1

    return ours_step


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


def ratio_to(reference: str, name: str, median: dict[str, float]) -> str:
    """``median[ref] / median[name]`` where ref is the matching row of ``reference`` (same AuxK, same kind)."""
    prefix = STEP if name.startswith(STEP) else ""
    ref = prefix + reference + ("+auxk" if name.endswith("+auxk") else "")
    if ref not in median:
        ref = prefix + reference
    return f"{median[ref] / median[name]:>12.2f}x" if ref in median else f"{'':>13}"


def report(latents: int, args, median: dict[str, float], memory: dict[str, float | None]) -> None:
    B = args.tokens
    print(f"\nd_in={args.d_in} latents={latents} k={args.k} tokens={B} fp32 threads={torch.get_num_threads()} "
          f"repeats={args.repeats} (median of interleaved repeats; floor = the dense encoder product alone)")
    for title, rows in (("forward + backward", [n for n in median if not n.startswith(STEP)]),
                        ("whole step (optimizer update included)", ["floor"] + [n for n in median if n.startswith(STEP)])):
        if len(rows) < 2 and title.startswith("whole"):
            continue
        print(f"\n{title}")
        header = f"{'path':<24}{'s/step':>8}{'tokens/s':>10}{'of floor':>9}" + "".join(f"{'vs ' + c:>13}" for c in COMPARED)
        print(header + f"{'peak MiB':>10}")
        for name in rows:
            t = median[name]
            row = f"{name:<24}{t:>8.3f}{B / t:>10.0f}{median['floor'] / t:>9.2f}"
            row += "".join(ratio_to(ref, name, median) for ref in COMPARED)
            mem = memory.get(name)
            print(row + (f"{mem:>10.0f}" if mem is not None else f"{'':>10}"))
    if "ours" in median:
        print("selection rules against our TopK step (time ratio, target <= 1.3):",
              ", ".join(f"{n} {median[n] / median['ours']:.2f}" for n in ("batchtopk", "mutual_choice", "feature_choice", "jumprelu", "matryoshka") if n in median))
    ours = STEP + "ours"
    if ours in median:
        floor = median["floor"]
        print(f"whole step of the floor: TopK {floor / median[ours]:.2f} (target >= 0.8)"
              + (f", TopK+AuxK at {DEAD_FRACTION:.0%} dead {floor / median[ours + '+auxk']:.2f} (target >= 0.6)"
                 if ours + "+auxk" in median else ""))
        others = [n for n in median if n.startswith(STEP) and n[len(STEP):].split("+")[0] not in ("ours", "saelens", "sparsify")]
        if others:
            print("architectures' whole step against our TopK step (time ratio, target <= 1.3):",
                  ", ".join(f"{n[len(STEP):]} {median[n] / median[ours]:.2f}" for n in others))
        if memory.get(ours) is not None and memory.get(STEP + "sparsify") is not None:
            print(f"whole-step peak memory: ours {memory[ours]:.0f} MiB, sparsify {memory[STEP + 'sparsify']:.0f} MiB "
                  "(target: ours <= sparsify)")


def default_paths() -> list[str]:
    from sae_kit.sae import ARCHITECTURES

    forward_backward = ["floor", "dense", "ours", "ours+auxk", "saelens", "saelens+auxk", "sparsify", "sparsify+auxk",
                        "batchtopk", "mutual_choice", "feature_choice", "jumprelu", "matryoshka"]
    whole = ["ours", "ours+auxk", "saelens", "saelens+auxk", "sparsify", "sparsify+auxk"]
    whole += sorted(a for a in ARCHITECTURES if a != "topk")
    return forward_backward + [STEP + name for name in whole]


def profile_path(args) -> None:
    """torch.profiler's table of one path's steps (after a warm-up step), by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    x = synthetic(args.tokens, args.d_in, args.seed)
    run = make_paths([args.profile], x, args.latents[0], args.k, args.seed)[args.profile]
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.repeats):
            run()
    print(f"profile of {args.profile}: {args.repeats} steps, latents={args.latents[0]}, threads={torch.get_num_threads()}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--latents", type=int, nargs="+", default=[16384, 24576])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paths", nargs="+", default=None,
                        help="paths to time (default: every forward + backward path and every whole step, step/...)")
    parser.add_argument("--profile", metavar="PATH", help="print torch.profiler's table of one path instead")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-path peak-memory processes")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        probe_memory(args)
        return
    if args.profile:
        profile_path(args)
        return
    args.paths = args.paths or default_paths()
    if "floor" not in args.paths:
        args.paths.insert(0, "floor")
    print(f"machine: {machine()}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"load average before: {load_average()}")
    for latents in args.latents:
        x = synthetic(args.tokens, args.d_in, args.seed)
        median = time_paths(make_paths(args.paths, x, latents, args.k, args.seed), args.repeats)
        memory = {} if args.no_memory else {name: peak_memory(name, args, latents) for name in args.paths}
        report(latents, args, median, memory)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
