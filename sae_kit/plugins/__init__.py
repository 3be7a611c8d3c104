"""Optional training plugins: the author API (api.py) and one file per plugin.

The trainer's side (building plugins from specs, calling their hooks) is sae_kit/train/plugin_set.py;
``sae-kit ablate`` and the docs renderer are experiments (sae_kit/experiments/).
"""
from sae_kit.plugins.api import (Ablation, Batch, Plugin, StepContext, TrainingRun, available_plugins, get_plugin,
                                 option, options_schema)

__all__ = ["Ablation", "Batch", "Plugin", "StepContext", "TrainingRun", "available_plugins", "get_plugin", "option",
           "options_schema"]
