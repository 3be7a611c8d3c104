"""Optional training plugins: the API (api.py), one file per plugin, ``sae-kit ablate`` (ablate.py)."""
from sae_kit.plugins.api import (Ablation, Batch, Plugin, PluginSet, StepContext, available_plugins, build_plugins,
                                 get_plugin, option, options_schema, parse_plugin_spec)

__all__ = ["Ablation", "Batch", "Plugin", "PluginSet", "StepContext", "available_plugins", "build_plugins",
           "get_plugin", "option", "options_schema", "parse_plugin_spec"]
