"""The ``sae-kit`` command line: train (resume after SIGKILL, YAML configs, options, errors), eval,
store synth and bench synthetic.

Most commands run in-process through ``sae_kit.cli.main`` (its return value is the exit status the
console script passes to ``sys.exit``); the SIGKILL test runs the installed console script.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_kit.cli import main
from sae_kit.eval.synthetic import SyntheticSource, make_dataset, write_synthetic_store
from sae_kit.sae import load_sae
from sae_kit.store import ActivationStore, write_store
from sae_kit.train.checkpoint import find_checkpoint, load_checkpoint

D_IN = 16
SMALL_RUN = [  # 30 steps of a tiny TopK SAE: under a second
    "--arch", "topk", "--k", "4", "--d-sae", "64", "--batch-size", "128", "--tokens", str(128 * 30),
    "--warmup-steps", "5", "--eval-every", "10", "--eval-tokens", "256", "--checkpoint-every", "10",
    "--log-every", "5", "--dead-tokens-threshold", "2000", "--threads", "1", "--no-progress",
]


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("sae-kit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sae_kit.cli"]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def read_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]



@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    dataset = make_dataset("sharkey", seed=0, d=D_IN, n_features=64)
    data = dataset.sample(8192, torch.Generator().manual_seed(1))[0]
    path = tmp_path_factory.mktemp("cli-store") / "acts"
    write_store(path, data, shard_tokens=4096)
    return path


@pytest.fixture(scope="module")
def trained_run(store_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-run") / "run"
    assert main(["train", "--activations", str(store_dir), "--out", str(out), *SMALL_RUN]) == 0
    return out


# ------------------------------------------------------------------ SIGKILL and --resume (acceptance)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    dataset = make_dataset("sharkey", seed=0, d=32, n_features=96)
    store = tmp_path / "store"
    write_store(store, dataset.sample(40_000, torch.Generator().manual_seed(2))[0], shard_tokens=15_000)
    total = 320  # 320 steps of 128 tokens: 38000 train rows = 296 batches, so the run crosses an epoch
    flags = ["--activations", str(store), "--arch", "topk", "--k", "8", "--d-sae", "128",
             "--batch-size", "128", "--tokens", str(128 * total), "--warmup-steps", "20",
             "--checkpoint-every", "20", "--eval-every", "80", "--eval-tokens", "1024", "--log-every", "10",
             "--dead-tokens-threshold", "5000", "--threads", "1", "--no-progress"]
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    env = subprocess_env()
    start = [*console_script(), "train", *flags, "--out"]
    ref_proc = subprocess.Popen([*start, str(reference)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc = subprocess.Popen([*start, str(victim)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        state_file = victim / "checkpoint" / "state.json"
        deadline = time.monotonic() + 120
        killed_after = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                step = json.loads(state_file.read_text())["step"]
            except (OSError, ValueError, KeyError):  # not written yet, or being swapped in
                step = 0
            if step >= 60:
                proc.send_signal(signal.SIGKILL)
                killed_after = step
                break
            time.sleep(0.01)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
        assert killed_after is not None, f"the run ended (rc={proc.returncode}) before it could be killed:\n{output}"
        assert proc.returncode == -signal.SIGKILL

        # It died mid-run: no final SAE, a checkpoint somewhere between step 60 and the end.
        assert not (victim / "sae").exists()
        checkpoint = find_checkpoint(victim)
        assert checkpoint is not None
        saved_step = json.loads((checkpoint / "state.json").read_text())["step"]
        assert 60 <= saved_step < total
        config_mtime = (victim / "config.json").stat().st_mtime_ns

        resumed = subprocess.run([*console_script(), "train", "--out", str(victim), "--resume", "--threads", "1",
                                  "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "trained topk SAE (32 -> 128)" in resumed.stdout and "fvu" in resumed.stdout
        ref_output = ref_proc.communicate(timeout=300)[0].decode(errors="replace")
        assert ref_proc.returncode == 0, ref_output
    finally:
        for running in (proc, ref_proc):
            if running.poll() is None:
                running.kill()
                running.wait()

    # The resumed run continued from the checkpoint (a fresh start would rewrite config.json) ...
    assert (victim / "config.json").stat().st_mtime_ns == config_mtime
    # ... and ends bit-identical to the uninterrupted one.
    expected = load_file(str(reference / "sae" / "sae_weights.safetensors"))
    got = load_file(str(victim / "sae" / "sae_weights.safetensors"))
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"tensors differ from the uninterrupted run: {different}"
    assert json.loads((victim / "sae" / "cfg.json").read_text()) == json.loads((reference / "sae" / "cfg.json").read_text())

    # metrics.jsonl: the lines written after the checkpoint by the killed process were dropped, so
    # every step appears once and the file equals the uninterrupted run's.
    records = read_records(victim)
    assert records == read_records(reference)
    train_steps = [r["step"] for r in records if "loss" in r]
    eval_steps = [r["step"] for r in records if "eval/fvu" in r]
    assert train_steps == list(range(10, total + 1, 10))
    assert eval_steps == list(range(80, total + 1, 80))
    assert records[-1]["step"] == total
    assert "plotly" in (victim / "report.html").read_text().lower()
    evaluation = json.loads((victim / "sae" / "eval.json").read_text())
    for key in ("fvu", "l0_mean", "dead_fraction"):
        assert math.isfinite(evaluation[key])
    assert evaluation["fvu"] < 1.0
    assert not (victim / "checkpoint.tmp").exists() and not (victim / "checkpoint.old").exists()


# ------------------------------------------------------------------------------------- train


def test_train_from_yaml_with_flag_override(store_dir, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(
        f"activations: {store_dir}\n"
        "architecture: topk\nk: 4\nd_sae: 64\nbatch_size: 128\ntokens: 2560\nwarmup_steps: 5\n"
        "eval_every: 10\neval_tokens: 256\ncheckpoint_every: 10\nlog_every: 5\nthreads: 1\n"
        "adam_betas: [0.9, 0.99]\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--k", "6", "--out", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert f"trained topk SAE ({D_IN} -> 64) saved to {out / 'sae'}" in stdout
    assert "fvu" in stdout and "report.html" in stdout
    written = json.loads((out / "config.json").read_text())
    assert written["k"] == 6  # the flag wins
    assert written["d_sae"] == 64 and written["batch_size"] == 128 and written["tokens"] == 2560  # from YAML
    assert written["adam_betas"] == [0.9, 0.99] and written["activations"] == str(store_dir)
    assert written["out"] == str(out) and written["progress"] is False
    sae = load_sae(out / "sae")
    assert sae.cfg.k == 6 and sae.cfg.d_sae == 64
    assert (out / "report.html").is_file()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 20


def test_opt_selection_batch_reaches_abstopk(store_dir, tmp_path):
    out = tmp_path / "run"
    flags = [a if a != "topk" else "abstopk" for a in SMALL_RUN]
    assert main(["train", "--activations", str(store_dir), "--out", str(out), *flags,
                 "--opt", "selection=batch", "--opt", "threshold_beta=0.9"]) == 0
    # Typed when the config is built: config.json holds 0.9, not "0.9".
    assert json.loads((out / "config.json").read_text())["options"] == {"selection": "batch", "threshold_beta": 0.9}
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "abstopk"
    assert cfg["sae_kit"]["options"] == {"selection": "batch", "threshold_beta": 0.9}
    sae = load_sae(out / "sae")
    assert sae.opts.selection == "batch"
    # Only the batch rule trains the inference threshold.
    assert float(sae.threshold_weight) > 0 and (sae.threshold > 0).all()


def _yaml(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_TRAIN_INPUTS = {
    "missing store": (lambda s, t, r: ["--activations", str(t / "no-such-store"), "--out", str(t / "o")],
                      "not an activation store"),
    "no activations": (lambda s, t, r: ["--out", str(t / "o")], "no activations"),
    "existing run without --resume": (lambda s, t, r: ["--activations", str(s), "--out", str(r)],
                                      "pass --resume"),
    "resume without checkpoint": (lambda s, t, r: ["--activations", str(s), "--out", str(t / "o"), "--resume"],
                                  "no checkpoint"),
    "unknown --opt key": (lambda s, t, r: ["--activations", str(s), "--out", str(t / "o"), "--opt", "bogus=1"],
                          "unknown option(s) ['bogus']"),
    "malformed --opt": (lambda s, t, r: ["--activations", str(s), "--out", str(t / "o"), "--opt", "foo"],
                        "--opt expects key=value, got 'foo'"),
    "unknown YAML setting": (lambda s, t, r: ["--config", _yaml(t, "c.yaml", "k: 4\nbogus_setting: 1\n"),
                                              "--activations", str(s), "--out", str(t / "o")],
                             "unknown training setting(s) ['bogus_setting']"),
    "YAML not a mapping": (lambda s, t, r: ["--config", _yaml(t, "c.yaml", "- k\n- 4\n"),
                                            "--activations", str(s), "--out", str(t / "o")],
                           "must hold a mapping"),
    "missing config file": (lambda s, t, r: ["--config", str(t / "nope.yaml"), "--activations", str(s),
                                             "--out", str(t / "o")],
                            "does not exist"),
    "out-of-range flag": (lambda s, t, r: ["--activations", str(s), "--out", str(t / "o"), "--batch-size", "0"],
                          "batch_size must be >= 1"),
    "negative grad clip": (lambda s, t, r: ["--activations", str(s), "--out", str(t / "o"), "--grad-clip", "-1"],
                           "grad_clip must be >= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN_INPUTS))
def test_bad_train_inputs_exit_2_with_message(case, store_dir, trained_run, tmp_path, capsys):
    make_args, message = BAD_TRAIN_INPUTS[case]
    before = (trained_run / "checkpoint" / "state.json").read_text()
    argv = make_args(store_dir, tmp_path, trained_run)
    if "--arch" not in argv:
        argv += ["--arch", "topk"]
    assert main(["train", *argv, "--threads", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sae-kit train: error: ")
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "sae").exists() and not (tmp_path / "o" / "checkpoint").exists()
    assert (trained_run / "checkpoint" / "state.json").read_text() == before  # the existing run is untouched


def test_unknown_arch_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["train", "--arch", "nope"])
    assert caught.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_divergence_exits_1_and_resume_continues(store_dir, tmp_path, monkeypatch, capsys):
    original = ActivationStore.iter_batches

    def poisoned(self, batch_size, **kwargs):
        batches = original(self, batch_size, **kwargs)
        if kwargs.get("split", "train") != "train":
            return batches

        def generate():
            for index, batch in enumerate(batches, start=kwargs.get("start_batch", 0)):
                if index == 12:
                    batch = batch.clone()
                    batch[0, 0] = float("nan")
                yield batch
        return generate()

    monkeypatch.setattr(ActivationStore, "iter_batches", poisoned)
    out = tmp_path / "run"
    flags = list(SMALL_RUN)
    flags[flags.index("--checkpoint-every") + 1] = "5"
    assert main(["train", "--activations", str(store_dir), "--out", str(out), *flags]) == 1
    err = capsys.readouterr().err
    checkpoint = find_checkpoint(out)
    assert err.startswith("sae-kit train: the loss became nan at step 13")
    assert f"the last good checkpoint is {checkpoint} (step 10" in err
    assert "Traceback" not in err
    _, _, state = load_checkpoint(checkpoint)
    assert state["step"] == 10
    assert not (out / "sae").exists()

    # With the data fixed, --resume (settings from the run's config.json) finishes the run.
    monkeypatch.setattr(ActivationStore, "iter_batches", original)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 30
    steps = [r["step"] for r in read_records(out) if "loss" in r]
    assert steps == list(range(5, 31, 5))


# -------------------------------------------------------------------------------------- eval


def test_eval_prints_fvu_and_writes_eval_json(trained_run, store_dir, tmp_path, capsys):
    sae_dir = trained_run / "sae"
    (sae_dir / "eval.json").unlink()
    assert main(["eval", str(sae_dir), "--activations", str(store_dir), "--batch-size", "256"]) == 0
    stdout = capsys.readouterr().out
    assert "fvu" in stdout and "l0_mean" in stdout and str(sae_dir / "eval.json") in stdout
    metrics = json.loads((sae_dir / "eval.json").read_text())
    assert metrics["n_tokens"] == math.ceil(0.05 * 8192)  # the whole held-out split, in batches of 256
    assert 0 <= metrics["fvu"] < 1 and metrics["l0_mean"] <= 4 and 0 <= metrics["dead_fraction"] <= 1
    assert f"{metrics['fvu']:.4f}" in stdout

    target = tmp_path / "train-split.json"
    assert main(["eval", str(sae_dir), "--activations", str(store_dir), "--split", "train",
                 "--tokens", "1000", "--batch-size", "256", "--json", str(target)]) == 0
    assert json.loads(target.read_text())["n_tokens"] == 1000


def test_eval_with_wrong_d_in_exits_2(trained_run, tmp_path, capsys):
    other = tmp_path / "other"
    write_store(other, torch.randn(1000, D_IN + 8))
    assert main(["eval", str(trained_run / "sae"), "--activations", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"d_in={D_IN + 8}" in err and f"expects {D_IN}" in err
    assert main(["eval", str(tmp_path / "no-sae"), "--activations", str(other)]) == 2
    assert "cfg.json" in capsys.readouterr().err


# -------------------------------------------------------------------------------- store synth


def test_store_synth_writes_requested_store(tmp_path, capsys):
    out = tmp_path / "synth"
    argv = ["store", "synth", "--dataset", "sharkey", "--tokens", "5000", "--d-in", "16", "--features", "32",
            "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    assert "wrote 5000 tokens of d_in=16" in capsys.readouterr().out
    store = ActivationStore(out)
    assert store.n_tokens == 5000 and store.d_in == 16 and store.dtype == torch.float32
    rows = store.read(0, 5000)
    # The store holds the SyntheticSource's training stream for that seed, in order.
    source = SyntheticSource(make_dataset("sharkey", seed=3, d=16, n_features=32))
    assert torch.equal(rows, next(source.iter_batches(65536, seed=3))[:5000])
    assert rows.abs().sum() > 0
    # A second write into the same folder is refused.
    assert main(argv) == 2
    assert "already holds a store" in capsys.readouterr().err
    assert ActivationStore(out).n_tokens == 5000


def test_write_synthetic_store_across_chunks(tmp_path):
    dataset = make_dataset("signed", seed=0, d=16, n_features=32)
    store = write_synthetic_store(tmp_path / "s", dataset, tokens=2500, seed=1, chunk=1000, dtype="bfloat16")
    assert store.n_tokens == 2500 and store.d_in == 16 and store.dtype == torch.bfloat16
    batches = SyntheticSource(dataset).iter_batches(1000, seed=1)
    expected = torch.cat([next(batches) for _ in range(3)])[:2500].to(torch.bfloat16)
    assert torch.equal(store.read(0, 2500, dtype=torch.bfloat16), expected)


# ------------------------------------------------------------------------------ bench synthetic


def test_bench_synthetic_small(tmp_path, capsys):
    torch.set_num_threads(1)  # restored by the autouse fixture
    target = tmp_path / "bench.json"
    assert main(["bench", "synthetic", "--dataset", "signed", "--arch", "topk", "abstopk",
                 "--steps-scale", "0.05", "--json", str(target), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "mmcs" in stdout and "latents/feature" in stdout
    rows = json.loads(target.read_text())
    assert [(row["dataset"], row["arch"]) for row in rows] == [("signed", "topk"), ("signed", "abstopk")]
    for row in rows:
        for key in ("mmcs", "frr@0.9", "latents/feature"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), key
        assert 0 <= row["frr@0.9"] <= 1 and 0 < row["mmcs"] <= 1
        assert row["l0"] == pytest.approx(4.0)
