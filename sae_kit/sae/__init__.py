"""SAE architectures: one shared base (base.py) and one short file per variant."""
from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_kit.config import ConfigError, SAEConfig, load_config_file
from sae_kit.sae import abstopk, batchtopk, feature_choice, gba, jumprelu, matryoshka, mutual_choice, relu, topafa, topk  # noqa: F401 (registers)
from sae_kit.sae.base import ARCHITECTURES, CONFIG_FILE, SAE, WEIGHTS_FILE

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "create_sae", "load_sae", "sae_config_from_dict"]


def create_sae(cfg: SAEConfig) -> SAE:
    if cfg.architecture not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {cfg.architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[cfg.architecture](cfg)


def sae_config_from_dict(data: dict) -> SAEConfig:
    """Rebuild an SAEConfig from a cfg.json dict written by ``SAE.save``."""
    ours = data.get("sae_kit", {})
    try:
        return SAEConfig(
            d_in=data["d_in"],
            d_sae=data["d_sae"],
            architecture=data["architecture"],
            k=data.get("k", 32),
            normalize_activations=data.get("normalize_activations", "none"),
            dtype=data.get("dtype", "float32"),
            dead_tokens_threshold=ours.get("dead_tokens_threshold", 10_000_000),
            aux_coefficient=ours.get("aux_coefficient", 1 / 32),
            k_aux=ours.get("k_aux"),
            d_out=data.get("d_out") if data.get("d_out") is not None and ours.get("transcoder") else None,
            skip_connection=bool(ours.get("skip_connection", False)),
            options=ours.get("options", {}),
            metadata=data.get("metadata", {}),
        )
    except KeyError as exc:
        raise ConfigError(f"SAE config lacks the key {exc.args[0]!r}") from None


def load_sae(directory: str | Path) -> SAE:
    """Load an SAE folder written by ``SAE.save`` (cfg.json + sae_weights.safetensors), in eval mode."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: an SAE folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    data = load_config_file(cfg_path, what="SAE config")
    try:
        sae = create_sae(sae_config_from_dict(data))
    except ConfigError as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from None
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({exc}); re-save or re-train the SAE") from None
    sae.load_tensors(tensors, source=str(weights_path))
    return sae.eval()
