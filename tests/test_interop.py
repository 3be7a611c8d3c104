"""Import/export against the real libraries: sae_lens 6.x and eai-sparsify load what we write,
we load what they write, reconstructions agree and every round trip is exact."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from sae_kit.config import SAEConfig
from sae_kit.interop import FormatError, export_sae, import_sae, load_foreign
from sae_kit.interop.common import SIDECAR_CONFIG, SIDECAR_STATE
from sae_kit.sae import create_sae, load_sae

# The real libraries (dev extra), imported plainly: CI must fail, not skip, without them.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # sae_lens imports transformer_lens.utils
    import sae_lens
    import sparsify

D_IN, D_SAE = 16, 64


def make_sae(architecture: str, seed: int = 0, **kwargs):
    """A small SAE whose biases, thresholds and scales are non-trivial, as after training."""
    torch.manual_seed(seed)
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=architecture, k=6,
                               normalize_activations=kwargs.pop("normalize", "none"),
                               options=kwargs.pop("options", {}), metadata={"hook_name": "blocks.3.hook_resid_post"}))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.W_enc.normal_(0, 0.3) if "W_enc" in dict(sae.named_parameters()) else None
        if architecture == "gba":
            sae.b_enc.uniform_(-0.4, 0.0)
            if sae.opts.tied:
                sae.decoder_scale.uniform_(0.5, 2.0)
        else:
            sae.b_enc.normal_(0, 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.0, 0.3)
            sae.threshold_weight.fill_(0.7)
        if hasattr(sae, "input_scale"):  # mean_norm's constant, as init_from_data would measure it
            sae.input_scale.fill_(2.5)
        sae.tokens_since_fired.random_(0, 1000)
    return sae.eval()


def inputs(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def assert_same_sae(a, b):
    assert a.config_dict() == b.config_dict()
    ta, tb = a.tensors_to_save(), b.tensors_to_save()
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


SAELENS_EXPORTS = [("topk", {}, "none"), ("relu", {}, "none"), ("abstopk", {}, "none"), ("batchtopk", {}, "none"),
                   ("mutual_choice", {}, "none"), ("feature_choice", {}, "none"), ("gba", {"tied": True}, "none"),
                   ("gba", {"tied": False}, "none"), ("gba", {}, "unit_norm"), ("topk", {}, "unit_norm"),
                   ("relu", {}, "mean_norm"), ("topk", {}, "mean_norm")]


@pytest.mark.parametrize("architecture,options,normalize", SAELENS_EXPORTS,
                         ids=[f"{a}-{o}-{n}" for a, o, n in SAELENS_EXPORTS])
def test_saelens_loads_our_export_and_reconstructs_the_same(tmp_path, architecture, options, normalize):
    ours = make_sae(architecture, options=options, normalize=normalize)
    export_sae(ours, tmp_path / "exported", "saelens")
    assert (tmp_path / "exported" / SIDECAR_STATE).is_file()
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "exported"))
    x = inputs() * 3
    with torch.no_grad():
        expected = ours(x)
        assert torch.allclose(theirs(x), expected, atol=1e-5 * expected.abs().max(), rtol=1e-5)
        assert (theirs.encode(x) != 0).sum(1).float().mean() > 0  # the comparison is not of two zero codes
    # back, with the sidecar: bit-exact; without it: the same function
    back, notes = load_foreign(tmp_path / "exported", "saelens")
    assert notes == ["restored exactly from the sae-kit sidecar"]
    assert_same_sae(back, ours)
    (tmp_path / "exported" / SIDECAR_CONFIG).unlink()
    plain, _ = load_foreign(tmp_path / "exported", "saelens")
    with torch.no_grad():
        assert torch.allclose(plain(x), expected, atol=1e-5 * expected.abs().max(), rtol=1e-5)


def test_changed_weights_beside_a_sidecar_are_converted_not_overridden(tmp_path):
    ours = make_sae("topk")
    folder = export_sae(ours, tmp_path / "exported", "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    with torch.no_grad():
        theirs.W_dec.mul_(2.0)
    theirs.save_model(str(folder))  # another tool edited the weights after our export
    back, notes = load_foreign(folder, "saelens")
    assert any("changed since sae-kit exported" in n for n in notes)
    assert torch.equal(back.W_dec, theirs.W_dec)


@pytest.mark.parametrize("architecture,options,normalize,fmt,message", [
    ("topafa", {}, "none", "saelens", "no architecture"),
    ("abstopk", {"selection": "batch"}, "none", "saelens", "batch-level AbsTopK"),
    ("topk", {}, "layer_norm", "saelens", "layer_norm"),
    ("topafa", {}, "layer_norm", "saelens", "layer_norm"),
    ("gba", {}, "none", "sparsify", "sparsify cannot express a 'gba'"),
    ("batchtopk", {}, "none", "sparsify", "sparsify cannot express"),
    ("topk", {}, "unit_norm", "sparsify", "no input normalisation"),
    ("topk", {}, "mean_norm", "sparsify", "no input normalisation"),
])
def test_inexpressible_exports_are_refused(tmp_path, architecture, options, normalize, fmt, message):
    sae = make_sae(architecture, options=options, normalize=normalize)
    with pytest.raises(FormatError, match=message):
        export_sae(sae, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_gba_with_a_positive_bias_is_refused_by_the_saelens_export(tmp_path):
    """A positive bias (GBA's data-scale ceiling) lets y0 in (−b, 0] through with a negative output, which
    SAELens' relu(u)·1[u > θ] would drop."""
    sae = make_sae("gba")
    with torch.no_grad():
        sae.b_enc[3] = 0.05
    with pytest.raises(FormatError, match="positive biases"):
        export_sae(sae, tmp_path / "out", "saelens")


def saelens_sae(architecture: str, seed: int = 0, **cfg):
    torch.manual_seed(seed)
    sae = sae_lens.SAE.from_dict({"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
                                  "device": "cpu", **cfg})
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.0, 0.3)
    return sae.eval()


SAELENS_IMPORTS = [
    ("topk", {"k": 5}),
    ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("jumprelu", {}),
    ("abstopk", {"k": 5}),
    ("topk", {"k": 5, "normalize_activations": "layer_norm"}),
    ("jumprelu", {"normalize_activations": "constant_norm_rescale"}),
]


@pytest.mark.parametrize("architecture,cfg", SAELENS_IMPORTS, ids=[f"{a}-{c}" for a, c in SAELENS_IMPORTS])
def test_an_saelens_sae_imports_with_the_same_reconstructions(tmp_path, architecture, cfg):
    theirs = saelens_sae(architecture, **cfg)
    theirs.save_model(str(tmp_path / "theirs"))
    ours, _ = import_sae(tmp_path / "theirs", tmp_path / "ours", "saelens")
    reloaded = load_sae(tmp_path / "ours")
    x = inputs() * 3 + 1
    with torch.no_grad():
        assert torch.allclose(reloaded(x), theirs(x), atol=1e-4, rtol=1e-4)
    if not cfg.get("rescale_acts_by_decoder_norm") and cfg.get("apply_b_dec_to_input", True) and "normalize_activations" not in cfg:
        # a mapping without rescaling exports back to the same tensors, bit for bit
        export_sae(reloaded, tmp_path / "again", "saelens", sidecar=False)
        again = sae_lens.SAE.load_from_disk(str(tmp_path / "again"))
        for name, tensor in theirs.state_dict().items():
            assert torch.equal(again.state_dict()[name], tensor), name


def test_a_pre6_flat_saelens_config_imports(tmp_path):
    theirs = saelens_sae("topk", k=5)
    theirs.save_model(str(tmp_path / "old"))
    flat = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.2.hook_resid_pre", "model_name": "gpt2",
            "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}, "normalize_activations": False,
            "dtype": "float32", "context_size": 128}
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(flat))
    ours, _ = load_foreign(tmp_path / "old", "saelens")
    assert ours.cfg.architecture == "topk" and ours.cfg.k == 5
    assert ours.cfg.metadata["hook_name"] == "blocks.2.hook_resid_pre"
    x = inputs()
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_unsupported_or_broken_saelens_folders_get_clear_errors(tmp_path):
    gated = saelens_sae("gated")
    gated.save_model(str(tmp_path / "gated"))
    with pytest.raises(FormatError, match="'gated' has no sae-kit counterpart"):
        load_foreign(tmp_path / "gated", "saelens")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cfg.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_foreign(tmp_path / "broken", "saelens")
    with pytest.raises(FormatError, match="not found"):
        load_foreign(tmp_path / "missing", "saelens")
    with pytest.raises(FormatError, match="unknown import format"):
        load_foreign(tmp_path / "gated", "dictionary_learning")


def sparsify_coder(seed: int = 0, **cfg):
    torch.manual_seed(seed)
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=5, **cfg))
    with torch.no_grad():
        coder.encoder.weight.normal_(0, 0.3)
        coder.encoder.bias.normal_(0, 0.1)
        coder.b_dec.normal_(0, 0.1)
    return coder


def test_a_sparsify_sae_imports_with_the_same_reconstructions_and_exports_back_exactly(tmp_path):
    coder = sparsify_coder()
    coder.save_to_disk(tmp_path / "run" / "layers.3")
    ours, _ = load_foreign(tmp_path / "run" / "layers.3", "sparsify")
    assert ours.cfg.metadata["hook_name"] == "blocks.3.hook_resid_post"
    x = inputs()
    with torch.no_grad():
        assert torch.allclose(ours(x), coder(x).sae_out, atol=1e-5)
    export_sae(ours, tmp_path / "again", "sparsify", sidecar=False)
    again = sparsify.SparseCoder.load_from_disk(tmp_path / "again")
    for name, tensor in coder.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_sparsify_loads_our_topk_export_and_we_get_it_back_exactly(tmp_path):
    ours = make_sae("topk")
    export_sae(ours, tmp_path / "layers.3", "sparsify")
    coder = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.3")
    x = inputs()
    with torch.no_grad():
        assert torch.allclose(coder(x).sae_out, ours(x), atol=1e-5)
    back, _ = load_foreign(tmp_path / "layers.3", "sparsify")
    assert_same_sae(back, ours)


@pytest.mark.parametrize("cfg,message", [({"skip_connection": True}, "skip_connection"),
                                         ({"activation": "groupmax"}, "groupmax")])
def test_sparsify_coders_we_cannot_express_are_refused(tmp_path, cfg, message):
    sparsify_coder(**cfg).save_to_disk(tmp_path / "coder")
    with pytest.raises(FormatError, match=message):
        load_foreign(tmp_path / "coder", "sparsify")


def openai_reference(state: dict, x: torch.Tensor) -> torch.Tensor:
    """OpenAI's Autoencoder.forward (sparse_autoencoder/model.py), transcribed: LN with the unbiased
    std for TopK checkpoints, latents = act(encoder(x − pre_bias) + latent_bias)."""
    normalize = state["activation"] == "TopK"
    if normalize:
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    pre = (x - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
    if normalize:
        top = pre.topk(state["activation_state_dict"]["k"], dim=-1)
        latents = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    else:
        latents = pre.relu()
    recons = latents @ state["decoder.weight"].T + state["pre_bias"]
    return recons * std + mu if normalize else recons


@pytest.mark.parametrize("activation", ["TopK", "ReLU"])
def test_an_openai_checkpoint_imports_with_the_same_reconstructions(tmp_path, activation):
    g = torch.Generator().manual_seed(0)
    state = {"pre_bias": torch.randn(D_IN, generator=g) * 0.1, "latent_bias": torch.randn(D_SAE, generator=g) * 0.1,
             "encoder.weight": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
             "decoder.weight": torch.randn(D_IN, D_SAE, generator=g) * 0.3,
             "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long), "activation": activation}
    if activation == "TopK":
        state["activation_state_dict"] = {"k": 5, "postact_fn": "ReLU"}
    torch.save(state, tmp_path / "0.pt")
    ours, notes = import_sae(tmp_path / "0.pt", tmp_path / "ours", "openai")
    assert ours.cfg.architecture == ("topk" if activation == "TopK" else "relu")
    x = inputs() * 4 + 2  # residual-stream-like scale: std ≈ 4
    expected = openai_reference(state, x)
    with torch.no_grad():
        got = load_sae(tmp_path / "ours")(x)
    assert torch.allclose(got, expected, atol=1e-5 * expected.abs().max(), rtol=1e-5)


def test_an_openai_file_with_arbitrary_objects_is_not_unpickled(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2), "evil": math.gcd}, tmp_path / "bad.pt")
    with pytest.raises(FormatError, match="never unpickled"):
        load_foreign(tmp_path / "bad.pt", "openai")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FormatError, match="not a readable torch checkpoint|never unpickled"):
        load_foreign(tmp_path / "junk.pt", "openai")


def test_the_export_and_import_commands(tmp_path, capsys):
    from sae_kit.cli import main

    make_sae("batchtopk").save(tmp_path / "sae")
    assert main(["export", "--format", "saelens", str(tmp_path / "sae"), str(tmp_path / "sl")]) == 0
    assert main(["import", "--format", "saelens", str(tmp_path / "sl"), str(tmp_path / "back")]) == 0
    assert "restored exactly" in capsys.readouterr().out
    assert_same_sae(load_sae(tmp_path / "back"), load_sae(tmp_path / "sae"))
    assert main(["export", "--format", "sparsify", str(tmp_path / "sae"), str(tmp_path / "sp")]) == 2
    assert "sparsify cannot express a 'batchtopk'" in capsys.readouterr().err
    before = (tmp_path / "back" / "sae_weights.safetensors").read_bytes()
    assert main(["import", "--format", "saelens", str(tmp_path / "sl"), str(tmp_path / "back")]) == 2
    assert "already holds an SAE" in capsys.readouterr().err
    assert (tmp_path / "back" / "sae_weights.safetensors").read_bytes() == before
