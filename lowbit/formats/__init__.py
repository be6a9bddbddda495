"""Numerics only: how numbers are stored. Pure tensor functions, no model state."""
