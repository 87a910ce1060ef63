"""DTM grouping, morphing and loss against the official DTM code's outputs (every case in dtm_morph/)."""

from __future__ import annotations

from pathlib import Path

import torch

from mimkit.morphing import MorphSchedule, TokenGrouping, group_tokens, merges_per_iteration, morph_loss
from support import load_case

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two (B, N) labellings describe the same partition when 'same group' agrees for every pair of tokens."""
    return torch.equal(a.unsqueeze(-1) == a.unsqueeze(-2), b.unsqueeze(-1) == b.unsqueeze(-2))


def test_dtm_morph_matches_reference(dtm_case: Path) -> None:
    case = load_case(dtm_case)
    config = case["config"]
    teacher, student = case["teacher_tokens"], case["student_tokens"]
    num_tokens = teacher.shape[1]
    groupings: list[TokenGrouping] = []
    for index, entry in enumerate(config["schedules"]):
        schedule = MorphSchedule(**entry)
        assert merges_per_iteration(schedule.num_removed, schedule.iterations, num_tokens) == (
            schedule.merges_per_iteration
        )
        grouping = group_tokens(teacher, schedule, protect_first_token=config["protect_first_token"])
        expected_groups = case["expected_groups"][index]
        assert _same_partition(grouping.groups, expected_groups), f"schedule {entry}: partitions differ"
        torch.testing.assert_close(grouping.groups, expected_groups, rtol=0, atol=0)
        torch.testing.assert_close(
            grouping.morph(student.double()), case["expected_morphed_student"][index].double(), **TOLERANCE
        )
        torch.testing.assert_close(
            grouping.morph(teacher.double()), case["expected_morphed_teacher"][index].double(), **TOLERANCE
        )
        torch.testing.assert_close(grouping.morph(student), case["expected_morphed_student"][index], **TOLERANCE)
        groupings.append(grouping)
    loss = morph_loss(student.double(), teacher.double(), groupings, config["loss"], config["beta"])
    torch.testing.assert_close(loss, case["expected_loss"].double(), **TOLERANCE)
    loss32 = morph_loss(student, teacher, groupings, config["loss"], config["beta"])
    torch.testing.assert_close(loss32, case["expected_loss"], **TOLERANCE)
