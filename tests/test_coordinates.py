import pytest
import torch

from asg_env.training.backbones import build_backbone
from asg_env.training.coordinates import optimization_coordinates
from asg_env.training.proxy import StudentNet


def _coords(name):
    net = StudentNet(build_backbone(name, weights=None), num_classes=12)
    return net, optimization_coordinates(net.features, net.new_head)


@pytest.mark.parametrize("depth", [50, 101])
def test_resnet_gives_the_papers_seven_coordinates(depth):
    _, coords = _coords(f"resnet{depth}")
    assert [c.name for c in coords] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "new_head"]


def test_vgg16_groups_conv_blocks_then_fc6_fc7_then_head():
    _, coords = _coords("vgg16")
    convs_per_block = [len(c.name.split("+")) for c in coords[:5]]
    assert convs_per_block == [2, 2, 3, 3, 3]
    assert all(c.name.startswith("features.") for c in coords[:5])
    assert coords[5].name == "classifier" and coords[6].name == "new_head"


def test_efficientnet_lite0_grouping_is_documented():
    _, coords = _coords("efficientnet_lite0")
    assert [c.name for c in coords] == [
        "conv_stem", "bn1+blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5",
        "blocks.6+conv_head+bn2", "new_head",
    ]


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite0"])
def test_every_trainable_parameter_is_in_exactly_one_coordinate(name):
    net, coords = _coords(name)
    ids = [id(p) for c in coords for p in c.params]
    assert len(ids) == len(set(ids))
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert set(ids) == trainable
    assert not any(id(p) in ids for p in net.imagenet_head.parameters())  # θ_o stays frozen


def test_tracing_leaves_batchnorm_statistics_alone():
    net = StudentNet(build_backbone("efficientnet_lite0", weights="imagenet"), num_classes=10).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimization_coordinates(net.features, net.new_head)
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
