"""The device's AmsgradAdam is torch.optim.Adam(amsgrad=True): same numbers, same state."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.learning.models import EdgeResNet8
from edge_runtime.learning.optimizer import AmsgradAdam
from edge_runtime.learning.perf import channels_last_input, to_channels_last

LR, WD = 1e-2, 1e-4


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = to_channels_last(EdgeResNet8(10))
    model.unused = nn.Linear(2, 2)  # never gets a gradient: skipped by both optimizers
    g = torch.Generator().manual_seed(seed)
    data = [(channels_last_input(torch.randn(6, 3, 8, 8, generator=g)),
             torch.randint(0, 10, (6,), generator=g)) for _ in range(4)]
    return model, data


def run(model, opt, data) -> None:
    for x, y in data:
        loss = F.cross_entropy(model(x)[0], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def assert_same(a: nn.Module, b: nn.Module, sa: dict, sb: dict) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i, s in sa["state"].items():
        assert s.keys() == sb["state"][i].keys()
        for k, v in s.items():
            assert v.dtype == sb["state"][i][k].dtype and torch.equal(v, sb["state"][i][k]), (i, k)


def test_steps_equal_torch_adam_bit_for_bit():
    ours_m, data = model_and_data()
    torch_m, _ = model_and_data()
    ours = AmsgradAdam(ours_m.parameters(), lr=LR, weight_decay=WD)
    theirs = torch.optim.Adam(torch_m.parameters(), lr=LR, weight_decay=WD, amsgrad=True)
    run(ours_m, ours, data)
    run(torch_m, theirs, data)
    assert_same(ours_m, torch_m, ours.state_dict(), theirs.state_dict())
    assert len(ours.state) == len(list(ours_m.parameters())) - 2  # the unused layer: none
    ours.zero_grad()
    assert all(p.grad is None for p in ours_m.parameters())


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_state_saved_by_either_resumes_in_the_other(direction):
    a_m, data = model_and_data()
    b_m, _ = model_and_data()
    ref_m, _ = model_and_data()
    make_ours = lambda m: AmsgradAdam(m.parameters(), lr=LR, weight_decay=WD)  # noqa: E731
    make_torch = lambda m: torch.optim.Adam(m.parameters(), lr=LR, weight_decay=WD,  # noqa: E731
                                            amsgrad=True)
    first, second = (make_torch, make_ours) if direction == "torch->ours" else (make_ours,
                                                                                make_torch)
    a, ref = first(a_m), make_torch(ref_m)
    run(a_m, a, data[:2])
    run(ref_m, ref, data)
    b_m.load_state_dict(a_m.state_dict())
    b = second(b_m)
    b.load_state_dict(a.state_dict())
    run(b_m, b, data[2:])
    assert_same(b_m, ref_m, b.state_dict(), ref.state_dict())


def test_a_state_for_other_parameters_is_refused():
    model, data = model_and_data()
    del model.unused
    opt = AmsgradAdam(model.parameters(), lr=LR)
    run(model, opt, data[:1])
    state = opt.state_dict()
    other = AmsgradAdam(EdgeResNet8(100).parameters(), lr=LR)  # a larger classifier
    with pytest.raises(ValueError, match="shapes of parameter"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="parameters, the model has"):
        AmsgradAdam(list(model.parameters())[:3], lr=LR).load_state_dict(state)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run(model, sgd, data[:1])
    with pytest.raises(ValueError, match="not Adam with amsgrad"):
        opt.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="empty parameter list"):
        AmsgradAdam([], lr=LR)
