"""SAE architectures: one shared base (base.py) and one short file per variant."""
from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_kit.config import ConfigError, SAEConfig, check_types, load_config_file
from sae_kit.sae import abstopk, batchtopk, feature_choice, gba, jumprelu, matryoshka, mutual_choice, relu, topafa, topk  # noqa: F401 (registers)
from sae_kit.sae.base import ARCHITECTURES, CONFIG_FILE, SAE, WEIGHTS_FILE

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "create_sae", "load_sae", "sae_config_from_dict"]


def create_sae(cfg: SAEConfig) -> SAE:
    if cfg.architecture not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {cfg.architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[cfg.architecture](cfg)


def sae_config_from_dict(data: dict) -> SAEConfig:
    """Rebuild an SAEConfig from a cfg.json dict written by ``SAE.save``; ConfigError names a bad key."""
    ours = data.get("sae_kit", {})
    if not isinstance(ours, dict):
        raise ConfigError(f"sae_kit: expected a mapping (key: value), got {ours!r}")
    missing = [key for key in ("d_in", "d_sae", "architecture") if key not in data]
    if missing:
        raise ConfigError(f"SAE config lacks the key {missing[0]!r}")
    values = {"d_in": data["d_in"], "d_sae": data["d_sae"], "architecture": data["architecture"],
              "k": data.get("k", 32), "normalize_activations": data.get("normalize_activations", "none"),
              "dtype": data.get("dtype", "float32"),
              "dead_tokens_threshold": ours.get("dead_tokens_threshold", 10_000_000),
              "aux_coefficient": ours.get("aux_coefficient", 1 / 32), "k_aux": ours.get("k_aux"),
              "options": ours.get("options", {}), "metadata": data.get("metadata", {}),
              # A transcoder (sae_kit.transcoder) predicts a d_out-wide output hook; SAELens' d_out alone
              # does not make one (its SAEs carry d_out = d_in too).
              "d_out": data.get("d_out") if ours.get("transcoder") else None,
              "skip_connection": ours.get("skip_connection", False)}
    # An integer written as 1e9 is still an integer; a list for metadata is not a mapping.
    return SAEConfig(**check_types(SAEConfig, values))


def check_weights_match(cfg: SAEConfig, weights_path: Path) -> None:
    """The weights file holds a [d_in, d_sae] (or [d_sae, d_in]) matrix: checked from its header before a
    wrong d_in/d_sae in cfg.json makes us allocate a matrix of that size."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({exc}); re-save or re-train the SAE") from None
    if not {(cfg.d_in, cfg.d_sae), (cfg.d_sae, cfg.d_in)} & set(shapes.values()):
        matrices = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items() if len(shape) == 2) or "none"
        raise ConfigError(f"d_in={cfg.d_in}, d_sae={cfg.d_sae} do not match the weights in {weights_path.name} "
                          f"(matrices: {matrices}); fix d_in/d_sae in {CONFIG_FILE} or re-save the SAE")


def load_sae(directory: str | Path) -> SAE:
    """Load an SAE folder written by ``SAE.save`` (cfg.json + sae_weights.safetensors), in eval mode."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: an SAE folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    data = load_config_file(cfg_path, what="SAE config")
    try:
        cfg = sae_config_from_dict(data)
        check_weights_match(cfg, weights_path)
        sae = create_sae(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from None
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({exc}); re-save or re-train the SAE") from None
    try:
        sae.load_tensors(tensors, source=str(weights_path))
    except ValueError as exc:  # the two files disagree: either may be the wrong one
        raise ConfigError(f"{exc}; check architecture/d_in/d_sae in {cfg_path} against the weights") from None
    return sae.eval()
