"""JumpReLU and Matryoshka BatchTopK: STE pseudo-derivatives, the sparse path against dense autograd,
the target-L0 penalty on planted data, prefix losses against a dense reference, save/load."""
from __future__ import annotations

import json

import pytest
import torch

from sae_kit.config import ConfigError
from sae_kit.eval.synthetic import SyntheticSource, make_dataset
from sae_kit.sae import SAEConfig, create_sae, load_sae
from sae_kit.sae.jumprelu import JumpReLUFunction, JumpReLUSAE, StepFunction
from sae_kit.sae.matryoshka import MatryoshkaOptions, MatryoshkaSAE, prefix_widths
from sae_kit.train.trainer import TrainConfig, train


def make(arch, d_in=16, d_sae=64, k=4, seed=0, **options):
    torch.manual_seed(seed)
    return create_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, options=options))


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- JumpReLU
@pytest.mark.parametrize("to_input", [False, True])
def test_pseudo_derivatives_match_the_rectangle_kernel_closed_forms(to_input) -> None:
    eps, theta0 = 0.2, 1.0
    offsets = torch.tensor([-eps, -eps / 4, eps / 4, eps], dtype=torch.float64)
    h = (theta0 + offsets).requires_grad_()
    theta = torch.full_like(h, theta0).requires_grad_()
    JumpReLUFunction.apply(h, theta, eps, to_input).sum().backward()
    inside = torch.tensor([0.0, 1, 1, 0], dtype=torch.float64)
    assert torch.allclose(theta.grad, -(theta0 / eps) * inside)
    expected_h = (offsets > 0).double() + ((theta0 / eps) * inside if to_input else 0)
    assert torch.allclose(h.grad, expected_h)
    h.grad = theta.grad = None
    out = StepFunction.apply(h, theta, eps, to_input)
    assert torch.equal(out.detach(), (offsets > 0).double())
    out.sum().backward()
    assert torch.allclose(theta.grad, -inside / eps)
    if to_input:
        assert torch.allclose(h.grad, inside / eps)
    else:
        assert h.grad is None or not h.grad.any()


def test_jumprelu_inference_is_a_mask_over_the_threshold() -> None:
    sae = make("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(64) * 0.5)
    x = randn(32, 16)
    sae.eval()
    pre = sae.pre_activations(x)
    expected = torch.where(pre > sae.threshold, pre, 0)
    assert torch.equal(sae.encode(x).to_dense(), expected)


def _loss_and_grads(sae, x):
    sae.zero_grad(set_to_none=True)
    out = sae.training_forward(x, input_variance=1.0)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("options", [{}, {"target_l0": 0}, {"sparsity_loss": "tanh", "target_l0": 0}, {"target_l0": 6},
                                     {"ste_to_input": True}, {"pre_act_coefficient": 1e-2}])
def test_jumprelu_sparse_path_equals_dense_autograd(options) -> None:
    """The sparse step (mask selection, band entries gathered) gives the dense autograd's loss and gradients."""
    x = randn(48, 16)
    sae = make("jumprelu", **options)
    sae.init_from_data(x)
    sae.cfg.dead_tokens_threshold = 10
    sae.tokens_since_fired[::3] = 100  # some dead latents for pre_act
    sae.train()
    sparse, sparse_grads = _loss_and_grads(sae, x)
    sae.steps.zero_()
    sae.l0_integral.zero_()  # the target-L0 controller advanced on the first pass
    sae.sparse_training = False
    dense, dense_grads = _loss_and_grads(sae, x)
    assert set(sparse.parts) == set(dense.parts)
    for name in sparse.parts:
        assert torch.allclose(sparse.parts[name], dense.parts[name], rtol=1e-5, atol=1e-6), name
    assert sparse_grads.keys() == dense_grads.keys()
    for name in sparse_grads:
        assert torch.allclose(sparse_grads[name], dense_grads[name], rtol=1e-4, atol=1e-6), name
    assert sparse_grads["threshold"].abs().sum() > 0  # the STE reached θ


def test_jumprelu_encoder_gets_no_gradient_from_latents_below_threshold() -> None:
    x = randn(48, 16)
    sae = make("jumprelu")
    sae.init_from_data(x)
    with torch.no_grad():
        sae.threshold[::2] = 100.0  # far above every pre-activation and its band
    sae.train()
    _, grads = _loss_and_grads(sae, x)
    with torch.no_grad():
        never_above = ~(sae.pre_activations(x) > sae.threshold).any(0)
    assert never_above.any()
    assert not grads["b_enc"][never_above].any()
    assert grads["b_enc"][~never_above].abs().sum() > 0


def test_threshold_moves_at_its_learning_rate_not_theta_times_lr() -> None:
    """SAELens #494/#718: under Adam θ must move by about lr_θ per step (a log-θ moves θ·lr)."""
    x = randn(256, 16, seed=3)
    sae = make("jumprelu", sparsity_coefficient=10.0, target_l0=0)  # a strong fixed L0 push: θ only rises
    sae.init_from_data(x)
    sae.train()
    groups = sae.parameter_groups()
    lr = 1e-3
    optimizer = torch.optim.Adam([{"params": g["params"], "lr": lr * g.get("lr_scale", 1.0)} for g in groups])
    theta_lr = lr * groups[1]["lr_scale"]
    before = sae.threshold.detach().clone()
    for _ in range(50):
        out = sae.training_forward(x, 1.0)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        sae.after_optimizer_step()
    moved = (sae.threshold.detach() - before)
    pushed = moved != 0
    assert pushed.float().mean() > 0.5
    assert moved[pushed].abs().max() > 10 * theta_lr  # many steps' worth, not θ·lr per step
    assert moved[pushed].abs().max() <= 2 * 50 * theta_lr  # Adam steps exceed lr only while |g| grows


def test_jumprelu_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="target_l0"):
        make("jumprelu", target_l0=1000)
    with pytest.raises(ConfigError, match="sparsity_loss"):
        make("jumprelu", sparsity_loss="l1")
    assert JumpReLUSAE.sparsity_settings(40) == {"options": {"target_l0": 40}}
    assert MatryoshkaSAE.sparsity_settings(40) == {"k": 40}


@pytest.mark.parametrize("target", [4, 8])
def test_target_l0_is_met_on_planted_data(tmp_path, target) -> None:
    """Held-out mean L0 within ±10 % of the target after a short run."""
    torch.set_num_threads(1)
    source = SyntheticSource(make_dataset("sharkey", d=32, n_features=128, mean_active=5.0, seed=2))
    cfg = TrainConfig(architecture="jumprelu", d_sae=128, batch_size=512, tokens=512 * 250, out=str(tmp_path / "run"),
                      options={"target_l0": target}, progress=False, eval_every=10**6, log_every=50,
                      checkpoint_every=10**6, eval_tokens=8192, seed=1)
    train(cfg, source=source)
    metrics = json.loads((tmp_path / "run" / "sae" / "eval.json").read_text())
    assert abs(metrics["l0_mean"] - target) <= 0.1 * target, metrics["l0_mean"]


# ------------------------------------------------------------------------------------ Matryoshka
def test_prefix_widths_from_widths_fractions_and_defaults() -> None:
    assert prefix_widths(MatryoshkaOptions(widths="8,32"), 64) == [8, 32, 64]
    assert prefix_widths(MatryoshkaOptions(widths="8,32,64"), 64) == [8, 32, 64]
    assert prefix_widths(MatryoshkaOptions(group_fractions="0.25,0.25"), 64) == [16, 32, 64]
    assert prefix_widths(MatryoshkaOptions(), 256) == [4, 16, 64, 256]
    for bad in ({"widths": "32,8"}, {"widths": "8,100"}, {"widths": "a"}, {"group_fractions": "0.8,0.5"},
                {"widths": "8", "group_fractions": "0.5"}):
        with pytest.raises(ConfigError, match="matryoshka"):
            make("matryoshka", **bad)


def test_matryoshka_loss_is_the_sum_of_prefix_losses_and_matches_dense_gradients() -> None:
    x = randn(40, 16)
    sae = make("matryoshka", widths="4,16")
    sae.init_from_data(x)
    sae.train()
    out = sae.training_forward(x, input_variance=2.0)
    # Dense reference: each prefix decoded from the dense code.
    dense = out.codes.to_dense()
    expected = 0
    for m in sae.widths:
        x_hat = dense[:, :m] @ sae.W_dec[:m] + sae.b_dec
        expected = expected + (x_hat - out.x_n).pow(2).sum(1).mean() / 2.0
    got = out.parts["reconstruction"] + out.parts["inner_reconstruction"]
    assert torch.allclose(got, expected, rtol=1e-5)
    sae.zero_grad()
    got.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    sae.threshold_weight.zero_()
    sae.sparse_training = False
    out2 = sae.training_forward(x, input_variance=2.0)
    (out2.parts["reconstruction"] + out2.parts["inner_reconstruction"]).backward()
    for n, p in sae.named_parameters():
        assert torch.allclose(sparse_grads[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_matryoshka_group_codes_partition_the_code_and_inference_uses_threshold() -> None:
    x = randn(30, 16)
    sae = make("matryoshka", widths="8,24")
    sae.train()
    codes = sae.encode(x)
    parts = sae.group_codes(codes)
    assert torch.equal(sum(p.to_dense() for p in parts), codes.to_dense())
    for part, (lo, hi) in zip(parts, [(0, 8), (8, 24), (24, 64)]):
        idx = part.indices[part.active]
        assert ((idx >= lo) & (idx < hi)).all()
    assert codes.l0().float().mean() == pytest.approx(4, abs=0.01)
    sae.eval()
    pre = sae.pre_activations(x)
    assert torch.equal(sae.encode(x).to_dense(), torch.where(pre > sae.threshold, pre, 0).relu())
    fvu = sae.prefix_fvu(x)
    full = float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert len(fvu) == 3 and fvu[-1] == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize("arch, options", [("jumprelu", {"target_l0": 5}), ("matryoshka", {"widths": "8,16"})])
def test_save_load_round_trip(tmp_path, arch, options) -> None:
    x = randn(64, 16)
    sae = make(arch, **options)
    sae.init_from_data(x)
    sae.train()
    opt = torch.optim.Adam(sae.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        out = sae.training_forward(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sae.after_optimizer_step()
    sae.eval()
    sae.save(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.equal(loaded(x), sae(x))
    if arch == "jumprelu":
        assert loaded.threshold.dtype == torch.float32
