"""Placeholder: filled by the model family that owns it."""
