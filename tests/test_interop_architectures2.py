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


# ------------------------------------------------------------------------------------------ transcoders
import sparsify  # noqa: E402

D_OUT = 12


def trained_transcoder(architecture: str, skip: bool, d_out: int = D_OUT, **options):
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(d_in=D_IN, d_out=d_out, d_sae=D_SAE, architecture=architecture, k=6,
                               skip_connection=skip, options=options,
                               metadata={"hook_name": "blocks.3.mlp.hook_in", "hook_name_out": "blocks.3.hook_mlp_out"}))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.0, 0.6)
        if skip:
            sae.W_skip.normal_(0, 0.2)
    return sae.eval()


@pytest.mark.parametrize("architecture,skip,expected", [
    ("relu", False, "transcoder"), ("relu", True, "skip_transcoder"),
    ("jumprelu", False, "jumprelu_transcoder"), ("jumprelu", True, "jumprelu_skip_transcoder"),
    ("batchtopk", True, "jumprelu_skip_transcoder")])
def test_saelens_loads_our_transcoders_with_the_same_outputs(tmp_path, architecture, skip, expected):
    ours = trained_transcoder(architecture, skip)
    export_sae(ours, tmp_path / "out", "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "out"))
    assert theirs.cfg.architecture() == expected
    assert theirs.cfg.d_out == D_OUT and theirs.cfg.metadata.hook_name_out == "blocks.3.hook_mlp_out"
    x = x_batch()
    with torch.no_grad():
        expected_out = ours(x)
        assert expected_out.shape == (x.shape[0], D_OUT)
        assert torch.allclose(theirs(x), expected_out, atol=1e-5 * expected_out.abs().max(), rtol=1e-5)
    back, _ = load_foreign(tmp_path / "out", "saelens")
    assert back.is_transcoder and back.cfg.skip_connection == skip
    with torch.no_grad():
        assert torch.equal(back(x), expected_out)


def test_saelens_has_no_topk_transcoder_so_export_says_where_to_go(tmp_path):
    from sae_kit.interop.common import FormatError

    with pytest.raises(FormatError, match="sparsify"):
        export_sae(trained_transcoder("topk", False), tmp_path / "out", "saelens")


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_loads_our_topk_transcoders_and_theirs_import(tmp_path, skip):
    ours = trained_transcoder("topk", skip, d_out=D_IN)
    export_sae(ours, tmp_path / "layers.3.mlp", "sparsify", sidecar=False)
    coder = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.3.mlp")
    assert coder.cfg.transcode and coder.cfg.skip_connection == skip
    x = x_batch()
    with torch.no_grad():
        assert torch.allclose(coder(x).sae_out, ours(x), atol=1e-5)
    # A sparsify transcoder (theirs, saved by sparsify) imports as ours with the same outputs and hooks.
    torch.manual_seed(1)
    theirs = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=5, transcode=True,
                                                                   skip_connection=skip))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    theirs.save_to_disk(tmp_path / "run" / "layers.5.mlp")
    back, _ = load_foreign(tmp_path / "run" / "layers.5.mlp", "sparsify")
    assert back.is_transcoder and back.cfg.skip_connection == skip
    assert back.cfg.metadata["hook_name"] == "blocks.5.mlp.hook_in"
    assert back.cfg.metadata["hook_name_out"] == "blocks.5.hook_mlp_out"
    with torch.no_grad():
        assert torch.allclose(back(x), theirs(x).sae_out, atol=1e-5)


def test_sparsify_transcoders_predict_as_wide_as_they_read(tmp_path):
    from sae_kit.interop.common import FormatError

    with pytest.raises(FormatError, match="as wide"):
        export_sae(trained_transcoder("topk", False), tmp_path / "x", "sparsify")
