"""edgeship: prune, fine-tune, convert, verify, profile and ship a PyTorch model for an edge target."""

__version__ = "0.1.0"
