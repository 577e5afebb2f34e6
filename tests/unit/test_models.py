"""The paper's parameter counts, each family's forward/backward, torchvision compatibility."""

import pytest
import torch
from torchvision.models import wide_resnet50_2

from wrn_cluster.models import (
    UnknownModelError,
    build_model,
    count_params,
    measure_gmacs,
    parse_name,
)

# Exact counts where the paper or torchvision gives them; else the paper's rounding (millions).
EXACT = {
    ("wrn-40-4", 10): 8_949_210,
    ("wrn-16-8", 10): 10_961_370,
    ("wrn-28-10", 10): 36_479_194,
    ("wrn-50-2", 1000): 68_883_240,
    ("wrn-101-2", 1000): 126_886_696,
}
ROUNDED_M = {
    ("wrn-40-1", 10): 0.6,
    ("wrn-40-2", 10): 2.2,
    ("wrn-40-8", 10): 35.7,
    ("wrn-28-12", 10): 52.5,
    ("wrn-22-8", 10): 17.2,
    ("wrn-22-10", 10): 26.8,
    ("wrn-16-10", 10): 17.1,
    ("wrn-18-1", 1000): 11.7,
    ("wrn-18-1.5", 1000): 25.9,
    ("wrn-18-2", 1000): 45.6,
    ("wrn-18-3", 1000): 101.8,
    ("wrn-34-1", 1000): 21.8,
    ("wrn-34-1.5", 1000): 48.6,
    ("wrn-34-2", 1000): 86.0,
}


@pytest.mark.parametrize(("name", "classes"), list(EXACT))
def test_exact_parameter_counts_match_the_paper(name, classes):
    assert count_params(build_model(name, classes)) == EXACT[(name, classes)]


@pytest.mark.parametrize(("name", "classes"), list(ROUNDED_M))
def test_parameter_counts_match_the_paper_to_its_rounding(name, classes):
    millions = count_params(build_model(name, classes)) / 1e6
    assert round(millions, 1) == ROUNDED_M[(name, classes)]


def test_wrn50_2_costs_11_4_gmacs_at_224():
    assert measure_gmacs(build_model("wrn-50-2", 1000), 224) == pytest.approx(11.40, abs=0.01)


def test_torchvision_wide_resnet50_2_loads_strictly():
    ours = build_model("wrn-50-2", 1000)
    ours.load_state_dict(wide_resnet50_2().state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    reference = wide_resnet50_2().eval()
    ours.load_state_dict(reference.state_dict())
    assert torch.allclose(ours.eval()(x), reference(x))


@pytest.mark.parametrize(
    ("name", "size"), [("wrn-16-2", 32), ("wrn-10-1.5", 16), ("wrn-18-1", 64), ("wrn-50-1", 64)]
)
def test_each_family_runs_forward_and_backward(name, size):
    model = build_model(name, 7)
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cifar_block_is_preactivation_with_projection_on_shape_change():
    model = build_model("wrn-16-4", 10, dropout=0.3)
    first, second = model.group2[0], model.group2[1]
    assert first.shortcut.kernel_size == (1, 1) and first.shortcut.stride == (2, 2)
    assert second.shortcut is None
    assert model.conv1.out_channels == 16  # the stem is not widened
    assert [model.group1[0].conv1.out_channels, model.group3[0].conv2.out_channels] == [64, 256]
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_dropout_only_changes_training_outputs():
    torch.manual_seed(0)
    model = build_model("wrn-10-1", 3, dropout=0.5)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("wrn-29-10", r"6n\+4"),
        ("wrn-19-2", "ImageNet depths are 18, 34"),
        ("resnet50", "names are wrn-DEPTH-WIDTH"),
        ("wrn-28-0", "width must be positive"),
    ],
)
def test_bad_model_names_say_what_is_valid(name, fragment):
    with pytest.raises(UnknownModelError, match=fragment):
        parse_name(name)
