"""The feature store: one SQLite file per analysed SAE (``<sae folder>/features.sqlite``).

Written by ``sae_kit.analysis`` into a temporary file beside the target and renamed into place
(``sae_kit.fileio.atomic_write``), so a reader sees the previous store or the new one, never half
of one. Read by the server through :class:`FeatureStore`, one read-only connection per call (SQLite
connections are not shared between threads).

Schema (``FORMAT_VERSION`` 1):

* ``meta(key TEXT PRIMARY KEY, value TEXT)``: JSON values — sae, model, hook, dataset, split,
  context, n_tokens (analysed token positions), n_windows, d_sae, histogram_bins, created.
* ``features(id INTEGER PRIMARY KEY, fire_count, density, max_act, mean_act, hist_min, hist_max,
  hist TEXT, pos_logits TEXT, neg_logits TEXT, neighbours TEXT, top_tokens TEXT, explanation TEXT)``:
  one row per latent. ``density`` = fire_count / n_tokens; ``mean_act`` over the tokens where it
  fired; ``hist`` = JSON counts of equal-width bins over [hist_min, hist_max] of its non-zero
  activations; ``pos_logits``/``neg_logits`` = JSON ``[[token, value], ...]``; ``neighbours`` =
  JSON ``[[feature, cosine], ...]`` by decoder cosine; ``top_tokens`` = the distinct tokens of its
  top examples' maxima, space separated (for text search); ``explanation`` is left NULL for an
  auto-interpretation step to fill. Indexed on density, max_act and fire_count.
* ``windows(id INTEGER PRIMARY KEY, tokens BLOB)``: the analysed token windows, int32 little-endian.
* ``vocab(id INTEGER PRIMARY KEY, text TEXT)``: display text of every token id in ``windows``.
* ``examples(feature, kind, bin, rank, window, start, max_pos, max_value, acts BLOB)``: ``kind`` is
  ``'top'`` (bin 0, rank by activation) or ``'quantile'`` (bin 0 = lowest quantile); the example is
  tokens ``[start, start + len(acts))`` of ``window``, ``acts`` their float32 activations of the
  feature, ``max_pos`` the position (in the window) of the token it was chosen for. Indexed on
  (feature, kind, bin, rank). Kinds ``'heldout'``, ``'random'`` and ``'contrast'`` are the scoring
  set of ``sae-kit explain`` (never shown by the browser; see ``sae_kit.explain.examples``).

Added by ``sae-kit explain`` (in place, one transaction per feature; older readers ignore them):

* ``explanations(feature, role, explainer, model, prompt_version, text, score, scores TEXT, verdicts
  TEXT, created)``: ``role`` is ``'explanation'`` (the feature's explanation), ``'token_rule'`` (the
  baseline control) or ``'shuffled'`` (another feature's explanation, the chance control); ``scores``
  = JSON of the detection and fuzzing metrics and the judge, ``score`` their mean balanced accuracy,
  ``verdicts`` = JSON of each scored example with the judge's P(yes).
* ``features.explanation``/``features.explanation_score``: the feature's explanation and score.
* ``feature_search``: an FTS5 index over each feature's explanation and top tokens (rowid = feature).
"""
from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

FORMAT_VERSION = 1
STORE_FILE = "features.sqlite"
SORT_KEYS = ("id", "density", "max_act", "mean_act", "fire_count", "score")
ROLES = ("explanation", "token_rule", "shuffled")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features (
    id INTEGER PRIMARY KEY, fire_count INTEGER NOT NULL, density REAL NOT NULL, max_act REAL NOT NULL,
    mean_act REAL NOT NULL, hist_min REAL NOT NULL, hist_max REAL NOT NULL, hist TEXT NOT NULL,
    pos_logits TEXT NOT NULL, neg_logits TEXT NOT NULL, neighbours TEXT NOT NULL,
    top_tokens TEXT NOT NULL, explanation TEXT
);
CREATE TABLE windows (id INTEGER PRIMARY KEY, tokens BLOB NOT NULL);
CREATE TABLE vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE examples (
    feature INTEGER NOT NULL, kind TEXT NOT NULL, bin INTEGER NOT NULL, rank INTEGER NOT NULL,
    window INTEGER NOT NULL, start INTEGER NOT NULL, max_pos INTEGER NOT NULL, max_value REAL NOT NULL,
    acts BLOB NOT NULL
);
"""
INDEXES = """
CREATE INDEX features_density ON features(density);
CREATE INDEX features_max_act ON features(max_act);
CREATE INDEX features_fire_count ON features(fire_count);
CREATE INDEX examples_feature ON examples(feature, kind, bin, rank);
"""


EXPLANATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS explanations (
    feature INTEGER NOT NULL, role TEXT NOT NULL, explainer TEXT NOT NULL, model TEXT,
    prompt_version TEXT NOT NULL, text TEXT NOT NULL, score REAL, scores TEXT, verdicts TEXT,
    created TEXT NOT NULL, PRIMARY KEY (feature, role)
);
"""
SEARCH_SCHEMA = "CREATE VIRTUAL TABLE IF NOT EXISTS feature_search USING fts5(explanation, top_tokens)"
EXPORT_FORMAT = "sae-kit-explanations-2"  # one record per feature, controls inside
READ_FORMATS = ("sae-kit-explanations-1", EXPORT_FORMAT)  # -1: one record per feature and role
EXPLANATIONS_FILE = "explanations.json"  # beside an exported SAE's weights


def fts_query(text: str) -> str | None:
    """A user's words as an FTS5 query: every word must match (as a prefix); None when no word is left."""
    import re

    words = re.findall(r"\w+", text)
    return " ".join('"' + word.replace('"', '""') + '"*' for word in words) or None


def add_search_index(connection: sqlite3.Connection) -> None:
    """Create and fill the full-text index (explanations and top tokens) if the store has none."""
    exists = connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'feature_search'").fetchone()
    connection.execute(SEARCH_SCHEMA)
    if not exists:
        connection.execute("INSERT INTO feature_search(rowid, explanation, top_tokens) "
                           "SELECT id, COALESCE(explanation, ''), top_tokens FROM features")


def open_for_explanations(path: str | Path) -> sqlite3.Connection:
    """A read-write connection to a feature store, with the explanation tables and the search index."""
    path = Path(path)
    FeatureStore(path)  # clear errors for a missing or foreign file
    connection = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
    with connection:
        connection.executescript(EXPLANATION_SCHEMA)
        columns = {row[1] for row in connection.execute("PRAGMA table_info(features)")}
        if "explanation_score" not in columns:
            connection.execute("ALTER TABLE features ADD COLUMN explanation_score REAL")
        add_search_index(connection)
    return connection


def write_explanation(connection: sqlite3.Connection, feature: int, role: str, record: dict[str, Any]) -> None:
    """Insert or replace one explanation row (``record``: explainer, model, prompt_version, text, scores,
    verdicts, created); the ``explanation`` role also updates the feature's row and search entry.
    The caller commits (one transaction per feature keeps a feature all-or-nothing)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    scores = record.get("scores")
    score = scores.get("score") if scores else None
    connection.execute(
        "INSERT OR REPLACE INTO explanations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (feature, role, record["explainer"], record.get("model"), record["prompt_version"], record["text"], score,
         json.dumps(scores) if scores is not None else None,
         json.dumps(record["verdicts"], ensure_ascii=False) if record.get("verdicts") is not None else None,
         record["created"]))
    if role == "explanation":
        connection.execute("UPDATE features SET explanation = ?, explanation_score = ? WHERE id = ?",
                           (record["text"], score, feature))
        connection.execute("UPDATE feature_search SET explanation = ? WHERE rowid = ?", (record["text"], feature))


def _export_fields(row) -> dict[str, Any]:
    return {"explanation": row["text"], "explainer": row["explainer"], "explainer_model": row["model"],
            "prompt_version": row["prompt_version"], "score": row["score"],
            "scores": json.loads(row["scores"]) if row["scores"] else None, "date": row["created"]}


def export_explanations(path: str | Path) -> dict[str, Any]:
    """Every stored explanation as JSON-ready data: one record per feature (its explanation, scores,
    explainer, explainer model, prompt version and date), with its scored controls (token rule,
    shuffled) under ``controls``."""
    store = FeatureStore(path)
    with store._connect() as connection:
        rows = connection.execute("SELECT * FROM explanations ORDER BY feature, role").fetchall() \
            if store.has_explanations else []
    records: dict[int, dict[str, Any]] = {}
    for row in rows:
        record = records.setdefault(row["feature"], {"feature": row["feature"]})
        if row["role"] == "explanation":
            record.update(_export_fields(row))
        else:
            record.setdefault("controls", {})[row["role"]] = _export_fields(row)
    return {"format": EXPORT_FORMAT, "d_sae": store.d_sae, "model": store.meta.get("model"),
            "hook": store.meta.get("hook"), "records": [r for _, r in sorted(records.items()) if "explanation" in r]}


def check_explanations_export(data: Any, d_sae: int | None = None, source: str = "the export") -> dict[str, Any]:
    """``data`` if it is an explanations export (this format or the older one) for ``d_sae`` features."""
    if not isinstance(data, dict) or data.get("format") not in READ_FORMATS or not isinstance(data.get("records"), list):
        raise ValueError(f"{source} is not an explanations export (expected a JSON object with format "
                         f"{EXPORT_FORMAT!r} and a records list, as `sae-kit explain --export` and "
                         "`sae-kit export` write)")
    if d_sae is not None and data.get("d_sae") not in (None, d_sae):
        raise ValueError(f"{source} is for an SAE with {data['d_sae']} features, this one has {d_sae}")
    return data


def import_explanations(path: str | Path, data: dict[str, Any]) -> int:
    """Write exported records into a store (replacing the same feature and role, all or none); returns
    how many features. Reads this format and the older one (one record per feature and role)."""
    store = FeatureStore(path)
    check_explanations_export(data, store.d_sae)
    connection = open_for_explanations(path)
    try:
        with connection:  # all records or none
            for i, record in enumerate(data["records"]):
                try:
                    feature = int(record["feature"])
                    if not 0 <= feature < store.d_sae:
                        raise ValueError(f"feature {feature} is out of range 0..{store.d_sae - 1}")
                    entries = [(record.get("role", "explanation"), record)]
                    entries += list((record.get("controls") or {}).items())
                    for role, entry in entries:
                        write_explanation(connection, feature, role, {
                            "explainer": str(entry["explainer"]), "model": entry.get("explainer_model"),
                            "prompt_version": str(entry["prompt_version"]), "text": str(entry["explanation"]),
                            "scores": entry.get("scores"), "created": str(entry["date"])})
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    raise ValueError(f"record {i} of the export is invalid: {exc}") from None
    finally:
        connection.close()
    return len({int(r["feature"]) for r in data["records"]})


class FeatureStoreError(ValueError):
    """A feature store is missing, not a feature store, damaged, or from an incompatible version."""


def _looks_damaged(exc: sqlite3.Error) -> bool:
    # OperationalError is also a bad query (e.g. a malformed full-text search): only these mean the file.
    text = str(exc).lower()
    return any(words in text for words in ("malformed", "not a database", "unable to open", "disk i/o", "no such table"))


class FeatureStoreWriter:
    """Fills a new, empty SQLite file; :meth:`finish` adds the indexes and commits."""

    def __init__(self, path: str | Path, meta: dict[str, Any]):
        self.connection = sqlite3.connect(str(path))
        # The file is a temporary one renamed into place when complete (atomic_write), so the
        # rollback journal buys nothing; without it bulk inserts are several times faster.
        self.connection.execute("PRAGMA journal_mode=OFF")
        self.connection.execute("PRAGMA synchronous=OFF")
        self.connection.executescript(SCHEMA)
        meta = {"format_version": FORMAT_VERSION, **meta}
        self.connection.executemany("INSERT INTO meta VALUES (?, ?)",
                                    [(key, json.dumps(value)) for key, value in meta.items()])

    def add_windows(self, first_id: int, windows: np.ndarray) -> None:
        rows = ((first_id + i, window.astype("<i4").tobytes()) for i, window in enumerate(windows))
        self.connection.executemany("INSERT INTO windows VALUES (?, ?)", rows)

    def add_vocab(self, texts: dict[int, str]) -> None:
        self.connection.executemany("INSERT INTO vocab VALUES (?, ?)", sorted(texts.items()))

    def add_features(self, rows: Iterable[dict[str, Any]]) -> None:
        self.connection.executemany(
            "INSERT INTO features VALUES (:id, :fire_count, :density, :max_act, :mean_act, :hist_min, :hist_max,"
            " :hist, :pos_logits, :neg_logits, :neighbours, :top_tokens, NULL)",
            ({**row, **{key: json.dumps(row[key], ensure_ascii=False) for key in ("hist", "pos_logits", "neg_logits", "neighbours")}}
             for row in rows))

    def add_examples(self, rows: Iterable[tuple]) -> None:
        """Rows of (feature, kind, bin, rank, window, start, max_pos, max_value, acts float32 array)."""
        self.connection.executemany(
            "INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((*row[:8], np.asarray(row[8], dtype="<f4").tobytes()) for row in rows))

    def finish(self) -> None:
        self.connection.executescript(INDEXES)
        add_search_index(self.connection)
        self.connection.commit()
        self.connection.close()


class FeatureStore:
    """Read access to a feature store (safe to share between threads: each call opens its own connection).

    A file damaged or removed while it is served (overwritten, truncated, deleted) raises
    :class:`FeatureStoreError` saying so and how to rebuild it, at the next call and from
    :meth:`problem`, rather than SQLite's own errors or wrong rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._good_stamp: tuple[int, int, int] | None = None
        if not self.path.is_file():
            raise FeatureStoreError(f"no feature store at {self.path}; create it with `sae-kit analyze`")
        reason = self._file_problem()
        if reason:
            raise FeatureStoreError(f"{self.path} is not a feature store ({reason}); re-create it with {self._rebuild}")
        with self._connect() as connection:
            try:
                self.meta = {key: json.loads(value) for key, value in connection.execute("SELECT key, value FROM meta")}
            except (sqlite3.DatabaseError, ValueError) as exc:
                raise FeatureStoreError(f"{self.path} is not a feature store ({exc}); re-create it with "
                                        f"{self._rebuild}") from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise FeatureStoreError(f"{self.path} has format {self.meta.get('format_version')!r}, this sae-kit reads "
                                    f"{FORMAT_VERSION}; re-create it with `sae-kit analyze`")
        self.d_sae = int(self.meta["d_sae"])

    @property
    def _rebuild(self) -> str:
        return f"`sae-kit analyze {self.path.parent}`"

    def problem(self) -> str | None:
        """What is wrong with the file now (gone, not SQLite, truncated), or None; cheap (a stat, and a
        look at the 100-byte header when the file changed)."""
        reason = self._file_problem()
        if reason is None:
            return None
        verb = "is" if reason.startswith("gone") else "is damaged:"
        return f"the feature store {self.path} {verb} {reason}; rebuild it with {self._rebuild}"

    def _file_problem(self) -> str | None:
        try:
            stat = self.path.stat()
        except OSError:
            return "gone (deleted or moved)"
        stamp = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if stamp == self._good_stamp:
            return None
        try:
            with open(self.path, "rb") as handle:
                header = handle.read(100)
        except OSError as exc:
            return f"unreadable ({exc})"
        if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
            return "not an SQLite database"
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        if pages and stat.st_size < page_size * pages:
            return f"truncated ({stat.st_size} of {page_size * pages} bytes)"
        self._good_stamp = stamp
        return None

    @property
    def has_explanations(self) -> bool:
        with self._connect() as connection:
            return connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'explanations'").fetchone() is not None

    @property
    def has_search_index(self) -> bool:
        with self._connect() as connection:
            return connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'feature_search'").fetchone() is not None

    def search_explanations(self, query: str, *, limit: int = 20, offset: int = 0) -> tuple[int, list[dict]]:
        """Features whose explanation or top tokens match every word of ``query`` (prefixes), best match
        (BM25) first: (number of matches, one page)."""
        match = fts_query(query)
        if match is None:
            return 0, []
        if not self.has_search_index:
            raise FeatureStoreError(f"{self.path} has no search index; create it with `sae-kit explain` "
                                    "(or re-create the store with `sae-kit analyze`)")
        score_column = "f.explanation_score" if self._has_score_column() else "NULL"
        with self._connect() as connection:
            total = connection.execute("SELECT COUNT(*) FROM feature_search WHERE feature_search MATCH ?",
                                       (match,)).fetchone()[0]
            rows = connection.execute(
                f"SELECT s.rowid AS id, bm25(feature_search) AS rank, f.explanation, {score_column} AS score, "
                "f.top_tokens, f.density FROM feature_search s JOIN features f ON f.id = s.rowid "
                "WHERE feature_search MATCH ? ORDER BY rank, s.rowid LIMIT ? OFFSET ?",
                (match, limit, offset)).fetchall()
        return total, [{"index": row["id"], "explanation": row["explanation"], "score": row["score"],
                        "rank": -row["rank"], "density": row["density"],
                        "top_tokens": row["top_tokens"].split(" ") if row["top_tokens"] else []} for row in rows]

    def _has_score_column(self) -> bool:
        with self._connect() as connection:
            return "explanation_score" in {row[1] for row in connection.execute("PRAGMA table_info(features)")}

    def explanations(self, index: int) -> dict[str, dict]:
        """The stored explanations of one feature by role (empty when it has none)."""
        if not self.has_explanations:
            return {}
        with self._connect() as connection:
            rows = connection.execute("SELECT * FROM explanations WHERE feature = ?", (index,)).fetchall()
        return {row["role"]: {"text": row["text"], "explainer": row["explainer"], "model": row["model"],
                              "prompt_version": row["prompt_version"], "score": row["score"],
                              "scores": json.loads(row["scores"]) if row["scores"] else None,
                              "verdicts": json.loads(row["verdicts"]) if row["verdicts"] else [],
                              "created": row["created"]} for row in rows}

    def explanation_briefs(self, indices: list[int]) -> list[dict[str, Any]]:
        """[{index, explanation, score}] for the given features, in that order."""
        if not indices:
            return []
        score_column = "explanation_score" if self._has_score_column() else "NULL"
        with self._connect() as connection:
            rows = {row[0]: row for row in connection.execute(
                f"SELECT id, explanation, {score_column} FROM features WHERE id IN ({','.join('?' * len(indices))})",
                indices)}
        return [{"index": i, "explanation": rows[i][1], "score": rows[i][2]} for i in indices if i in rows]

    def density_histogram(self, bins: int = 40) -> dict[str, Any]:
        """The distribution of all features' densities: counts over equal bins of log10(density), and
        the number of features that never fired (log10 0 is not a number)."""
        with self._connect() as connection:
            values = np.array([row[0] for row in connection.execute("SELECT density FROM features")], dtype=np.float64)
        alive = values[values > 0]
        if alive.size == 0:
            return {"edges": [], "counts": [], "dead": int(values.size)}
        logs = np.log10(alive)
        low, high = float(logs.min()), float(logs.max())
        if high - low < 1e-9:
            low, high = low - 0.5, high + 0.5
        counts, edges = np.histogram(logs, bins=bins, range=(low, high))
        return {"edges": edges.tolist(), "counts": counts.tolist(), "dead": int(values.size - alive.size)}

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        problem = self.problem()
        if problem:
            raise FeatureStoreError(problem)
        try:
            connection = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.DatabaseError as exc:
            raise FeatureStoreError(f"the feature store {self.path} cannot be opened ({exc}); rebuild it with "
                                    f"{self._rebuild}") from None
        connection.row_factory = sqlite3.Row
        try:
            with connection:
                yield connection
        except sqlite3.DatabaseError as exc:
            # A malformed page, or a file swapped for a non-database, shows up only when read.
            self._good_stamp = None
            if isinstance(exc, sqlite3.OperationalError) and not _looks_damaged(exc):
                raise
            raise FeatureStoreError(f"the feature store {self.path} is damaged ({exc}); rebuild it with "
                                    f"{self._rebuild}") from None
        finally:
            connection.close()

    def list_features(self, *, offset: int = 0, limit: int = 50, sort: str = "id", descending: bool = False,
                      min_density: float | None = None, max_density: float | None = None,
                      min_max_act: float | None = None, text: str | None = None) -> tuple[int, list[dict]]:
        """(number of matching features, one page of their summaries)."""
        if sort not in SORT_KEYS:
            raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
        has_score = self._has_score_column()
        score_column = "explanation_score" if has_score else "NULL"
        where, params = [], []
        for clause, value in (("density >= ?", min_density), ("density <= ?", max_density),
                              ("max_act >= ?", min_max_act)):
            if value is not None:
                where.append(clause)
                params.append(value)
        if text:
            pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            match = fts_query(text) if self.has_search_index else None
            if match is not None:
                # Explanations and top tokens through the full-text index; logit tokens by substring.
                where.append("(id IN (SELECT rowid FROM feature_search WHERE feature_search MATCH ?) "
                             "OR pos_logits LIKE ? ESCAPE '\\')")
                params += [match, pattern]
            else:
                where.append("(top_tokens LIKE ? ESCAPE '\\' OR explanation LIKE ? ESCAPE '\\' "
                             "OR pos_logits LIKE ? ESCAPE '\\')")
                params += [pattern] * 3
        condition = f"WHERE {' AND '.join(where)}" if where else ""
        column = {"score": score_column}.get(sort, sort)
        # Unscored features sort last either way.
        order = (f"{column} IS NULL, " if sort == "score" else "") + f"{column} {'DESC' if descending else 'ASC'}, id ASC"
        with self._connect() as connection:
            total = connection.execute(f"SELECT COUNT(*) FROM features {condition}", params).fetchone()[0]
            rows = connection.execute(
                f"SELECT id, fire_count, density, max_act, mean_act, top_tokens, explanation, pos_logits, "
                f"{score_column} AS score "
                f"FROM features {condition} ORDER BY {order} LIMIT ? OFFSET ?", [*params, limit, offset]).fetchall()
        return total, [{"index": row["id"], "fire_count": row["fire_count"], "density": row["density"],
                        "max_act": row["max_act"], "mean_act": row["mean_act"],
                        "top_tokens": row["top_tokens"].split(" ") if row["top_tokens"] else [],
                        "pos_logits": [token for token, _ in json.loads(row["pos_logits"])[:5]],
                        "explanation": row["explanation"], "score": row["score"]} for row in rows]

    def feature(self, index: int) -> dict[str, Any]:
        """Everything stored about one feature; IndexError when out of range."""
        if not 0 <= index < self.d_sae:
            raise IndexError(f"feature {index} is out of range: this SAE has features 0..{self.d_sae - 1}")
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM features WHERE id = ?", (index,)).fetchone()
            examples = connection.execute(
                "SELECT kind, bin, rank, window, start, max_pos, max_value, acts FROM examples WHERE feature = ? "
                "AND kind IN ('top', 'quantile') ORDER BY kind DESC, bin, rank", (index,)).fetchall()
            windows = {w: np.frombuffer(blob, dtype="<i4") for w, blob in connection.execute(
                f"SELECT id, tokens FROM windows WHERE id IN ({','.join('?' * len(examples))})",
                [e["window"] for e in examples])} if examples else {}
            ids = sorted({int(t) for tokens in windows.values() for t in tokens})
            vocab = dict(connection.execute(f"SELECT id, text FROM vocab WHERE id IN ({','.join('?' * len(ids))})",
                                            ids).fetchall()) if ids else {}
        if row is None:
            raise FeatureStoreError(f"{self.path} has no row for feature {index}; re-create it with `sae-kit analyze`")
        top, quantiles = [], {}
        for example in examples:
            acts = np.frombuffer(example["acts"], dtype="<f4")
            tokens = windows[example["window"]][example["start"]:example["start"] + len(acts)]
            shown = {"tokens": [vocab.get(int(t), "") for t in tokens], "acts": acts.tolist(),
                     "max_value": example["max_value"], "max_index": example["max_pos"] - example["start"]}
            if example["kind"] == "top":
                top.append(shown)
            else:
                quantiles.setdefault(example["bin"], []).append(shown)
        n_bins = len(json.loads(row["hist"]))
        width = (row["hist_max"] - row["hist_min"]) / n_bins if n_bins else 0.0
        return {
            "index": index,
            "fire_count": row["fire_count"],
            "density": row["density"],
            "max_act": row["max_act"],
            "mean_act": row["mean_act"],
            "histogram": {"counts": json.loads(row["hist"]),
                          "edges": [row["hist_min"] + i * width for i in range(n_bins + 1)]},
            "pos_logits": [{"token": t, "value": v} for t, v in json.loads(row["pos_logits"])],
            "neg_logits": [{"token": t, "value": v} for t, v in json.loads(row["neg_logits"])],
            "neighbours": [{"index": i, "cosine": c} for i, c in json.loads(row["neighbours"])],
            "top_examples": top,
            "quantile_examples": [{"quantile": b, "examples": quantiles[b]} for b in sorted(quantiles)],
            "explanation": row["explanation"],
            "explanations": self.explanations(index),
        }
