"""deo: distributed pretraining of multispectral Earth-observation foundation models on Ray."""

__version__ = "0.1.0"
