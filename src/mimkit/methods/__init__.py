"""Pretraining methods. The registry imports the built-in ones on first lookup, so parts inside this package
(e.g. `morphing`) import without loading every method."""

from mimkit.methods.base import Method, MethodConfig, Progress, StepOutput, method_class, method_names, register

__all__ = ["Method", "MethodConfig", "Progress", "StepOutput", "method_class", "method_names", "register"]
