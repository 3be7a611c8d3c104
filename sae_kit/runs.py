"""Training runs started by the server: a SQLite run registry and a small pool of worker threads, each
running one ``sae-kit train`` subprocess at a time.

A run is the CLI's ``train`` on a TrainConfig validated here (the same dataclass, the same checks);
its folder ``<data>/runs/<id>/`` is an ordinary run folder (``config.json``, ``metrics.jsonl``,
``checkpoint/``, ``sae/``), so progress and curves are read from ``metrics.jsonl`` and ``--resume``
continues from the last checkpoint. Training happens in child processes so the API stays
responsive; a child is told to die with its server (Linux ``PR_SET_PDEATHSIG``), and a server that
starts and finds runs recorded as running marks them ``interrupted``: resuming them continues from
their checkpoint.

Every path a run reads (activations, a model or dataset folder) must lie inside the data folder,
and it writes only its own run folder there.

Statuses: queued -> running -> finished | failed | cancelled | interrupted; the last three can be
resumed (queued again). Analysis of a finished run's SAE (``sae-kit analyze``) runs the same way.
"""
from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from sae_kit.config import ConfigError, check_known_keys, check_text, check_types
from sae_kit.config import options_schema as config_options_schema
from sae_kit.fileio import atomic_write
from sae_kit.sae_folders import is_model_path, sae_id, synthetic_dataset
from sae_kit.train.trainer import METRICS_FILE, TrainConfig, source_from_config

RUNS_DIR = "runs"
DB_FILE = ".sae-kit-runs.sqlite"
LOG_FILE = "train.log"
ANALYSIS_LOG_FILE = "analyze.log"
RESUMABLE = ("failed", "cancelled", "interrupted")
ACTIVE = ("queued", "running")
# Set by the server, not by the person starting the run.
SERVER_FIELDS = ("out", "progress")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL, config TEXT NOT NULL,
    total_steps INTEGER NOT NULL, created REAL NOT NULL, started REAL, ended REAL,
    attempt_started REAL, attempt_start_step INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT, analysis TEXT, analysis_error TEXT,
    eta_from_time REAL, eta_from_step INTEGER
)"""


# ------------------------------------------------------------------ validation
def confined(root: Path, value: str, what: str) -> Path:
    """``value`` (relative to the data folder, or absolute) as a resolved path that must stay inside ``root``.

    Links are followed (a link out of the folder is outside it); ``~`` is not expanded by the server
    and is refused rather than read as a folder named "~" that the child would expand."""
    check_text(value, what)
    if value.startswith("~"):
        raise ConfigError(f"{what} {value!r} is outside the server's data folder (the server does not expand "
                          "'~'); give a path inside the data folder")
    path = (root / value).resolve()
    if not path.is_relative_to(root):
        raise ConfigError(f"{what} {value!r} is outside the server's data folder; give a path inside it")
    return path


def confine_setting(root: Path, kind: str, value: str, what: str, keyword: Any = None) -> str:
    """A path-like setting (``kind`` as in ``plugins.api.PATH_KINDS``) checked and resolved inside ``root``;
    keywords ("auto", "default", "" for "the run's") and model names pass unchanged."""
    check_text(value, what)
    if value == keyword or (kind == "model" and not is_model_path(value, root)):
        return value
    parts = value.split("+") if kind == "stores" else [value]
    resolved = []
    for part in parts:
        if kind == "stores" and part == "":
            continue
        path = confined(root, part, what)
        if not path.exists():
            raise ConfigError(f"{what} {part!r} does not exist in the server's data folder")
        resolved.append(str(path))
    return "+".join(resolved)


def confine_plugin_paths(specs: Any, root: Path, implied: dict[str, str | None] | None = None) -> list[dict[str, Any]]:
    """Every plugin option declared as a path (``option(path=...)``) confined to ``root``, in place of its value.

    ``implied`` maps a path kind to what the run reads when such an option is left at its keyword "",
    already confined by the caller (e.g. a plugin's empty ``model`` runs the store's ``model_name``):
    a path is handed to the plugin in place of the keyword, so the child reads exactly the path checked
    there; None (a hub model name, not a path) leaves the keyword."""
    from sae_kit.plugins.api import get_plugin, path_options
    from sae_kit.train.plugin_set import normalize_specs

    specs = normalize_specs(specs)
    for spec in specs:
        declared = path_options(get_plugin(spec["name"]))
        for name, (kind, keyword) in declared.items():
            value = spec.get(name, keyword)
            if not isinstance(value, str):
                continue
            what = f"plugin {spec['name']} option {name}"
            if value == "" and kind in (implied or {}):
                if implied[kind] is not None:
                    spec[name] = implied[kind]
            elif name in spec:
                spec[name] = confine_setting(root, kind, value, what, keyword)
    return specs


def _store_model_name(activations: str) -> str | None:
    """The model_name recorded in an activation store's manifest (None when it cannot be read: opening
    the store for the run reports why)."""
    from sae_kit.store import ActivationStore

    try:
        return ActivationStore(activations).model_name
    except (OSError, ValueError):
        return None


def validate_run_config(data: Any, root: str | Path, out: Path) -> TrainConfig:
    """A TrainConfig for a run writing to ``out``, from a request's mapping; ConfigError says what is wrong.

    Every path the run can reach (activations, model, dataset, plugin options declared as paths) is
    confined to the data folder here, before the run is queued."""
    root = Path(root).resolve()
    check_known_keys(TrainConfig, data, "training setting", hidden=SERVER_FIELDS)
    chosen = sorted(set(data) & set(SERVER_FIELDS))
    if chosen:
        raise ConfigError(f"{chosen} are chosen by the server (each run writes its own folder); leave them out")
    check_text(data, "config")
    settings = check_types(TrainConfig, dict(data))
    if isinstance(settings.get("activations"), list):
        raise ConfigError("one activation store per run: give activations as one path")
    for key, kind, keyword in (("activations", "store", None), ("targets", "store", None), ("model", "model", None),
                               ("dataset", "dataset", "default")):
        value = settings.get(key)
        if isinstance(value, str) and value:
            settings[key] = confine_setting(root, kind, value, key, keyword)
    # The store's model_name is reached too: the finished run's SAE records it and the browser loads
    # that model to serve it (server/registry.py), and a plugin's empty model option runs it
    # (plugins/_text_model.py). A store copied from elsewhere may name "~/models/x" or an outside folder.
    implied = {}
    if not settings.get("model") and isinstance(settings.get("activations"), str) and settings["activations"]:
        model_name = _store_model_name(settings["activations"])
        if model_name:
            resolved = confine_setting(root, "model", model_name,
                                       "the store's model_name (the run's SAE and a plugin's empty model use it)")
            implied["model"] = resolved if is_model_path(model_name, root) else None
    settings["plugins"] = confine_plugin_paths(settings.get("plugins"), root, implied)
    cfg = TrainConfig.from_dict({**settings, "out": str(out), "progress": False})
    if cfg.model and not cfg.activations:
        if not cfg.hook:
            raise ConfigError("model needs hook (e.g. blocks.6.hook_resid_post)")
    else:
        try:
            source = source_from_config(cfg)  # opens the store: a missing or corrupt one is reported now
        except (OSError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        from sae_kit.sae import ARCHITECTURES

        ARCHITECTURES[cfg.architecture].check_config(cfg.sae_config(source.d_in, {}, getattr(source, "d_out", None)))
    return cfg


def config_schema() -> dict[str, Any]:
    """What a run form needs: TrainConfig's fields (JSON schema + CLI help), architectures and plugins with options."""
    from sae_kit.config import json_schema
    from sae_kit.plugins.api import available_plugins, options_schema
    from sae_kit.sae import ARCHITECTURES

    schema = json_schema(TrainConfig, skip=SERVER_FIELDS)
    architectures = [{"name": name, "summary": (cls.__doc__ or "").strip().split("\n")[0],
                      "options": config_options_schema(cls.Options)} for name, cls in sorted(ARCHITECTURES.items())]
    plugins = [{"name": name, "paper": cls.paper, "summary": cls.summary, "options": options_schema(cls),
                "conflicts": sorted(cls.conflicts)} for name, cls in available_plugins().items()]
    return {"train_config": schema, "architectures": architectures, "plugins": plugins}


# ------------------------------------------------------------------ metrics
def read_metrics(run_dir: Path, since_step: int = 0) -> list[dict[str, Any]]:
    """metrics.jsonl's records after ``since_step``; a line still being written is skipped."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) > since_step:
            records.append(record)
    return records


def latest_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The last training record merged with the last held-out evaluation."""
    latest: dict[str, Any] = {}
    for record in records:
        latest.update(record)
    return latest


# ------------------------------------------------------------------ registry
class RunStore:
    """The SQLite run registry (one connection, serialised by a lock: the API and the workers share it)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute(_SCHEMA)
        except sqlite3.OperationalError:
            raise  # cannot open or write: the caller says where
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{path} is not a readable run registry ({exc}); move it away to start a new one") from None

    def insert(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))

    def update(self, run_id: str, **values: Any) -> None:
        with self._lock:
            self._db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                             [*values.values(), run_id])

    def get(self, run_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return dict(row) if row else None

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute("SELECT * FROM runs ORDER BY created DESC, id DESC")]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _load_prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once here: between fork and exec (a threaded server) the child should only make the call.
_PRCTL = _load_prctl() if sys.platform == "linux" else None
PR_SET_PDEATHSIG = 1


def child_env() -> dict[str, str]:
    """The environment of a run's child process. ``python -m`` would put its working directory (the
    data folder) first on sys.path, so Python files there (a ``sae_kit/``, the repo's ``kernels/``
    shadowing the package transformers imports) would be imported instead of the installed ones:
    PYTHONSAFEPATH=1 (Python >= 3.11) keeps it off the path."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}


def _die_with_parent() -> None:  # pragma: no cover (runs in the child)
    # The child gets SIGTERM when the worker thread that started it (and so the server) dies.
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class RunService:
    """Queues, runs, cancels and resumes training runs under ``root/runs``; ``max_runs`` train at once."""

    def __init__(self, root: str | Path, *, max_runs: int = 1, on_sae_ready: Callable[[Path], None] | None = None,
                 python: str = sys.executable):
        if max_runs < 1:
            raise ConfigError(f"max_runs must be >= 1, got {max_runs}")
        self.root = Path(root).resolve()
        self.runs_dir = self.root / RUNS_DIR
        try:
            self.runs_dir.mkdir(exist_ok=True)
            self.store = RunStore(self.root / DB_FILE)
        except (OSError, sqlite3.OperationalError) as exc:
            raise ConfigError(f"cannot keep training runs in {self.root} ({exc}); serve a writable folder, "
                              "or pass --max-runs 0 to browse only") from None
        self.on_sae_ready = on_sae_ready
        self.python = python
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._processes: dict[str, subprocess.Popen] = {}
        self._cancelling: set[str] = set()
        self._closing = False
        self._lock = threading.Lock()
        for row in self.store.all():  # a previous server stopped (or died) while these were active
            if row["status"] in ACTIVE:
                self.store.update(row["id"], status="interrupted", ended=time.time(),
                                  error=f"the server stopped while the run was {row['status']}; "
                                        "resume it to continue from its last checkpoint")
            if row["analysis"] == "running":
                self.store.update(row["id"], analysis="failed", analysis_error="the server stopped during the analysis")
        self._workers = [threading.Thread(target=self._work, name=f"run-worker-{i}", daemon=True) for i in range(max_runs)]
        for worker in self._workers:
            worker.start()

    @property
    def max_runs(self) -> int:
        """How many runs train at once (one worker thread each)."""
        return len(self._workers)

    # ------------------------------------------------------------ requests
    def create(self, config: Any, name: str | None = None) -> dict[str, Any]:
        run_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        run_dir = self.runs_dir / run_id
        cfg = validate_run_config(config, self.root, run_dir)
        run_dir.mkdir()
        text = json.dumps(cfg.to_dict(), indent=2)
        atomic_write(run_dir / "config.json", lambda path: path.write_text(text))
        self.store.insert({"id": run_id, "name": (name or f"{cfg.architecture} {run_id}")[:200], "status": "queued",
                           "config": json.dumps(config), "total_steps": cfg.total_steps, "created": time.time()})
        self._queue.put(run_id)
        return self.describe(run_id)

    def cancel(self, run_id: str) -> dict[str, Any]:
        # Read and act under the lock a worker holds while it starts a run: otherwise a run read as
        # queued could be started in between, and "cancelled before it started" would train to the end.
        with self._lock:
            row = self._row(run_id)
            if row["status"] == "queued":
                self.store.update(run_id, status="cancelled", ended=time.time(), error="cancelled before it started")
            elif row["status"] == "running":
                self._cancelling.add(run_id)
                process = self._processes.get(run_id)
                if process is not None:
                    process.terminate()
            else:
                raise RunStateError(f"run {run_id} is {row['status']}; only queued or running runs can be cancelled")
        return self.describe(run_id)

    def resume(self, run_id: str) -> dict[str, Any]:
        with self._lock:  # as in cancel: two resumes of one run must not queue it twice
            row = self._row(run_id)
            if row["status"] not in RESUMABLE:
                raise RunStateError(f"run {run_id} is {row['status']}; only {', '.join(RESUMABLE)} runs can be resumed")
            self.store.update(run_id, status="queued", error=None, ended=None)
            self._queue.put(run_id)
        return self.describe(run_id)

    def analyze(self, run_id: str, model: str | None = None, hook: str | None = None, tokens: int = 4096,
                context: int = 64) -> dict[str, Any]:
        """Start ``sae-kit analyze`` on a finished run's SAE (in a thread); the feature browser serves it after."""
        from sae_kit.sae import load_sae

        row = self._row(run_id)
        if row["status"] != "finished":
            raise RunStateError(f"run {run_id} is {row['status']}; analyse a finished run")
        if row["analysis"] == "running":
            raise RunStateError(f"run {run_id} is already being analysed")
        sae_dir = self.runs_dir / run_id / "sae"
        try:
            metadata = load_sae(sae_dir).cfg.metadata
        except (OSError, ValueError) as exc:  # the finished run's SAE was damaged or removed since
            raise RunStateError(f"the SAE of run {run_id} cannot be loaded ({exc}); train the run again") from None
        # A model named in the request overrides the SAE's provenance (synthetic activations have none).
        synthetic = None if model else synthetic_dataset(metadata)
        model = model or metadata.get("model_name")
        hook = hook or metadata.get("hook_name")
        if not model or synthetic or not hook:
            source = f"synthetic activations ({synthetic})" if synthetic else model or "activations without a model"
            raise ConfigError(f"the SAE of run {run_id} was trained on {source}: "
                              "name a model (and hook) whose activations have the SAE's width to analyse it against")
        model = confine_setting(self.root, "model", model, "model")
        check_text(hook, "hook")
        command = [self.python, "-m", "sae_kit.cli", "analyze", str(sae_dir), "--model", model, "--hook", hook,
                   "--tokens", str(int(tokens)), "--context", str(int(context)), "--no-progress", "--threads", "1"]
        self.store.update(run_id, analysis="running", analysis_error=None)
        threading.Thread(target=self._analyse, args=(run_id, command, sae_dir), daemon=True).start()
        return self.describe(run_id)

    # ------------------------------------------------------------ reading
    def list(self) -> list[dict[str, Any]]:
        return [self._describe_row(row) for row in self.store.all()]

    def describe(self, run_id: str) -> dict[str, Any]:
        return self._describe_row(self._row(run_id))

    def metrics(self, run_id: str, since_step: int = 0) -> list[dict[str, Any]]:
        self._row(run_id)
        return read_metrics(self.runs_dir / run_id, since_step)

    def _row(self, run_id: str) -> dict[str, Any]:
        row = self.store.get(run_id)
        if row is None:
            raise KeyError(f"no run {run_id!r}; GET /api/runs lists them")
        return row

    def _describe_row(self, row: dict[str, Any]) -> dict[str, Any]:
        run_dir = self.runs_dir / row["id"]
        latest = latest_metrics(read_metrics(run_dir))
        step, total = int(latest.get("step", 0)), row["total_steps"]
        eta = None
        if row["status"] == "running" and step > row["attempt_start_step"]:
            # Timed from the first step this attempt logged: the child's start-up (imports, data
            # sample, initialisation) is not a training step and would inflate the estimate.
            if row["eta_from_time"] is None:
                self.store.update(row["id"], eta_from_time=time.time(), eta_from_step=step)
            elif step > row["eta_from_step"]:
                per_step = (time.time() - row["eta_from_time"]) / (step - row["eta_from_step"])
                eta = per_step * max(0, total - step)
        sae_dir = run_dir / "sae"
        sae = None
        if (sae_dir / "cfg.json").is_file():
            eval_path = sae_dir / "eval.json"
            sae = {"path": sae_dir.relative_to(self.root).as_posix(),
                   "id": sae_id(self.root, sae_dir),
                   "eval": _read_json(eval_path),
                   "analysed": (sae_dir / "features.sqlite").is_file()}
        return {"id": row["id"], "name": row["name"], "status": row["status"], "error": row["error"],
                "config": json.loads(row["config"]), "created": row["created"], "started": row["started"],
                "ended": row["ended"], "attempts": row["attempts"],
                "progress": {"step": step, "total_steps": total, "fraction": min(1.0, step / total),
                             "eta_seconds": eta},
                "latest": latest, "sae": sae, "analysis": row["analysis"], "analysis_error": row["analysis_error"]}

    # ------------------------------------------------------------ workers
    def _work(self) -> None:
        while True:
            run_id = self._queue.get()
            if run_id is None:
                return
            with self._lock:
                row = self.store.get(run_id)
                if self._closing or row is None or row["status"] != "queued":
                    continue
                try:
                    self._start(row)
                except (OSError, ValueError) as exc:  # e.g. a vanished run folder: the worker carries on
                    self.store.update(run_id, status="failed", ended=time.time(), error=f"could not start: {exc}")
                    continue
            self._wait(run_id)

    def _start(self, row: dict[str, Any]) -> None:
        from sae_kit.train.checkpoint import find_checkpoint

        run_id = row["id"]
        run_dir = self.runs_dir / run_id
        command = [self.python, "-m", "sae_kit.cli", "train", "--config", str(run_dir / "config.json"), "--no-progress"]
        resumed_step = 0
        if find_checkpoint(run_dir) is not None:
            command += ["--resume", "--out", str(run_dir)]
            resumed_step = json.loads((find_checkpoint(run_dir) / "state.json").read_text())["step"]
        log = open(run_dir / LOG_FILE, "a")
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=child_env(),
                                   preexec_fn=_die_with_parent if _PRCTL else None)
        log.close()
        self._processes[run_id] = process
        now = time.time()
        self.store.update(run_id, status="running", started=row["started"] or now, attempt_started=now,
                          attempt_start_step=resumed_step, attempts=row["attempts"] + 1, eta_from_time=None,
                          eta_from_step=None)

    def _wait(self, run_id: str) -> None:
        process = self._processes[run_id]
        code = process.wait()
        with self._lock:
            self._processes.pop(run_id, None)
            run_dir = self.runs_dir / run_id
            if run_id in self._cancelling:
                self._cancelling.discard(run_id)
                status, error = "cancelled", "cancelled while training; resume continues from the last checkpoint"
            elif self._closing:
                status, error = "interrupted", "the server stopped while the run was running; resume it to continue"
            elif code == 0 and (run_dir / "sae" / "cfg.json").is_file():
                status, error = "finished", None
            else:
                status, error = "failed", f"exit code {code}: {_log_tail(run_dir / LOG_FILE)}"
            self.store.update(run_id, status=status, error=error, ended=time.time())
        if status == "finished" and self.on_sae_ready is not None:
            self._notify(run_dir / "sae")

    def _analyse(self, run_id: str, command: list[str], sae_dir: Path) -> None:
        log_path = sae_dir.parent / ANALYSIS_LOG_FILE
        with open(log_path, "a") as log:
            code = subprocess.call(command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=child_env(), preexec_fn=_die_with_parent if _PRCTL else None)
        if code == 0:
            # Served before it is reported done, so a client that sees "done" finds the SAE.
            problem = self._notify(sae_dir) if self.on_sae_ready is not None else None
            self.store.update(run_id, analysis="done", analysis_error=problem and f"analysed but not served: {problem}")
        else:
            self.store.update(run_id, analysis="failed", analysis_error=f"exit code {code}: {_log_tail(log_path)}")

    def _notify(self, sae_dir: Path) -> str | None:
        try:
            self.on_sae_ready(sae_dir)
        except Exception as exc:  # the run itself succeeded; the browser just cannot serve it (yet)
            return str(exc)
        return None

    def close(self, timeout: float = 30.0) -> None:
        """Stop: running runs are terminated and marked interrupted (resumable)."""
        with self._lock:
            self._closing = True
            for process in self._processes.values():
                process.terminate()
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout)
        self.store.close()


class RunStateError(RuntimeError):
    """The run is in a state that does not allow the request (e.g. cancelling a finished run)."""


def _read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is absent, being written (by an older trainer) or damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text().strip().splitlines()
    except OSError:
        return "no log"
    return "\n".join(text[-lines:])
