"""sae-kit: harvest activations, train every SAE variant, evaluate, browse and steer."""

__version__ = "0.1.0"
