"""What a server serves: the SAE folders under one root, their feature stores, and their models.

SAE ids are made once, at start-up, from the folders found under the served root (the folder path
relative to the root, ``/`` written as ``.``); requests name SAEs and models only by these ids,
which are looked up in a dictionary and never joined to a path, so no request can reach a file
outside the root. Each model is loaded once and guarded by a lock: a transformer-lens model carries
hook state while it runs, so requests take turns on it (with two CPU cores, running them one at a
time is also the fastest order).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_kit.config import ConfigError
from sae_kit.feature_store import STORE_FILE, FeatureStore, FeatureStoreError
from sae_kit.sae.base import CONFIG_FILE, WEIGHTS_FILE
from sae_kit.sae_folders import find_sae_folders, sae_id, synthetic_dataset


@dataclass(frozen=True)
class Limits:
    """What one request may ask for beyond the schema's own bounds (which do not depend on the model)."""

    max_body_bytes: int = 64 * 1024
    max_prompt_tokens: int = 256
    max_text_tokens: int = 512


@dataclass
class ServedModel:
    id: str
    model: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    sae_ids: list[str] = field(default_factory=list)
    # Concurrent steering / text requests for this model, gathered into batches (made on first use).
    batchers: dict[str, Any] = field(default_factory=dict)

    def batcher(self, kind: str, run_batch, max_batch: int = 64) -> Any:
        from sae_kit.batching import MicroBatcher

        with _BATCHERS_LOCK:
            if kind not in self.batchers:
                self.batchers[kind] = MicroBatcher(run_batch, lock=self.lock, max_batch=max_batch,
                                                   name=f"{self.id} {kind}")
            return self.batchers[kind]


_BATCHERS_LOCK = threading.Lock()


@dataclass
class ServedSAE:
    id: str
    path: Path
    sae: Any
    hook: str
    model_id: str
    store: FeatureStore | None
    store_problem: str | None = None

    @property
    def output_hook(self) -> str:
        """Where the SAE writes: its own hook, or a transcoder's output hook (steering acts there)."""
        return self.sae.cfg.metadata.get("hook_name_out") or self.hook if self.sae.is_transcoder else self.hook

    def describe(self) -> dict[str, Any]:
        cfg = self.sae.cfg
        return {"id": self.id, "model": self.model_id, "hook": self.hook, "architecture": cfg.architecture,
                **({"hook_out": self.output_hook, "d_out": self.sae.d_out} if self.sae.is_transcoder else {}),
                "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k if self.sae.uses_k else None,
                "analysed": self.store is not None, "analysis": self._analysis_summary(),
                "store_problem": self.store_problem, "served": True, "problem": None}

    def _analysis_summary(self) -> dict[str, Any] | None:
        if self.store is None:
            return None
        meta = self.store.meta
        return {key: meta.get(key) for key in ("dataset", "split", "n_tokens", "n_windows", "context", "created")}


class Registry:
    def __init__(self, root: str | Path, *, model_name: str | None = None, device: str = "cpu",
                 limits: Limits = Limits(), lenient: bool = False):
        """``lenient`` (a server that also trains): an empty folder is fine and an SAE that cannot be
        served (no model named, a synthetic one...) is listed in ``skipped`` instead of stopping the server."""
        self.limits = limits
        self.root = Path(root).resolve()
        self.model_name = model_name
        self.device = device
        self.skipped: dict[str, str] = {}
        self._model_ids: dict[str, str] = {}  # model name or path -> its id
        self._lock = threading.Lock()
        if not self.root.is_dir():
            raise FileNotFoundError(f"cannot serve {root}: no such folder")
        self.saes: dict[str, ServedSAE] = {}
        self.models: dict[str, ServedModel] = {}
        folders = find_sae_folders(self.root)
        if not folders and not lenient:
            raise FileNotFoundError(f"no SAE folder ({CONFIG_FILE} + {WEIGHTS_FILE}) under {self.root}; "
                                    "train one (sae-kit train / sae-kit demo) or serve the folder that holds it")
        for folder in folders:
            try:
                self.add_folder(folder)
            except Exception:  # kept in skipped: listed by GET /api/saes with its problem, the others served
                pass
        if not self.saes and not lenient:
            problems = "; ".join(f"{sae_id}: {problem}" for sae_id, problem in self.skipped.items())
            raise ConfigError(f"none of the SAE folders under {self.root} can be served ({problems})")

    def sae_id(self, folder: Path) -> str:
        return sae_id(self.root, folder)

    def add_folder(self, folder: Path) -> ServedSAE:
        """Serve (or serve again, e.g. after its analysis) the SAE in ``folder``, loading its model once;
        why it cannot be served is kept in ``skipped``."""
        try:
            return self._add_folder(folder)
        except Exception as exc:
            self.skipped[self.sae_id(folder)] = str(exc)
            raise

    def _add_folder(self, folder: Path) -> ServedSAE:
        from sae_kit.models import load_model
        from sae_kit.sae import load_sae

        folder = Path(folder).resolve()
        sae = load_sae(folder)
        store, problem = None, None
        if (folder / STORE_FILE).is_file():
            try:
                store = FeatureStore(folder / STORE_FILE)
            except FeatureStoreError as exc:
                problem = str(exc)
        else:
            problem = f"not analysed yet: run `sae-kit analyze {folder}`"
        # An SAE analysed against a model other than its training source's (e.g. one trained on
        # synthetic activations) is served with the model and hook of its feature store.
        name, hook = sae.cfg.metadata.get("model_name"), sae.cfg.metadata.get("hook_name")
        planted = synthetic_dataset(sae.cfg.metadata)
        if (not name or planted) and store is not None:
            name, hook = store.meta.get("model"), store.meta.get("hook")
            planted = synthetic_dataset({"model_name": name})
        name = self.model_name or name
        if not self.model_name and planted:
            raise ConfigError(f"{self.sae_id(folder)} was trained on synthetic activations ({planted}); analyse it against a model "
                              "of the same width (POST /api/runs/{id}/analyze or sae-kit analyze --model --hook) to browse it")
        if not hook or not name:
            raise ConfigError(f"{folder / CONFIG_FILE} names no hook_name/model_name in its metadata; "
                              "the server needs both to run the SAE")
        sae_id = self.sae_id(folder)
        with self._lock:
            if name not in self._model_ids:
                model = load_model(name, device=self.device)
                self._model_ids[name] = _model_id(name, self.models)
                self.models[self._model_ids[name]] = ServedModel(id=self._model_ids[name], model=model)
            served_model = self.models[self._model_ids[name]]
            if served_model.model.hook_dim(hook) != sae.cfg.d_in:
                raise ConfigError(f"SAE {sae_id} reads {sae.cfg.d_in}-wide activations but {hook} of {name} is "
                                  f"{served_model.model.hook_dim(hook)} wide")
            self.saes[sae_id] = ServedSAE(sae_id, folder, sae, hook, served_model.id, store, problem)
            self.skipped.pop(sae_id, None)
            if sae_id not in served_model.sae_ids:
                served_model.sae_ids.append(sae_id)
        return self.saes[sae_id]

    def describe_saes(self) -> list[dict[str, Any]]:
        """The served SAEs, then the SAE folders that cannot be served, each with its problem."""
        broken = [{"id": sae_id, "served": False, "problem": problem, "analysed": False}
                  for sae_id, problem in sorted(self.skipped.items())]
        return [served.describe() for served in self.saes.values()] + broken

    def health(self) -> dict[str, Any]:
        """"ok", or "degraded" with what is wrong by SAE id (a feature store damaged while served)."""
        problems = {sae_id: problem for sae_id, served in list(self.saes.items())
                    if served.store is not None and (problem := served.store.problem())}
        return {"status": "degraded", "problems": problems} if problems else {"status": "ok"}

    def describe_models(self) -> list[dict[str, Any]]:
        return [{"id": m.id, "name": m.id, "n_layers": m.model.n_layers, "d_model": m.model.d_model,
                 "d_vocab": m.model.d_vocab, "hooks": sorted({self.saes[s].hook for s in m.sae_ids}),
                 "saes": m.sae_ids} for m in self.models.values()]

    def describe_hooks(self) -> list[dict[str, Any]]:
        hooks: dict[tuple[str, str], list[str]] = {}
        for served in self.saes.values():
            hooks.setdefault((served.model_id, served.hook), []).append(served.id)
        return [{"model": model, "hook": hook, "saes": ids} for (model, hook), ids in hooks.items()]


def _model_id(name: str, taken: dict[str, ServedModel]) -> str:
    # A model loaded from a folder is shown by the folder's name, not its path on the server.
    base = Path(name).name if ("/" in name or "\\" in name) else name
    candidate, n = base, 1
    while candidate in {m.id for m in taken.values()}:
        n += 1
        candidate = f"{base}-{n}"
    return candidate
