"""Distillation computes a frozen teacher's logits once per batch it has seen, without changing
what the student learns."""

from __future__ import annotations

import copy

import torch

from edgec.data import load_data_config
from edgec.train import distill, teacher_logits
from tests.conftest import EXAMPLES


def _train_split():
    return load_data_config(EXAMPLES / "digits" / "data.toml").load("calibration")


def _student_after(teacher, config, data, memo_first: bool):
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.9)
    if memo_first:  # fill the table with the same seeded batches first
        distill(copy.deepcopy(student), teacher, data, config.input, epochs=1.0, seed=3,
                progress=False, augment="crop-flip")
    result = distill(student, teacher, data, config.input, epochs=1.0, seed=3, progress=False,
                     augment="crop-flip")
    return student, result


def test_reused_teacher_logits_train_the_same_student(digits_model, digits_config):
    data = _train_split()
    teacher = copy.deepcopy(digits_model).eval()
    table = teacher_logits(teacher, "auto/cpu")
    table.table.clear()
    fresh, first = _student_after(teacher, digits_config, data, memo_first=False)
    assert first.teacher_reused == 0
    table.table.clear()
    again, second = _student_after(teacher, digits_config, data, memo_first=True)
    assert second.teacher_reused == second.steps > 0  # every batch was seen by the first run
    for a, b in zip(fresh.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_another_teacher_gets_its_own_table(digits_model):
    teacher = copy.deepcopy(digits_model).eval()
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert teacher_logits(teacher, "auto/cpu") is teacher_logits(copy.deepcopy(teacher),
                                                                 "auto/cpu")
    assert teacher_logits(teacher, "auto/cpu") is not teacher_logits(other, "auto/cpu")
    assert teacher_logits(teacher, "auto/cpu") is not teacher_logits(teacher, "fp32/cpu")
