"""Evaluate an SAE inside its language model: CE-loss recovered, KL to the clean model, Δ LM loss.

For each batch of held-out windows four variants of the forward pass are compared: clean; with the
SAE's reconstruction spliced in at the hook; with the hook zero-ablated; with it mean-ablated. Then

    CE recovered (vs zero) = (L_zero − L_sae) / (L_zero − L_clean)
    CE recovered (vs mean) = (L_mean − L_sae) / (L_mean − L_clean)
    Δ LM loss              = L_sae − L_clean
    KL                     = mean over positions of KL(p_clean ‖ p_sae)

Choices: positions skipped at harvest (BOS) are left untouched in every intervention, since the
SAE never saw them and their outlier norms would dominate; the mean for mean-ablation is the mean of
the hook's kept activations over all evaluated batches' clean passes so far (a running estimate,
exact from the first batch on for that batch's tokens). Losses are next-token cross-entropies over
every position but the last.

Transcoders (``sae.is_transcoder``): the transcoder reads its input hook and its prediction replaces
the output hook (``hook_name_out``, e.g. ``blocks.L.hook_mlp_out``): the spliced, zero- and mean-ablated
passes act on the MLP's output, and ``fvu_output`` = Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over the kept positions
scores the prediction of the MLP output itself. They take the four full passes (the input is read
inside the block being replaced).

Speed: at a residual-stream hook the model runs the shared prefix (blocks 0..L) once per batch and
only the suffix per variant (``split_forward.py``). An ablated batch is one window repeated (every
kept position holds the same value; BOS is the same everywhere), so its suffix runs on the distinct
windows only, and the zero-ablated window, the same in every batch, once per slice
(``AblatedRows``); the clean and spliced losses and the KL come from one log-softmax per variant
(``clean_spliced_losses``). The ablation baselines (zero- and mean-ablated
losses) and the prefix's residuals do not depend on the SAE, so they are kept per model and dataset
slice (``BASELINES``) and a second SAE evaluated on the same slice runs only the clean and spliced
suffixes. Other hooks, or a model without a usable cut, take four full forward passes
(``shared_prefix=False`` forces them: the straightforward computation the fast path must equal).
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae_kit.eval.split_forward import split_at
from sae_kit.sae import SAE

IN_MODEL_FILE = "eval_in_model.json"
# Residuals kept per dataset slice for later SAEs (beyond this only the baseline losses are kept).
RESIDUAL_CACHE_BYTES = 256 * 2**20


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1] (float32 per position, the
    mean in float64: CE recovered divides loss differences of ~0.1, where a float32 mean's rounding
    shows)."""
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    return losses.double().mean()


def kl_to_clean(clean_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    clean = F.log_softmax(clean_logits.float(), dim=-1)
    other = F.log_softmax(other_logits.float(), dim=-1)
    return (clean.exp() * (clean - other)).sum(-1).mean()


def clean_spliced_losses(clean_logits: torch.Tensor, spliced_logits: torch.Tensor,
                         tokens: torch.Tensor) -> tuple[float, float, float]:
    """``next_token_loss`` of both and ``kl_to_clean``, from one log-softmax per variant (the three
    functions take five), a window at a time so that no [batch, pos, vocab] temporaries are made."""
    sums = torch.zeros(3, dtype=torch.float64)
    for clean_row, spliced_row, row_tokens in zip(clean_logits, spliced_logits, tokens):
        clean = F.log_softmax(clean_row.float(), dim=-1)
        spliced = F.log_softmax(spliced_row.float(), dim=-1)
        targets = row_tokens[1:, None]
        sums[0] -= clean[:-1].gather(1, targets).double().sum()
        sums[1] -= spliced[:-1].gather(1, targets).double().sum()
        sums[2] += (clean.exp() * (clean - spliced)).sum(-1).double().sum()
    predicted = tokens.shape[0] * (tokens.shape[1] - 1)
    return float(sums[0]) / predicted, float(sums[1]) / predicted, float(sums[2]) / tokens.numel()


class AblatedRows:
    """Next-token loss of an ablated residual through the suffix, run once per distinct window.

    An ablation overwrites every kept position with one value, so windows that differ only there
    (with BOS alone skipped: every window) reach the suffix identical, and the suffix treats windows
    independently and from the residual alone (``split_forward``): one window's log-probs serve
    them all. The previous batch's distinct windows are kept too: the zero-ablated window is the
    same in every batch, so the whole slice runs it once (the running mean changes per batch)."""

    def __init__(self, cut):
        self.cut = cut
        self.previous: list[tuple[torch.Tensor, torch.Tensor]] = []  # (window residual, its log-probs)

    def loss(self, tokens: torch.Tensor, residual: torch.Tensor) -> float:
        distinct, which = torch.unique(residual.flatten(1), dim=0, return_inverse=True)
        distinct = distinct.view(-1, *residual.shape[1:])
        log_probs: list[torch.Tensor | None] = [
            next((lp for row, lp in self.previous if torch.equal(row, window)), None) for window in distinct]
        missing = [i for i, lp in enumerate(log_probs) if lp is None]
        if missing:
            first = [int((which == i).nonzero()[0]) for i in missing]  # tokens give the suffix its shape only
            logits = self.cut.suffix(tokens[first], distinct[missing])
            for i, window_logits in zip(missing, logits):
                log_probs[i] = F.log_softmax(window_logits.float(), dim=-1)
        self.previous = list(zip(distinct, log_probs))
        total = torch.zeros((), dtype=torch.float64)
        for row_tokens, i in zip(tokens, which.tolist()):
            total -= log_probs[i][:-1].gather(1, row_tokens[1:, None]).double().sum()
        return float(total) / (tokens.shape[0] * (tokens.shape[1] - 1))


def splice(sae: SAE, keep: torch.Tensor, inputs: torch.Tensor | None = None):
    """A hook function that replaces the kept positions' activations by the SAE's reconstruction
    (a transcoder's prediction from ``inputs``, its input hook's activations of the same tokens)."""

    def replace(acts: torch.Tensor) -> torch.Tensor:
        out = acts.clone()
        out[keep] = sae((acts if inputs is None else inputs)[keep].float()).to(acts.dtype)
        return out

    return replace


def overwrite(keep: torch.Tensor, value: torch.Tensor | float):
    def replace(acts: torch.Tensor) -> torch.Tensor:
        out = acts.clone()
        out[keep] = value if isinstance(value, float) else value.to(acts.dtype)
        return out

    return replace


@dataclass
class BatchBaseline:
    """What one batch of a dataset slice gives whatever SAE is evaluated: its tokens (to check the
    slice really is the same), the residual at the cut (None when over the memory budget), and the
    losses with the hook zero- and mean-ablated."""

    tokens: torch.Tensor
    residual: torch.Tensor | None
    loss_zero: float
    loss_mean: float


# model -> slice key -> per-batch baselines; dropped with the model.
BASELINES: "weakref.WeakKeyDictionary[Any, dict[tuple, list[BatchBaseline]]]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def evaluate_in_model(
    sae: SAE,
    model,
    *,
    hook: str | None = None,
    dataset: str = "default",
    split: str = "heldout",
    context: int = 128,
    batch_size: int = 8,
    max_tokens: int = 8192,
    prepend_bos: bool = True,
    skip_bos: bool = True,
    progress: bool = True,
    shared_prefix: bool = True,
) -> dict[str, Any]:
    from sae_kit.harvest import HarvestConfig, WindowStream

    hook = hook or sae.cfg.metadata.get("hook_name")
    if not hook:
        raise ValueError("the SAE's cfg.json names no hook_name; pass --hook")
    if model.hook_dim(hook) != sae.cfg.d_in:
        raise ValueError(f"hook {hook} has width {model.hook_dim(hook)} but the SAE expects d_in={sae.cfg.d_in}")
    # A transcoder replaces its output hook; the interventions and the mean act there.
    target = sae.cfg.metadata.get("hook_name_out") if sae.is_transcoder else None
    if sae.is_transcoder and (not target or model.hook_dim(target) != sae.d_out):
        raise ValueError(f"a transcoder needs its output hook (metadata hook_name_out, {target!r}) of width "
                         f"d_out={sae.d_out} in the model")
    out_hook = target or hook
    sae.eval()
    stream = WindowStream(HarvestConfig(out="", hooks=[hook], dataset=dataset, context=context, batch_size=batch_size,
                                        prepend_bos=prepend_bos, skip_bos=skip_bos), model.tokenizer, split=split)
    cut = split_at(model, hook) if shared_prefix and target is None else None
    slice_key = (hook, dataset, split, context, batch_size, prepend_bos, skip_bos)
    cached = BASELINES.setdefault(model, {}).setdefault(slice_key, []) if cut is not None else []
    ablated = {"zero": AblatedRows(cut), "mean": AblatedRows(cut)} if cut is not None else {}
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mean": 0.0, "kl": 0.0}
    output_sums = torch.zeros(3, dtype=torch.float64)  # transcoders: Σ‖y − ŷ‖², Σ‖y‖², and n; Σy below
    output_sum = None
    mean_sum, mean_count, seen, n_windows, kept_bytes = None, 0, 0, 0, 0
    bar = tqdm(total=max_tokens, unit="tok", desc="eval in model", disable=not progress)
    for index, tokens in enumerate(stream.batches()):
        # On the model's device: the losses compare its logits with these tokens.
        tokens = tokens.to(model.device)
        keep = stream.keep_mask(tokens)
        if cut is None:
            recorded: dict[str, torch.Tensor] = {}
            # An SAE's one hook records "acts"; a transcoder's input hook records "inputs" too.
            record = {name: (lambda acts, key=key: recorded.setdefault(key, acts))
                      for name, key in ((hook, "inputs"), (out_hook, "acts"))}
            clean = model.logits(tokens, replace=record)
            acts = recorded["acts"]
            inputs = recorded.get("inputs", acts)
        else:
            baseline = cached[index] if index < len(cached) else None
            if baseline is not None and not torch.equal(baseline.tokens, tokens.cpu()):
                del cached[index:]  # the dataset changed under the same name: recompute from here on
                baseline = None
            acts = baseline.residual if baseline is not None and baseline.residual is not None else cut.prefix(tokens)
        batch_sum = acts[keep].double().sum(0)
        mean_sum = batch_sum if mean_sum is None else mean_sum + batch_sum
        mean_count += int(keep.sum())
        mean_value = (mean_sum / mean_count).float()
        if cut is None:
            spliced = model.logits(tokens, replace={out_hook: splice(sae, keep, inputs if target else None)})
            loss_zero = next_token_loss(model.logits(tokens, replace={out_hook: overwrite(keep, 0.0)}), tokens).item()
            loss_mean = next_token_loss(model.logits(tokens, replace={out_hook: overwrite(keep, mean_value)}), tokens).item()
            if target:
                y = acts[keep].double()
                output_sums += torch.tensor([(y - sae(inputs[keep].float()).double()).pow(2).sum(), y.pow(2).sum(),
                                             y.shape[0]], dtype=torch.float64)
                output_sum = y.sum(0) if output_sum is None else output_sum + y.sum(0)
        else:
            loss_clean, loss_sae, kl = clean_spliced_losses(cut.suffix(tokens, acts),
                                                            cut.suffix(tokens, splice(sae, keep)(acts)), tokens)
            if baseline is None:
                loss_zero = ablated["zero"].loss(tokens, overwrite(keep, 0.0)(acts))
                loss_mean = ablated["mean"].loss(tokens, overwrite(keep, mean_value)(acts))
                keep_residual = kept_bytes + acts.numel() * acts.element_size() <= RESIDUAL_CACHE_BYTES
                kept_bytes += acts.numel() * acts.element_size() if keep_residual else 0
                if index == len(cached):
                    cached.append(BatchBaseline(tokens.cpu(), acts if keep_residual else None, loss_zero, loss_mean))
            else:
                loss_zero, loss_mean = baseline.loss_zero, baseline.loss_mean
        # Weighted by the batch's windows (all of the same length): the last batch may be short, and
        # every position must count alike in the averages.
        windows = tokens.shape[0]
        if cut is None:
            loss_clean, loss_sae = next_token_loss(clean, tokens).item(), next_token_loss(spliced, tokens).item()
            kl = kl_to_clean(clean, spliced).item()
        totals["clean"] += loss_clean * windows
        totals["sae"] += loss_sae * windows
        totals["zero"] += loss_zero * windows
        totals["mean"] += loss_mean * windows
        totals["kl"] += kl * windows
        n_windows += windows
        seen += tokens.numel()
        bar.update(tokens.numel())
        if seen >= max_tokens:
            break
    bar.close()
    if n_windows == 0:
        raise ValueError(f"no {split} text to evaluate on in {dataset!r}")
    loss = {name: value / n_windows for name, value in totals.items()}
    transcoder = {}
    if target:
        sse, square_sum, n = output_sums.tolist()
        transcoder = {"hook_out": target,
                      "fvu_output": sse / max(square_sum - float(output_sum.pow(2).sum()) / max(n, 1), 1e-30)}
    return {
        **transcoder,
        "hook": hook,
        "n_tokens": seen,
        "loss_clean": loss["clean"],
        "loss_sae": loss["sae"],
        "loss_zero_ablation": loss["zero"],
        "loss_mean_ablation": loss["mean"],
        "ce_recovered_vs_zero": (loss["zero"] - loss["sae"]) / (loss["zero"] - loss["clean"]),
        "ce_recovered_vs_mean": (loss["mean"] - loss["sae"]) / (loss["mean"] - loss["clean"]),
        "delta_lm_loss": loss["sae"] - loss["clean"],
        "kl_div": loss["kl"],
    }


def write_in_model_eval(sae_dir: str | Path, metrics: dict[str, Any]) -> Path:
    path = Path(sae_dir) / IN_MODEL_FILE
    path.write_text(json.dumps(metrics, indent=2))
    return path
