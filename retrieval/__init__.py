"""retrieve: image retrieval that explains every match (the base package: backbones, index store, search)."""

__version__ = "0.1.0"
