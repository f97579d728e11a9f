"""Test helpers: tiny offline checkpoints of every supported reward model (:func:`make_tiny_checkpoint`)."""

from .checkpoints import TINY_CHECKPOINTS, make_tiny_checkpoint

__all__ = ["TINY_CHECKPOINTS", "make_tiny_checkpoint"]
