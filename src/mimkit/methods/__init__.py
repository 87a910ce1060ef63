"""Pretraining methods. Importing this package registers the built-in ones."""

from mimkit.methods.base import (
    Method,
    MethodConfig,
    Progress,
    StepOutput,
    method_class,
    method_names,
    register,
)

__all__ = ["Method", "MethodConfig", "Progress", "StepOutput", "method_class", "method_names", "register"]

from mimkit.methods import ibot  # noqa: F401  (registers the built-in methods)
