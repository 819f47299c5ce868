import pytest
import torch
from sklearn.datasets import load_sample_image
from torchvision.transforms import v2 as T

from asg_env.backbones import build_backbone
from asg_env.errors import UserInputError

# bell cote, castle, church, dome, monastery, mosque, palace, stupa
ARCHITECTURE_CLASSES = {442, 483, 497, 538, 663, 668, 698, 832}


def _china_top5(backbone) -> set[int]:
    tf = T.Compose([
        T.ToImage(), T.Resize((224, 224)),
        T.ToDtype(torch.float32, scale=True), T.Normalize(backbone.mean, backbone.std),
    ])
    x = tf(torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1)).unsqueeze(0)
    model = torch.nn.Sequential(backbone.features, backbone.imagenet_head).eval()
    with torch.inference_mode():
        return set(model(x).topk(5).indices[0].tolist())


def test_packaged_efficientnet_lite0_weights_are_imagenets():
    backbone = build_backbone("efficientnet_lite0", weights="imagenet")
    assert backbone.mean == backbone.std == (0.5, 0.5, 0.5)  # timm's config for tf_efficientnet_lite*
    top5 = _china_top5(backbone)
    assert len(top5 & ARCHITECTURE_CLASSES) >= 3 and 442 in top5, top5  # bell cote


def _imagenet_photos() -> tuple[list, torch.Tensor]:
    """The 20 real ImageNet validation photos in the foolbox wheel (read, never imported)."""
    import glob
    import importlib.util
    import os

    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "data", "imagenet_*.jpg")))
    labels = [int(os.path.basename(f).rsplit("_", 1)[1].split(".")[0]) for f in files]
    return [Image.open(f).convert("RGB") for f in files], torch.tensor(labels)


def test_efficientnet_lite0_normalisation_fits_its_weights_on_real_imagenet_photos():
    """With mean = std = 0.5 (the TF originals' (x - 127) / 128), Lite0 classifies 17 of the
    20 photos and is more confident in the right class than with the ImageNet mean/std."""
    backbone = build_backbone("efficientnet_lite0", weights="imagenet")
    model = torch.nn.Sequential(backbone.features, backbone.imagenet_head).eval()
    photos, labels = _imagenet_photos()
    assert len(photos) == 20

    def nll_and_correct(mean, std):
        tf = T.Compose([T.ToImage(), T.Resize(224), T.CenterCrop(224), T.ToDtype(torch.float32, scale=True),
                        T.Normalize(mean, std)])
        with torch.inference_mode():
            logits = model(torch.stack([tf(p) for p in photos]))
        return torch.nn.functional.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).sum().item()

    own_nll, own_correct = nll_and_correct(backbone.mean, backbone.std)
    imagenet_nll, _ = nll_and_correct((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert own_correct >= 17 and own_nll < 0.8 * imagenet_nll, (own_correct, own_nll, imagenet_nll)


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
    with pytest.raises(UserInputError, match="is corrupt or is not a weight file") as err:
        build_backbone("efficientnet_lite0", weights=str(path))
    assert "weights_only" not in str(err.value)  # torch's advice to unpickle anyway is not passed on


def test_missing_torchvision_weights_are_an_error_not_random(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserInputError, match="not in the local cache"):
        build_backbone("resnet50", weights="imagenet")


def test_imagenet_means_the_papers_v1_resnet_weights(tmp_path, monkeypatch):
    """weights="imagenet" is torchvision's IMAGENET1K_V1 (the paper's 77.4 % ResNet-101), not
    DEFAULT (V2); both stay available by name."""
    import torchvision

    reference = torchvision.models.resnet50(weights=None)
    v1 = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / v1)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    loaded = build_backbone("resnet50", weights="imagenet")
    assert torch.equal(loaded.features.conv1.weight, reference.conv1.weight)
    assert loaded.mean == (0.485, 0.456, 0.406)
    with pytest.raises(UserInputError, match="IMAGENET1K_V2"):
        build_backbone("resnet50", weights="DEFAULT")  # V2's file is not there


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
