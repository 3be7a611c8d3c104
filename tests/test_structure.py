"""Structure rules of the code base (issue 14): no import cycle, plugins do not build trainers, no
architecture name is branched on outside the architectures, one declaration per setting."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed names of the folders (see pyproject's package-dir).
PACKAGES = {"sae_kit": ROOT / "sae_kit", "sae_kit.kernels": ROOT / "kernels", "sae_kit.server": ROOT / "server"}


def _modules(packages: dict[str, Path]) -> dict[str, Path]:
    modules = {}
    for package, folder in packages.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.setdefault(".".join((package, *parts)), path)
    return modules


def _module_level_imports(path: Path, known: set[str]) -> set[str]:
    """sae_kit modules imported when ``path`` is imported (function bodies excluded; TYPE_CHECKING included)."""
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name in known)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    found.add(candidate if candidate in known else node.module)
            if isinstance(node, ast.ClassDef):
                visit(node.body)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(path.read_text()).body)
    return {name for name in found if name in known}


def import_cycles(packages: dict[str, Path] = PACKAGES) -> list[list[str]]:
    modules = _modules(packages)
    graph = {name: _module_level_imports(path, set(modules)) - {name} for name, path in modules.items()}
    cycles, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                walk(target, stack)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [])
    return cycles


def test_no_import_cycle():
    assert import_cycles() == []


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text("from sae_kit.b import x\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sae_kit.a\n")
    (tmp_path / "c.py").write_text("def f():\n    import sae_kit.a\n")  # a function-level import is no cycle
    assert import_cycles({"sae_kit": tmp_path}) == [["sae_kit.a", "sae_kit.b", "sae_kit.a"]]


def test_no_plugin_builds_a_trainer():
    offenders = [path.name for path in (ROOT / "sae_kit" / "plugins").glob("*.py")
                 if re.search(r"\bTrainer\s*\(|import\s+.*\bTrainer\b", path.read_text())]
    assert offenders == []


def test_no_architecture_name_is_branched_on_outside_the_architectures():
    """Comparisons such as ``cfg.architecture == "gba"`` or ``ARCH_OPTIONS["gba"]`` belong in sae/<name>.py."""
    from sae_kit.sae import ARCHITECTURES

    names = "|".join(sorted(ARCHITECTURES))
    quoted = rf"""["'](?:{names})["']"""
    patterns = [
        rf"(?:architecture|arch)\s*(?:==|!=)\s*{quoted}",  # arch == "topk"
        rf"{quoted}\s*(?:==|!=)\s*\w*arch",  # "topk" == arch
        rf"(?:architecture|arch)\s+(?:not\s+)?in\s+[\(\[\{{][^\)\]\}}]*{quoted}",  # arch in ("topk", ...)
        rf"\w+\[\s*{quoted}\s*\]",  # TABLE["gba"]
    ]
    offenders = []
    for folder in (ROOT / "sae_kit", ROOT / "server"):
        for path in folder.rglob("*.py"):
            if (ROOT / "sae_kit" / "sae") in path.parents:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                # SAELens' own architecture names (topk, abstopk, standard, jumprelu) on import are the
                # foreign format's vocabulary, read as foreign_arch.
                if "foreign_arch" in line:
                    continue
                if any(re.search(p, line) for p in patterns):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("line", ['if cfg.architecture == "gba":', 'ARCH_OPTIONS["gba"]', 'arch in ("topk", "relu")'])
def test_the_architecture_name_check_catches(line):
    from sae_kit.sae import ARCHITECTURES

    names = "|".join(sorted(ARCHITECTURES))
    quoted = rf"""["'](?:{names})["']"""
    assert (re.search(rf"(?:architecture|arch)\s*(?:==|!=)\s*{quoted}", line)
            or re.search(rf"\w+\[\s*{quoted}\s*\]", line)
            or re.search(rf"(?:architecture|arch)\s+(?:not\s+)?in\s+[\(\[\{{][^\)\]\}}]*{quoted}", line))


# ------------------------------------------------------------------ one declaration per setting
def _extended_train_config():
    """TrainConfig plus one field, declared the way a developer adds one (a single `setting(...)` line)."""
    from dataclasses import dataclass

    from sae_kit.config import TrainConfig, setting

    @dataclass(kw_only=True)
    class Extended(TrainConfig):
        warmup_shape: str = setting("linear", "shape of the learning-rate warm-up", choices=("linear", "cosine"))

    return Extended


def test_one_new_field_reaches_the_cli_the_config_file_and_the_server_schema(monkeypatch, tmp_path):
    import argparse

    from sae_kit import runs
    from sae_kit.config import ConfigError, add_arguments, args_to_settings

    Extended = _extended_train_config()
    parser = argparse.ArgumentParser()
    add_arguments(parser, Extended)
    assert "--warmup-shape {linear,cosine}" in parser.format_help() and "shape of the learning-rate" in parser.format_help()
    settings = args_to_settings(Extended, parser.parse_args(["--warmup-shape", "cosine", "--k", "8"]))
    assert settings == {"warmup_shape": "cosine", "k": 8}
    with pytest.raises(SystemExit):
        parser.parse_args(["--warmup-shape", "sideways"])

    # The config file (YAML/JSON) and config.json: the same field, validated by the same declaration.
    cfg = Extended.from_dict(settings)
    assert cfg.warmup_shape == "cosine" and cfg.to_dict()["warmup_shape"] == "cosine"
    with pytest.raises(ConfigError, match=r"warmup_shape must be one of \['linear', 'cosine'\]"):
        Extended.from_dict({"warmup_shape": "sideways"})

    # GET /api/runs/schema, from which the run form is built.
    monkeypatch.setattr(runs, "TrainConfig", Extended)
    prop = runs.config_schema()["train_config"]["properties"]["warmup_shape"]
    assert prop["type"] == "string" and prop["default"] == "linear" and prop["enum"] == ["linear", "cosine"]
    assert prop["description"] == "shape of the learning-rate warm-up"
