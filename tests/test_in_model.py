"""Evaluating an SAE inside its language model (sae_kit.eval.in_model) and `sae-kit eval --model`.

SmolLM2 (module-scoped, loaded from the converted cache) on a few windows of the bundled corpus's
held-out split: an SAE that reconstructs exactly (AbsTopK with k = d_sae = d_in and identity weights:
signed values, no ReLU) must recover all of the CE loss with zero KL; a random SAE must not. The
averaging over batches is checked on a tiny random HookedTransformer, where recomputing every
intervention by hand is cheap.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from sae_kit import cli
from sae_kit.config import SAEConfig
from sae_kit.eval.in_model import IN_MODEL_FILE, evaluate_in_model, kl_to_clean, next_token_loss, write_in_model_eval
from sae_kit.harvest import HarvestConfig, WindowStream
from sae_kit.models import LanguageModel, ensure_smollm2_cache, load_model
from sae_kit.sae import create_sae, load_sae
from sae_kit.text import iter_texts

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer:DeprecationWarning")

HOOK = "blocks.6.hook_resid_post"
D_MODEL = 576
KEYS = {"hook", "n_tokens", "loss_clean", "loss_sae", "loss_zero_ablation", "loss_mean_ablation",
        "ce_recovered_vs_zero", "ce_recovered_vs_mean", "delta_lm_loss", "kl_div"}
SMALL = dict(dataset="default", context=32, batch_size=4, max_tokens=128, progress=False)


@pytest.fixture(scope="module")
def smollm2() -> LanguageModel:
    return load_model("smollm2")


def identity_sae(d_in: int = D_MODEL, metadata: dict | None = None):
    """An SAE whose reconstruction is its input, bit for bit."""
    sae = create_sae(SAEConfig(d_in=d_in, d_sae=d_in, architecture="abstopk", k=d_in,
                               metadata={"hook_name": HOOK} if metadata is None else metadata))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d_in))
        sae.W_dec.copy_(torch.eye(d_in))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def random_sae(d_in: int = D_MODEL, seed: int = 0, metadata: dict | None = None):
    torch.manual_seed(seed)
    return create_sae(SAEConfig(d_in=d_in, d_sae=4 * d_in, architecture="topk", k=16,
                                metadata={"hook_name": HOOK} if metadata is None else metadata)).eval()


@pytest.fixture(scope="module")
def exact(smollm2):
    sae = identity_sae()
    x = torch.randn(64, D_MODEL) * 10
    assert torch.equal(sae(x), x)  # the construction really is exact
    return evaluate_in_model(sae, smollm2, **SMALL)


@pytest.fixture(scope="module")
def untrained(smollm2):
    return evaluate_in_model(random_sae(), smollm2, **SMALL)


# --------------------------------------------------------------------------------------------------
# SmolLM2
# --------------------------------------------------------------------------------------------------
def test_exact_reconstruction_recovers_all_of_the_loss(exact):
    assert set(exact) == KEYS
    assert exact["hook"] == HOOK and exact["n_tokens"] == 128
    assert exact["ce_recovered_vs_zero"] == pytest.approx(1.0, abs=1e-6)
    assert exact["ce_recovered_vs_mean"] == pytest.approx(1.0, abs=1e-6)
    assert exact["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6)
    assert exact["kl_div"] == pytest.approx(0.0, abs=1e-7)
    assert exact["loss_sae"] == pytest.approx(exact["loss_clean"], abs=1e-6)
    # A 135M instruct model on Shakespeare: a plausible loss, and ablating layer 6 hurts a lot.
    assert 1.0 < exact["loss_clean"] < 8.0
    assert exact["loss_zero_ablation"] > exact["loss_clean"] + 0.5
    assert exact["loss_mean_ablation"] > exact["loss_clean"] + 0.1


def test_untrained_sae_recovers_little(exact, untrained):
    # The clean and ablated passes do not depend on the SAE.
    for key in ("loss_clean", "loss_zero_ablation", "loss_mean_ablation"):
        assert untrained[key] == pytest.approx(exact[key], abs=1e-6)
    assert untrained["ce_recovered_vs_zero"] < 0.5
    assert untrained["ce_recovered_vs_mean"] < 0.5
    assert untrained["delta_lm_loss"] > 0.1
    assert untrained["kl_div"] > 0.05
    # The ratios follow from the losses.
    zero, mean, clean, sae = (untrained[k] for k in ("loss_zero_ablation", "loss_mean_ablation", "loss_clean",
                                                      "loss_sae"))
    assert untrained["ce_recovered_vs_zero"] == pytest.approx((zero - sae) / (zero - clean))
    assert untrained["ce_recovered_vs_mean"] == pytest.approx((mean - sae) / (mean - clean))
    assert untrained["delta_lm_loss"] == pytest.approx(sae - clean)


def test_written_json_holds_every_metric(exact, tmp_path):
    path = write_in_model_eval(tmp_path, exact)
    assert path == tmp_path / IN_MODEL_FILE == tmp_path / "eval_in_model.json"
    written = json.loads(path.read_text())
    assert written == exact and set(written) == KEYS
    assert all(math.isfinite(v) for k, v in written.items() if k != "hook")


def test_misfit_sae_or_hook_is_a_clear_error(smollm2):
    with pytest.raises(ValueError, match=r"width 576 but the SAE expects d_in=64"):
        evaluate_in_model(identity_sae(64), smollm2, **SMALL)
    with pytest.raises(ValueError, match=r"blocks.6.mlp.hook_post has width 1536"):
        evaluate_in_model(identity_sae(), smollm2, hook="blocks.6.mlp.hook_post", **SMALL)
    with pytest.raises(ValueError, match="names no hook_name; pass --hook"):
        evaluate_in_model(identity_sae(metadata={}), smollm2, **SMALL)
    with pytest.raises(ValueError, match="Unknown hook"):
        evaluate_in_model(identity_sae(), smollm2, hook="blocks.6.hook_resid_psot", **SMALL)


def test_hook_argument_overrides_a_missing_hook_name(smollm2, exact):
    small = dict(SMALL, max_tokens=32, batch_size=1)
    metrics = evaluate_in_model(identity_sae(metadata={}), smollm2, hook=HOOK, **small)
    assert metrics["hook"] == HOOK and metrics["n_tokens"] == 32
    assert metrics["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Averaging, on a tiny random HookedTransformer (SmolLM2's tokenizer, d_vocab 49152)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> LanguageModel:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2_cache(), local_files_only=True)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=len(tokenizer),
                                  act_fn="gelu", normalization_type="LN", seed=0, device="cpu")
    return LanguageModel.from_hooked_transformer(HookedTransformer(cfg), tokenizer, name="tiny-gpt2")


@pytest.fixture(scope="module")
def twenty_paragraphs(tmp_path_factory) -> Path:
    """Documents 0-18 train, document 19 (a long one) held out."""
    text = next(iter_texts("default"))
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 40]
    long_one = next(p for p in paragraphs if len(p) > 400)
    path = tmp_path_factory.mktemp("text") / "twenty.txt"
    path.write_text("\n\n".join(paragraphs[:19] + [long_one]) + "\n")
    return path


def test_losses_average_over_positions_when_the_last_batch_is_short(tiny, twenty_paragraphs):
    hook, context = "blocks.0.hook_resid_post", 16
    cfg = HarvestConfig(out="", hooks=[hook], dataset=str(twenty_paragraphs), context=context)
    stream = WindowStream(cfg, tiny.tokenizer, split="heldout")
    windows = torch.stack(list(stream.windows()))
    n = windows.shape[0]
    batch = next(b for b in (5, 7, 3, 4) if n % b)
    assert n > batch  # several batches, the last one short
    sae = random_sae(32, seed=1, metadata={"hook_name": hook})
    metrics = evaluate_in_model(sae, tiny, dataset=str(twenty_paragraphs), context=context, batch_size=batch,
                                max_tokens=10**6, progress=False)
    assert metrics["n_tokens"] == windows.numel()

    # By hand, all windows in one pass (every intervention acts on each window alone).
    keep = stream.keep_mask(windows)
    assert not keep[:, 0].any() and keep[:, 1:].all()

    def spliced(acts):
        out = acts.clone()
        out[keep] = sae(acts[keep])
        return out

    def zeroed(acts):
        out = acts.clone()
        out[keep] = 0.0
        return out

    clean = tiny.logits(windows)
    with_sae = tiny.logits(windows, replace={hook: spliced})
    expected = {
        "loss_clean": next_token_loss(clean, windows).item(),
        "loss_sae": next_token_loss(with_sae, windows).item(),
        "loss_zero_ablation": next_token_loss(tiny.logits(windows, replace={hook: zeroed}), windows).item(),
        "kl_div": kl_to_clean(clean, with_sae).item(),
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key


def test_no_heldout_text_is_an_error(tiny, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("\n\n".join(f"Paragraph {i} says something about foxes and dogs." for i in range(10)))
    with pytest.raises(ValueError, match="no heldout text to evaluate on"):
        evaluate_in_model(identity_sae(32, metadata={"hook_name": "blocks.0.hook_resid_post"}), tiny,
                          dataset=str(path), context=16, progress=False)


# --------------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------------
def test_cli_eval_in_model_writes_the_json(tmp_path, capsys):
    sae_dir = identity_sae(metadata={"hook_name": HOOK, "model_name": "smollm2", "context_size": 128}).save(
        tmp_path / "sae")
    assert load_sae(sae_dir).cfg.metadata["hook_name"] == HOOK
    code = cli.main(["eval", str(sae_dir), "--model", "smollm2", "--text-tokens", "256", "--context", "32"])
    assert code == 0
    out = capsys.readouterr().out
    assert "ce_recovered_vs_zero" in out and f"written to {sae_dir / IN_MODEL_FILE}" in out
    metrics = json.loads((sae_dir / IN_MODEL_FILE).read_text())
    assert set(metrics) == KEYS
    assert metrics["hook"] == HOOK and metrics["n_tokens"] == 256  # 8 windows of --context 32
    assert metrics["ce_recovered_vs_zero"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["kl_div"] == pytest.approx(0.0, abs=1e-7)
    assert not (sae_dir / "eval.json").exists()  # no --activations: no reconstruction metrics


def test_cli_eval_needs_activations_or_a_model(tmp_path, capsys):
    sae_dir = identity_sae(8, metadata={}).save(tmp_path / "sae")
    assert cli.main(["eval", str(sae_dir)]) == 2
    err = capsys.readouterr().err
    assert "--activations" in err and "--model" in err
    assert not (sae_dir / IN_MODEL_FILE).exists()


@pytest.fixture
def cli_reuses_smollm2(smollm2, monkeypatch):
    import sae_kit.models

    monkeypatch.setattr(sae_kit.models, "load_model", lambda name, **kwargs: smollm2)


def test_cli_eval_errors_exit_2(tmp_path, capsys, cli_reuses_smollm2):
    no_hook = identity_sae(metadata={}).save(tmp_path / "no_hook")
    assert cli.main(["eval", str(no_hook), "--model", "smollm2", "--text-tokens", "32"]) == 2
    assert "hook_name" in capsys.readouterr().err
    narrow = identity_sae(64).save(tmp_path / "narrow")
    assert cli.main(["eval", str(narrow), "--model", "smollm2", "--text-tokens", "32"]) == 2
    assert "d_in=64" in capsys.readouterr().err
    for directory in (no_hook, narrow):
        assert not (directory / IN_MODEL_FILE).exists()


# --------------------------------------------------------------------------------------------------
# Shared prefix and cached baselines against the straightforward computation (four full passes)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
def test_shared_prefix_equals_full_passes_on_a_hooked_transformer(tiny, hook):
    from sae_kit.eval import in_model
    from sae_kit.eval.split_forward import split_at

    assert split_at(tiny, hook) is not None
    sae = random_sae(32, seed=2, metadata={"hook_name": hook})
    small = dict(SMALL, context=16, max_tokens=96)
    in_model.BASELINES.clear()
    full = evaluate_in_model(sae, tiny, shared_prefix=False, **small)
    cold = evaluate_in_model(sae, tiny, **small)  # prefix once, four suffixes; baselines kept
    assert in_model.BASELINES[tiny]  # the slice's baselines were kept for the next SAE
    other = random_sae(32, seed=3, metadata={"hook_name": hook})
    warm = evaluate_in_model(other, tiny, **small)  # cached residuals and ablation losses
    other_full = evaluate_in_model(other, tiny, shared_prefix=False, **small)
    for key in KEYS - {"hook"}:
        assert cold[key] == pytest.approx(full[key], rel=1e-6, abs=1e-7), key
        assert warm[key] == pytest.approx(other_full[key], rel=1e-6, abs=1e-7), key
    assert warm["loss_sae"] != cold["loss_sae"]  # the second SAE really was evaluated


def test_shared_prefix_equals_full_passes_on_smollm2(smollm2):
    from sae_kit.eval import in_model

    sae = random_sae(seed=5)
    in_model.BASELINES.clear()
    full = evaluate_in_model(sae, smollm2, shared_prefix=False, **SMALL)
    fast = evaluate_in_model(sae, smollm2, **SMALL)
    warm = evaluate_in_model(sae, smollm2, **SMALL)
    for key in KEYS - {"hook"}:
        assert fast[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
        assert warm[key] == fast[key], key  # cached baselines reproduce the cold run exactly


def test_a_changed_slice_is_not_served_from_the_cache(tiny, twenty_paragraphs, tmp_path):
    from sae_kit.eval import in_model

    hook = "blocks.0.hook_resid_post"
    sae = random_sae(32, seed=4, metadata={"hook_name": hook})
    path = tmp_path / "text.txt"
    path.write_text(twenty_paragraphs.read_text())
    small = dict(dataset=str(path), context=16, batch_size=2, max_tokens=64, progress=False)
    in_model.BASELINES.clear()
    evaluate_in_model(sae, tiny, **small)
    path.write_text(twenty_paragraphs.read_text().replace("the", "a"))  # same name, other text
    changed = evaluate_in_model(sae, tiny, **small)
    expected = evaluate_in_model(sae, tiny, shared_prefix=False, **small)
    for key in KEYS - {"hook"}:
        assert changed[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key


def test_ablated_rows_equal_the_suffix_over_every_window(tiny):
    """Windows that differ outside the overwritten positions each get their own suffix pass; ones that
    do not share one; and the previous batch's windows are reused (counted suffix rows)."""
    from sae_kit.eval.in_model import AblatedRows, next_token_loss, overwrite
    from sae_kit.eval.split_forward import split_at

    cut = split_at(tiny, "blocks.0.hook_resid_post")
    torch.manual_seed(7)
    tokens = torch.randint(0, tiny.d_vocab, (4, 12))
    tokens[:, 0] = tiny.bos_token_id  # the skipped first position: the same residual in every window
    residual = cut.prefix(tokens)
    keep = torch.ones(4, 12, dtype=torch.bool)
    keep[:, 0] = False
    keep[1, 5] = keep[3, 2] = False  # two windows keep a position of their own: three distinct windows
    rows_run: list[int] = []
    suffix = cut.suffix
    cut.suffix = lambda t, r: (rows_run.append(r.shape[0]), suffix(t, r))[1]
    ablated = AblatedRows(cut)
    for value in (0.0, 0.0, 0.5):
        edited = overwrite(keep, value)(residual)
        expected = next_token_loss(suffix(tokens, edited), tokens).item()
        assert ablated.loss(tokens, edited) == pytest.approx(expected, rel=1e-6)
    assert rows_run == [3, 3]  # the second zero-ablated batch reused the first's windows
