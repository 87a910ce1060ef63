"""Teachers: an exponential moving average (EMA) of a student network."""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` that takes no gradients (the starting point of an EMA teacher)."""
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    return teacher


class EMA:
    """teacher <- m * teacher + (1 - m) * student, over the parameters both networks share by name.

    The student may own parameters the teacher lacks (e.g. the mask token); the reverse is an error.
    The parameter lists are built once, so an update is one fused foreach call.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        student_params = dict(student.named_parameters())
        missing = [name for name, _ in teacher.named_parameters() if name not in student_params]
        if missing:
            raise ValueError(f"teacher parameters without a student counterpart: {missing[:5]}")
        pairs = [(p, student_params[name]) for name, p in teacher.named_parameters()]
        self.teacher_params = [t for t, _ in pairs]
        self.student_params = [s for _, s in pairs]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        students = [s.detach().to(t.dtype) for t, s in zip(self.teacher_params, self.student_params, strict=True)]
        torch._foreach_lerp_(self.teacher_params, students, 1.0 - momentum)

    @torch.no_grad()
    def copy_student(self) -> None:
        """Make the teacher equal to the student (start of training)."""
        torch._foreach_copy_(self.teacher_params, [s.detach() for s in self.student_params])
