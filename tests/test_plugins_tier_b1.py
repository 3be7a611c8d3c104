"""Mechanism tests of the Tier B plugins (first half): each asserts the property the plugin's paper
adaptation claims, on a constructed case."""
from __future__ import annotations

import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from sae_kit.plugins.api import Batch, StepContext
from test_plugins_tier_a import BATCH, D_IN, D_SAE, drive, tiny_trainer


# -------------------------------------------------------------------------------------------- ema
def test_ema_shadow_equals_averaged_model_and_the_hand_computed_ema(tmp_path):
    steps, decay = 12, 0.8
    trainer, source = tiny_trainer(tmp_path, steps, [f"ema:decay={decay},start=0.25"])
    plugin = trainer.plugins.plugins[0]
    reference = AveragedModel(trainer.sae, multi_avg_fn=get_ema_multi_avg_fn(decay))
    expected = None

    def record(trainer, _):
        nonlocal expected
        if trainer.step - 1 < steps // 4:  # outside the window: no update
            assert int(plugin.shadow.n_averaged) == 0
            return
        reference.update_parameters(trainer.sae)
        current = trainer.sae.W_dec.detach().clone()
        expected = current if expected is None else decay * expected + (1 - decay) * current

    drive(trainer, source, steps, record)
    assert int(plugin.shadow.n_averaged) == steps - steps // 4
    for (name, mine), (_, theirs) in zip(plugin.shadow.module.named_parameters(), reference.module.named_parameters()):
        assert torch.equal(mine, theirs), name
    assert torch.allclose(plugin.shadow.module.W_dec, expected, atol=1e-6)
    assert not torch.allclose(plugin.shadow.module.W_dec, trainer.sae.W_dec, atol=1e-4)  # it lags the live SAE
    # Export: the shadow's parameters with unit-norm decoder rows.
    final = plugin.posthoc(trainer.sae, trainer)
    assert torch.allclose(final.W_enc, reference.module.W_enc)
    assert torch.allclose(final.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-6)
    assert torch.allclose(final.W_dec, reference.module.W_dec / reference.module.W_dec.norm(dim=1, keepdim=True))


# ------------------------------------------------------------------------------------- compander
def test_compander_function_is_odd_bounded_and_expands_small_weights():
    from sae_kit.plugins.compander import CompanderShape

    shape = CompanderShape(alpha=3.0, beta=0.5, learnable=True)
    w = torch.linspace(-10, 10, 2001)
    f = shape(w)
    assert torch.allclose(shape(-w), -f) and f.abs().max() <= 0.5 + 1e-6  # odd, bounded by β (saturates in float32)
    small = torch.tensor([1e-4])
    assert torch.allclose(shape(small) / small, torch.tensor(3.0), rtol=1e-4)  # slope α at 0
    assert torch.allclose(shape(shape.inverse(f[900:1100])), f[900:1100], atol=1e-5)
    # Gradient through the compander: amplified near 0, suppressed in saturation.
    w = torch.tensor([1e-3, 5.0], requires_grad=True)
    shape(w).sum().backward()
    assert w.grad[0] > 2.9 and w.grad[1] < 1e-3


def test_compander_parametrises_the_encoder_trains_its_shape_and_bakes(tmp_path):
    steps = 20
    trainer, source = tiny_trainer(tmp_path, steps, ["compander:alpha=2,bound=1.5"])
    plugin = trainer.plugins.plugins[0]
    shape = plugin.modules["shape"]
    beta0 = shape.log_beta.exp().item()
    initial = trainer.sae.W_enc.detach().clone()
    assert torch.allclose(initial, trainer.sae.W_dec.T, atol=1e-5)  # the companded init is the tied init
    groups = {g.get("plugin"): g for g in trainer.optimizer.param_groups}
    assert shape.log_alpha in groups["compander"]["params"]

    def check(trainer, _):
        beta = shape.log_beta.exp().item()
        assert trainer.sae.W_enc.abs().max() <= beta * (1 + 1e-6)  # magnitude restricted by the current β
        free = trainer.sae.parametrizations.W_enc.original
        assert torch.allclose(trainer.sae.W_enc, beta * torch.tanh(shape.log_alpha.exp() * free / beta), atol=1e-6)

    drive(trainer, source, steps, check)
    assert shape.log_beta.exp().item() != beta0  # the shape is learned
    final = trainer.finish()
    from torch.nn.utils import parametrize

    assert not parametrize.is_parametrized(final)
    assert final.W_enc.abs().max() <= shape.log_beta.exp().item() * (1 + 1e-6)
