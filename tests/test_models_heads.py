"""fastcon.models heads: MoCo v3 MLP layout, cosine momentum, EMA teacher against a plain loop."""

import math

import pytest
import torch
from torch import nn

from fastcon.models import EMATeacher, MLPHead, cosine_momentum, predictor, projector


def test_mlp_head_layout():
    p = projector(32, hidden_dim=64, out_dim=16)
    kinds = [type(m).__name__ for m in p]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in p if isinstance(m, nn.Linear))
    assert not p[-1].affine
    q = predictor(16, hidden_dim=64)
    assert [type(m).__name__ for m in q] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert q(p(torch.randn(5, 32))).shape == (5, 16)
    with pytest.raises(ValueError, match="num_layers"):
        MLPHead(4, num_layers=0)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(150, 100, 0.99) == pytest.approx(1.0)
    for s in (7, 33, 81):
        assert cosine_momentum(s, 100, 0.9) == pytest.approx(1 - 0.1 * (math.cos(math.pi * s / 100) + 1) / 2)


def _student():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4, bias=False))


@pytest.mark.parametrize("buffers", ["copy", "ema", "keep"])
def test_ema_teacher_matches_per_parameter_loop(buffers):
    student = _student()
    teacher = EMATeacher(student, base_momentum=0.9, total_steps=10, buffers=buffers)
    manual = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    assert not any(p.requires_grad for p in teacher.parameters())
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for step in range(4):
        student(torch.randn(16, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        m = teacher.update(student, step)
        assert m == pytest.approx(cosine_momentum(step, 10, 0.9))
        # the plain loop
        for name, p in student.named_parameters():
            manual[name] = m * manual[name] + (1 - m) * p.detach()
        for name, b in student.named_buffers():
            if buffers == "copy" or (buffers == "ema" and not b.is_floating_point()):
                manual[name] = b.clone()
            elif buffers == "ema":
                manual[name] = m * manual[name] + (1 - m) * b
        for name, v in teacher.module.state_dict().items():
            torch.testing.assert_close(v, manual[name], rtol=1e-6, atol=1e-7, msg=name)
    # the student moved the teacher
    assert not torch.equal(teacher.module[0].weight, _student()[0].weight)


def test_ema_teacher_explicit_momentum_and_errors():
    student = _student()
    teacher = EMATeacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student, momentum=0.0)  # m = 0: a copy of the student
    for a, b in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="give step"):
        teacher.update(student)
    with pytest.raises(ValueError, match="not the same network"):
        teacher.update(nn.Linear(2, 2), momentum=0.5)
    with pytest.raises(ValueError, match="buffers"):
        EMATeacher(student, buffers="avg")
