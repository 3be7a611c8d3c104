"""Session 5 diagnostic for issue 12: where do dead latents come from (training vs held-out, batch rule vs threshold)?

    python scripts/diagnose_dead_latents.py mutual_choice gba_imbalanced 0 ['{"aux_slots": "deficit"}']
"""
"""Diagnose dead latents: training vs held-out, batch rule vs threshold rule."""
import copy, json, sys, tempfile, time
import torch
from sae_kit.eval.synthetic import SyntheticSource, make_dataset
from sae_kit.experiments.bench import DATASETS, DEAD_TOKENS, LEARNING_RATE
from sae_kit.train.trainer import TrainConfig, Trainer
from sae_kit.kernels import batch_top_entries
from sae_kit.eval.evaluate import evaluate_sae
torch.set_num_threads(1)
arch, name, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
s = DATASETS[name]; ds = make_dataset(name, seed=seed); src = SyntheticSource(ds)
steps = s.steps
out = tempfile.mkdtemp(prefix="diag-", dir="/work/scratch/s5-mc")
cfg = TrainConfig(out=out, architecture=arch, k=s.k, d_sae=s.d_sae, options=opts, expansion=1, lr=LEARNING_RATE,
                  batch_size=s.batch_size, tokens=steps * s.batch_size, warmup_steps=min(100, steps // 10),
                  dead_tokens_threshold=DEAD_TOKENS, eval_every=10**9, checkpoint_every=10**9, log_every=100, seed=seed, progress=False)
t = time.time()
tr = Trainer(cfg, src)
trace = []
orig = tr.train_step
def step(x):
    r = orig(x)
    if (tr.step + 1) % 250 == 0:
        sae = tr.sae
        d = {"step": tr.step + 1, "dead_train": round(r["dead_fraction"], 3)}
        if hasattr(sae, "feature_density"):
            w = sae.underutilisation_weights()
            d["n_cand"] = int((w > 0).sum()); d["n_dead"] = int(sae.dead_mask().sum())
        trace.append(d); print(json.dumps(d), flush=True)
    return r
tr.train_step = step
sae = tr.run()
print("train s", round(time.time() - t, 1))
dead_train = sae.dead_mask().float().mean().item()
# held-out: batch rule vs threshold rule
B = s.batch_size
fired_batch = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
fired_thr = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
maxpre = torch.full((sae.cfg.d_sae,), -1e9)
it = src.iter_batches(B, split="heldout", seed=0, epochs=1, drop_last=False)
sae.eval(); seen = 0
with torch.no_grad():
    while seen < 16384:
        x = next(it).float(); x_n, _ = sae.normalize(x); pre = sae.pre_activations(x_n)
        maxpre = torch.maximum(maxpre, pre.max(0).values)
        if hasattr(sae, "threshold"):
            fired_thr |= (pre > sae.threshold).any(0)
        else:
            fired_thr |= sae.select(pre, x_n).fired()
        if arch in ("mutual_choice", "batchtopk"):
            r, c = batch_top_entries(pre, sae.k * pre.shape[0]); fired_batch[c] = True
        seen += x.shape[0]
res = {"arch": arch, "data": name, "seed": seed, "opts": opts, "dead_train_mask": round(dead_train, 3),
       "heldout_dead_threshold_rule": round(1 - fired_thr.float().mean().item(), 3),
       "heldout_dead_batch_rule": round(1 - fired_batch.float().mean().item(), 3) if arch in ("mutual_choice", "batchtopk") else None,
       "heldout_maxpre_le0": round((maxpre <= 0).float().mean().item(), 3)}
if hasattr(sae, "threshold"):
    thr = sae.threshold if sae.threshold.numel() > 1 else sae.threshold.expand(sae.cfg.d_sae)
    res["threshold_mean"] = float(thr.mean())
    res["dead_but_maxpre_pos"] = int(((~fired_thr) & (maxpre > 0)).sum())
ev = evaluate_sae(sae, src, max_tokens=16384, batch_size=4096)
res.update({"eval_dead": round(ev["dead_fraction"], 3), "l0": round(ev["l0_mean"], 2), "fvu": round(ev["fvu"], 3)})
if hasattr(sae, "feature_density"):
    dens = sae.feature_density
    res["density_quantiles"] = [round(float(q), 5) for q in torch.quantile(dens, torch.tensor([0, .1, .25, .5, .75, .9, 1.]))]
    res["n_density_zero"] = int((dens < 1e-6).sum())
print("RESULT", json.dumps(res), flush=True)
