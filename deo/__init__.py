"""deo: distributed pretraining of multispectral Earth-observation foundation models on Ray."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """Lazy public API: ``deo.load_backbone`` without importing torch on ``import deo``."""
    if name == "load_backbone":
        from deo.export import load_backbone

        return load_backbone
    raise AttributeError(f"module 'deo' has no attribute {name!r}")
