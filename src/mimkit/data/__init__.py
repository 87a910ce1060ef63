"""Datasets, views and masks."""
