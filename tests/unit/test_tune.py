"""Search spaces that cannot make valid trials are one message each. The searches on a real
local Ray with a real MLflow server are in tests/integration/test_tune.py."""

import pytest
import yaml

from wrn_cluster.spec import parse

pytestmark = pytest.mark.slow


def test_bad_search_spaces_are_one_message_each():
    base = {
        "kind": "tune",
        "name": "t",
        "data": {"dataset": "cifar10", "url": "/d"},
        "schedule": {"epochs": 10, "milestones": [5]},
    }
    cases = {
        "optimizer.lrr": ({"grid": [0.1]}, "tune.space.optimizer.lrr: 0.1 makes an invalid trial"),
        "model.depth": ({"uniform": [10, 20]}, "depth and width are searched with grid or choice"),
        "optimizer.lr": ({"grid": [0.1], "choice": [0.2]}, "give exactly one of grid, choice"),
    }
    for key, (dim, expected) in cases.items():
        text = yaml.safe_dump({**base, "tune": {"space": {key: dim}}})
        with pytest.raises(Exception) as caught:
            parse(text, "t.yaml")
        assert expected in str(caught.value), str(caught.value)
    bad_depth = yaml.safe_dump({**base, "tune": {"space": {"model.depth": {"grid": [11]}}}})
    with pytest.raises(Exception, match="depth 11 is not valid"):
        parse(bad_depth, "t.yaml")


def test_step_checkpoints_in_a_search_are_refused_with_the_field_and_the_fix():
    text = yaml.safe_dump(
        {
            "kind": "tune",
            "name": "t",
            "data": {"dataset": "cifar10", "url": "/d"},
            "schedule": {"epochs": 10, "milestones": [5]},
            "checkpoint": {"every_steps": 100},
            "tune": {"space": {"optimizer.lr": {"grid": [0.1]}}},
        }
    )
    with pytest.raises(Exception) as caught:
        parse(text, "t.yaml")
    message = str(caught.value)
    assert "checkpoint.every_steps" in message and "remove checkpoint.every_steps" in message
