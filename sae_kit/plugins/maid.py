"""Per-latent sparse-coding penalties learned by an adaptively inexact bilevel method (after "An
adaptively inexact first-order method for bilevel optimization with application to hyperparameter
learning", MAID).

MAID learns many regularisation weights θ of a variational problem, min_θ f(θ) = g(z*(θ)) with
z*(θ) = argmin_z h(z, θ) smooth and strongly convex, from *inexact* quantities: the lower level is
solved to a tolerance ε, the hypergradient ∇f = −(∂²_θz h)ᵀ (∂²_zz h)⁻¹ ∇g is computed by conjugate
gradients to a tolerance δ, a backtracking (Armijo) line search runs on the inexact f and ∇f, and when
it fails the accuracies are tightened instead of following a preset schedule [plugins.md B10].

SAE adaptation, post hoc on the trained decoder D (normalised space) [our adaptation]. For each token
the lower level is a convex sparse-coding refit on the encoder's ``candidates``·k strongest latents S:

    z*(ω; x) = argmin_z ½‖x − b_dec − D_Sᵀ z‖² + Σ_i w_{S_i} · huber_γ(z_i) + (μ/2)‖z‖²,
    w = w̄ · d_sae · softmax(ω)        (the total penalty is fixed, so the trivial w → 0 is blocked),

and the upper level is the mean reconstruction error of z* on fit tokens (training split), normalised
by the data variance. Codes are then the top-k of z* (the positive part for non-negative
architectures): the same L0 as the encoder. Scales (chosen): w̄ = ``penalty`` × the median active code
value, γ = ``huber`` × the same, μ = ``ridge``. The lower level is solved by Nesterov's accelerated
gradient (warm-started) to ‖∇_z h‖ ≤ ε per token; the mixed derivative is taken with ``torch.func.grad``.
MAID's line-search constants are unverified here [plugins.md §7]: we use Armijo c = 1e-4 on the inexact
values widened by a computed bound on their error (strong convexity turns ‖∇_z h‖ ≤ ε into a bound on
‖z̃ − z*‖ and so on |f̃ − f|), halving the step up to ``backtracks`` times; when no step is certified,
ε, δ ← ε/10, δ/10; an accepted step grows the step size by 1.5.

The SAE is not changed. ``posthoc`` learns ω and writes the penalties to ``sae/maid_penalties.safetensors``;
``evaluate`` reports on held-out tokens ``fvu`` (learned penalties), ``fvu_uniform`` (ω = 0, the same
solver), ``fvu_encoder``, and the run's ``objective_start`` / ``objective_end``, ``accepted_steps``,
``tightenings``.

Cost: each tightening makes every later lower-level solve longer (up to 2,000 accelerated steps over
[tokens, candidates·k, d_in]); with the earlier defaults (4,096 tokens, 30 steps, 4 tightenings) one
run's post-hoc phase took ~20 min on 2 loaded CPU cores (d_in 64, d_sae 512, k 5), hence the smaller
defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.func import grad

from sae_kit.config import ConfigError
from sae_kit.fileio import atomic_write
from sae_kit.plugins._heldout import fvu, heldout_tokens, training_sample
from sae_kit.plugins.api import Ablation, Plugin, option
from sae_kit.seeding import derive_seed

ARMIJO = 1e-4
MAX_LOWER_ITERATIONS = 2000
MAX_CG_ITERATIONS = 200


@dataclass
class Problem:
    """One batch of lower-level problems: the support's decoder rows and the residual targets."""

    D: torch.Tensor  # [N, m, d] decoder rows of each token's candidate latents
    support: torch.Tensor  # [N, m] their latent ids
    r: torch.Tensor  # [N, d] x_n − b_dec
    gamma: float
    ridge: float
    variance: float  # normalises the upper objective

    @property
    def gram(self) -> torch.Tensor:
        return self.D @ self.D.transpose(1, 2)


def penalties(omega: torch.Tensor, scale: float) -> torch.Tensor:
    """w = scale · d_sae · softmax(ω): per-latent weights with a fixed total."""
    return scale * omega.numel() * torch.softmax(omega, 0)


def huber_grad(z: torch.Tensor, gamma: float) -> torch.Tensor:
    return (z / gamma).clamp(-1, 1)


def lower_gradient(problem: Problem, z: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    """∇_z h = D_S(D_Sᵀz − r) + w_S·huber'(z) + μz, per token [N, m]."""
    residual = torch.einsum("nmd,nm->nd", problem.D, z) - problem.r
    return torch.einsum("nmd,nd->nm", problem.D, residual) + w_s * huber_grad(z, problem.gamma) + problem.ridge * z


def solve_lower(problem: Problem, w_s: torch.Tensor, z0: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, int]:
    """Accelerated gradient (step 1/L per token, momentum restarted per token when it points uphill,
    O'Donoghue & Candès) until every token's ‖∇_z h‖ ≤ tolerance."""
    lipschitz = torch.linalg.eigvalsh(problem.gram)[:, -1] + problem.ridge + w_s.max(1).values / problem.gamma
    step = (1.0 / lipschitz)[:, None]
    z, previous = z0.clone(), z0.clone()
    age = torch.ones(z.shape[0], 1, dtype=z.dtype)
    for iteration in range(1, MAX_LOWER_ITERATIONS + 1):
        y = z + (age - 1) / (age + 2) * (z - previous)
        gradient = lower_gradient(problem, y, w_s)
        previous, z = z, y - step * gradient
        uphill = ((gradient * (z - previous)).sum(1, keepdim=True) > 0)
        age = torch.where(uphill, torch.ones_like(age), age + 1)
        if iteration % 5 == 0 and lower_gradient(problem, z, w_s).norm(dim=1).max() <= tolerance:
            return z, iteration
    return z, MAX_LOWER_ITERATIONS


def upper_objective(problem: Problem, z: torch.Tensor) -> torch.Tensor:
    residual = problem.r - torch.einsum("nmd,nm->nd", problem.D, z)
    return residual.pow(2).sum(1).mean() / problem.variance


def objective_error_bound(problem: Problem, z: torch.Tensor, w_s: torch.Tensor) -> float:
    """A bound on |f(z) − f(z*)| from the lower level's residual gradient.

    h is (λ_min(D_S D_Sᵀ) + μ)-strongly convex, so ‖z − z*‖ ≤ e = ‖∇_z h(z)‖ / (λ_min + μ); f is a
    quadratic in z, so |f(z) − f(z*)| ≤ Σ_n ‖∇f_n(z)‖·e_n + λ_max,n·e_n² / (N·variance).
    """
    eigenvalues = torch.linalg.eigvalsh(problem.gram)
    distance = lower_gradient(problem, z, w_s).norm(dim=1) / (eigenvalues[:, 0].clamp_min(0) + problem.ridge)
    n = z.shape[0]
    residual = problem.r - torch.einsum("nmd,nm->nd", problem.D, z)
    slope = 2 * torch.einsum("nmd,nd->nm", problem.D, residual).norm(dim=1) / (n * problem.variance)
    return float((slope * distance + eigenvalues[:, -1] * distance.pow(2) / (n * problem.variance)).sum())


def conjugate_gradient(matrix: torch.Tensor, rhs: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Batched CG for SPD ``matrix`` [N, m, m] until every residual norm ≤ tolerance."""
    x = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    rr = residual.pow(2).sum(1)
    for _ in range(MAX_CG_ITERATIONS):
        if rr.sqrt().max() <= tolerance:
            break
        product = (matrix @ direction.unsqueeze(-1)).squeeze(-1)
        alpha = rr / (direction * product).sum(1).clamp_min(1e-30)
        x = x + alpha[:, None] * direction
        residual = residual - alpha[:, None] * product
        new_rr = residual.pow(2).sum(1)
        direction = residual + (new_rr / rr.clamp_min(1e-30))[:, None] * direction
        rr = new_rr
    return x


def hypergradient(problem: Problem, omega: torch.Tensor, scale: float, z: torch.Tensor, tolerance: float) -> torch.Tensor:
    """∇_ω f = −(∂²_ωz h)ᵀ q with H q = ∇_z g (H = ∂²_zz h), q by CG to ``tolerance``."""
    w_s = penalties(omega, scale)[problem.support]
    inside = (z.abs() <= problem.gamma).to(z.dtype) / problem.gamma
    hessian = problem.gram + torch.diag_embed(problem.ridge + w_s * inside)
    residual = problem.r - torch.einsum("nmd,nm->nd", problem.D, z)
    grad_g = -2 * torch.einsum("nmd,nd->nm", problem.D, residual) / (problem.variance * z.shape[0])
    q = conjugate_gradient(hessian, grad_g, tolerance)
    slope = huber_grad(z, problem.gamma)

    def mixed(theta: torch.Tensor) -> torch.Tensor:  # Σ q_i · ∂(∇_z h)_i: only w_S depends on ω
        return (q * slope * penalties(theta, scale)[problem.support]).sum()

    return -grad(mixed)(omega)


def refit_codes(problem: Problem, z: torch.Tensor, k: int, signed: bool) -> torch.Tensor:
    """Keep each token's top-k entries of z* (the positive part unless signed): dense over the support."""
    values = z if signed else z.clamp_min(0)
    keep = values.abs().topk(min(k, values.shape[1]), dim=1).indices
    return torch.zeros_like(values).scatter(1, keep, values.gather(1, keep))


class BilevelPenalties:
    """MAID's outer loop: inexact hypergradient steps with backtracking and adaptive accuracies."""

    def __init__(self, problem: Problem, d_sae: int, scale: float, tolerance: float, cg_tolerance: float,
                 step_size: float, backtracks: int, max_tightenings: int = 4):
        self.problem, self.scale = problem, scale
        self.omega = torch.zeros(d_sae, dtype=problem.r.dtype)
        self.tolerance, self.cg_tolerance = tolerance, cg_tolerance
        self.step_size, self.backtracks, self.max_tightenings = step_size, backtracks, max_tightenings
        self.z = torch.zeros(problem.support.shape, dtype=problem.r.dtype)
        self.accepted = self.tightenings = 0
        self.history: list[float] = []

    def evaluate_at(self, omega: torch.Tensor, z0: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """(z̃, f̃, bound on |f̃ − f|) at ω, the lower level solved to the current tolerance."""
        w_s = penalties(omega, self.scale)[self.problem.support]
        z, _ = solve_lower(self.problem, w_s, z0, self.tolerance)
        return z, float(upper_objective(self.problem, z)), objective_error_bound(self.problem, z, w_s)

    def run(self, steps: int) -> None:
        self.z, value, error = self.evaluate_at(self.omega, self.z)
        self.history.append(value)
        for _ in range(steps):
            gradient = hypergradient(self.problem, self.omega, self.scale, self.z, self.cg_tolerance)
            accepted = False
            eta = self.step_size
            for _ in range(self.backtracks):
                candidate = self.omega - eta * gradient
                z, new_value, new_error = self.evaluate_at(candidate, self.z)
                # Armijo on the inexact values, with their error bounds: certified descent of the true f.
                if new_value + new_error <= value - error - ARMIJO * eta * float(gradient.pow(2).sum()):
                    accepted = True
                    break
                eta /= 2
            if accepted:
                self.omega, self.z, value, error = candidate, z, new_value, new_error
                self.step_size = eta * 1.5
                self.accepted += 1
            else:  # the inexact quantities could not certify descent: ask for more accuracy
                if self.tightenings == self.max_tightenings:
                    break  # (the accuracy budget is spent: no certified descent is left within it)
                self.tolerance /= 10
                self.cg_tolerance /= 10
                self.tightenings += 1
                self.z, value, error = self.evaluate_at(self.omega, self.z)
            self.history.append(value)


class MAID(Plugin):
    name = "maid"
    paper = "An adaptively inexact first-order method for bilevel optimization (MAID)"
    summary = "post hoc: per-latent penalties of a convex sparse-coding refit, learned by inexact bilevel descent"
    ablation = Ablation(metric="maid/fvu", baseline_options={"steps": 0})

    @dataclass
    class Options:
        steps: int = option(10, "outer (hypergradient) steps; 0 keeps the uniform penalties")
        tokens: int = option(1024, "fit tokens (training split) for the upper level")
        candidates: int = option(2, "candidate latents per token, as a multiple of k")
        penalty: float = option(0.1, "mean penalty w̄, relative to the median active code value")
        huber: float = option(0.1, "Huber width γ, relative to the median active code value")
        ridge: float = option(1e-3, "μ, the strong-convexity term")
        tolerance: float = option(1e-2, "initial lower-level tolerance ε on ‖∇_z h‖")
        cg_tolerance: float = option(1e-2, "initial CG tolerance δ (relative to ‖∇_z g‖'s scale)")
        step_size: float = option(10.0, "initial outer step size")
        backtracks: int = option(6, "halvings tried before the accuracies are tightened")
        max_tightenings: int = option(2, "stop when no descent is certified after this many tightenings")

    def validate(self) -> None:
        o = self.opts
        if o.steps < 0 or o.tokens < 1 or o.candidates < 1 or o.backtracks < 1 or o.max_tightenings < 0:
            raise ConfigError("maid: steps and max_tightenings must be >= 0, tokens, candidates and backtracks >= 1")
        if min(o.penalty, o.huber, o.ridge, o.tolerance, o.cg_tolerance, o.step_size) <= 0:
            raise ConfigError("maid: penalty, huber, ridge, tolerance, cg_tolerance and step_size must be > 0")

    def setup(self, trainer) -> None:
        if not trainer.sae.uses_k:
            raise ConfigError(f"maid: the refit keeps k latents per token; architecture {trainer.sae.architecture!r} has no k")
        self.result: dict[str, Any] = {}

    @torch.no_grad()
    def problem(self, sae, x: torch.Tensor, variance: float, code_scale: float) -> Problem:
        x_n, _ = sae.normalize(x)
        pre = sae.pre_activations(x_n)
        m = min(self.opts.candidates * sae.cfg.k, sae.cfg.d_sae)
        support = (pre.abs() if sae.signed_codes else pre).topk(m, dim=1).indices
        return Problem(D=sae.W_dec.detach()[support], support=support, r=x_n - sae.b_dec.detach(),
                       gamma=self.opts.huber * code_scale, ridge=self.opts.ridge, variance=variance)

    @torch.no_grad()
    def posthoc(self, sae, trainer):
        x = training_sample(trainer, self.opts.tokens, derive_seed("maid", trainer.cfg.seed) % 2**31)
        was_training = sae.training
        sae.eval()
        x_n, _ = sae.normalize(x)
        codes = sae.encode(x)
        active = codes.values[codes.active].abs()
        self.code_scale = float(active.median()) if active.numel() else 1.0
        self.variance = float((x_n - x_n.mean(0)).pow(2).sum(1).mean())
        learner = BilevelPenalties(self.problem(sae, x, self.variance, self.code_scale), sae.cfg.d_sae,
                                   self.opts.penalty * self.code_scale, self.opts.tolerance,
                                   self.opts.cg_tolerance / x.shape[0], self.opts.step_size, self.opts.backtracks,
                                   self.opts.max_tightenings)
        learner.run(self.opts.steps)
        sae.train(was_training)
        self.omega, self.learner = learner.omega, learner
        self.result = {"objective_start": learner.history[0], "objective_end": learner.history[-1],
                       "accepted_steps": learner.accepted, "tightenings": learner.tightenings}
        weights = penalties(self.omega, self.opts.penalty * self.code_scale).contiguous()
        target = Path(trainer.run_dir) / "sae"
        target.mkdir(parents=True, exist_ok=True)
        atomic_write(target / "maid_penalties.safetensors", lambda p: save_file({"penalties": weights}, str(p)))
        return sae

    @torch.no_grad()
    def heldout_fvu(self, sae, x: torch.Tensor, omega: torch.Tensor) -> float:
        problem = self.problem(sae, x, self.variance, self.code_scale)
        w_s = penalties(omega, self.opts.penalty * self.code_scale)[problem.support]
        z, _ = solve_lower(problem, w_s, torch.zeros(problem.support.shape), self.learner.tolerance)
        z = refit_codes(problem, z, sae.cfg.k, sae.signed_codes)
        x_n, norm = sae.normalize(x)
        x_hat = norm.undo(torch.einsum("nmd,nm->nd", problem.D, z) + sae.b_dec)
        return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    @torch.no_grad()
    def evaluate(self, sae, trainer) -> dict[str, Any]:
        x = heldout_tokens(trainer)
        return {"fvu": self.heldout_fvu(sae, x, self.omega), "fvu_uniform": self.heldout_fvu(sae, x, torch.zeros_like(self.omega)),
                "fvu_encoder": fvu(sae, x), **self.result}
