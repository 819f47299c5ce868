import pytest
import torch
from sklearn.datasets import load_sample_image
from torchvision.transforms import v2 as T

from asg_env.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from asg_env.errors import UserInputError

# bell cote, castle, church, dome, monastery, mosque, palace, stupa
ARCHITECTURE_CLASSES = {442, 483, 497, 538, 663, 668, 698, 832}


def _china_top5(backbone) -> set[int]:
    tf = T.Compose([
        T.ToImage(), T.Resize((224, 224)),
        T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    x = tf(torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1)).unsqueeze(0)
    model = torch.nn.Sequential(backbone.features, backbone.imagenet_head).eval()
    with torch.inference_mode():
        return set(model(x).topk(5).indices[0].tolist())


def test_packaged_efficientnet_lite0_weights_are_imagenets():
    top5 = _china_top5(build_backbone("efficientnet_lite0", weights="imagenet"))
    assert len(top5 & ARCHITECTURE_CLASSES) >= 4, top5
    assert 442 in top5 and 497 in top5  # bell cote, church


def test_random_efficientnet_lite0_does_not_recognise_the_temple():
    torch.manual_seed(0)
    top5 = _china_top5(build_backbone("efficientnet_lite0", weights=None))
    assert len(top5 & ARCHITECTURE_CLASSES) <= 1, top5


def test_weight_file_for_another_model_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(build_backbone("resnet50", weights=None).features.state_dict(), path)
    with pytest.raises(UserInputError, match="EfficientNet-Lite0 needs"):
        build_backbone("efficientnet_lite0", weights=str(path))


def test_corrupt_weight_file_is_refused(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserInputError, match="cannot load weights"):
        build_backbone("efficientnet_lite0", weights=str(path))


def test_missing_torchvision_weights_are_an_error_not_random(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserInputError, match="not in the local cache"):
        build_backbone("resnet50", weights="imagenet")


def test_torchvision_weights_load_from_a_local_file(tmp_path):
    reference = build_backbone("resnet50", weights=None)
    full = {**reference.features.state_dict(), **{f"fc.{k}": v for k, v in reference.imagenet_head.state_dict().items()}}
    path = tmp_path / "resnet50.pth"
    torch.save(full, path)
    loaded = build_backbone("resnet50", weights=str(path))
    assert torch.equal(loaded.imagenet_head.weight, reference.imagenet_head.weight)
    assert torch.equal(loaded.features.conv1.weight, reference.features.conv1.weight)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(UserInputError, match="resnet101"):
        build_backbone("alexnet")
