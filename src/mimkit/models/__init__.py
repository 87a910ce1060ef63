"""Backbones, heads and teachers."""
