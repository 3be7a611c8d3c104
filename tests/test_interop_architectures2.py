"""JumpReLU and Matryoshka against the real sae-lens: it loads our exports with the same outputs,
and a SAELens JumpReLU imports as our jumprelu (not a BatchTopK holding thresholds)."""
from __future__ import annotations

import warnings

import pytest
import torch

from sae_kit.config import SAEConfig
from sae_kit.interop import export_sae, import_sae, load_foreign
from sae_kit.sae import create_sae, load_sae

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import sae_lens

D_IN, D_SAE = 16, 64


def trained_like(architecture: str, normalize: str = "none", **options):
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=architecture, k=6, normalize_activations=normalize,
                               options=options, metadata={"hook_name": "blocks.3.hook_resid_post"}))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
        sae.threshold.uniform_(0.0, 0.6)
        sae.tokens_since_fired.random_(0, 1000)
    return sae.eval()


def x_batch(n=40, seed=1):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("architecture,options,normalize", [
    ("jumprelu", {}, "none"), ("jumprelu", {"target_l0": 8}, "unit_norm"), ("matryoshka", {"widths": "8,32"}, "none")])
def test_saelens_loads_jumprelu_and_matryoshka_exports(tmp_path, architecture, options, normalize):
    ours = trained_like(architecture, normalize, **options)
    export_sae(ours, tmp_path / "out", "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "out"))
    assert theirs.cfg.architecture() == "jumprelu"
    x = x_batch()
    with torch.no_grad():
        expected = ours(x)
        assert torch.allclose(theirs(x), expected, atol=1e-5 * expected.abs().max(), rtol=1e-5)
        active = (theirs.encode(x) != 0).sum(1).float().mean()
        assert 0 < active < D_SAE
    back, notes = load_foreign(tmp_path / "out", "saelens")
    assert notes == ["restored exactly from the sae-kit sidecar"]
    assert back.cfg.architecture == architecture
    for name, tensor in ours.tensors_to_save().items():
        assert torch.equal(back.tensors_to_save()[name], tensor), name


def test_a_saelens_jumprelu_imports_as_jumprelu_and_trains_on(tmp_path):
    torch.manual_seed(0)
    theirs = sae_lens.SAE.from_dict({"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
                                     "device": "cpu"})
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
        theirs.threshold.uniform_(0.05, 0.4)
    theirs.save_model(str(tmp_path / "theirs"))
    import_sae(tmp_path / "theirs", tmp_path / "ours", "saelens")
    ours = load_sae(tmp_path / "ours")
    assert ours.cfg.architecture == "jumprelu"
    assert ours.threshold.dtype == torch.float32
    assert float(ours.bandwidth) == pytest.approx(0.1 * float(theirs.threshold.detach().median()), rel=0.2)
    x = x_batch()
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    ours.train()
    out = ours.training_forward(x)
    out.loss.backward()
    assert ours.threshold.grad is not None and ours.threshold.grad.abs().sum() > 0
