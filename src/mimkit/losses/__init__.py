"""Losses shared by methods."""
