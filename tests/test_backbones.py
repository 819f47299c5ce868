import os

import pytest
import torch
from sklearn.datasets import load_sample_image
from torchvision.transforms import v2 as T

from asg_env.errors import UserInputError
from asg_env.training.backbones import build_backbone

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


def _photo_top1(backbone) -> int:
    """How many of the foolbox wheel's 20 ImageNet validation photos the backbone's ImageNet
    head classifies correctly, at its native resolution."""
    from asg_env.tasks.imagenet_photos import load_imagenet_photos

    x, y = load_imagenet_photos(backbone.input_size, backbone.mean, backbone.std, torch.device("cpu"))
    model = torch.nn.Sequential(backbone.features, backbone.imagenet_head).eval()
    with torch.inference_mode():
        return int((model(x).argmax(1) == y).sum())


@pytest.mark.parametrize("n, size, correct", [(1, 240, 19), (2, 260, 18)])
def test_packaged_efficientnet_lite1_and_lite2_weights_are_imagenets(n, size, correct):
    backbone = build_backbone(f"efficientnet_lite{n}")
    assert backbone.input_size == size and backbone.mean == backbone.std == (0.5, 0.5, 0.5)
    assert _photo_top1(backbone) == correct  # as the shared sheet measured with timm's reference loading


def test_a_timm_model_from_a_local_file_is_the_named_backbone(tmp_path):
    """timm:tf_efficientnet_lite0 from a safetensors file of the packaged ImageNet weights (under
    timm's names) gives the named backbone's logits, normalisation and coordinates."""
    from safetensors.torch import save_file

    from asg_env.training.coordinates import optimization_coordinates

    named = build_backbone("efficientnet_lite0")
    state = {**named.features.state_dict(), **{f"classifier.{k}": v for k, v in named.imagenet_head.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "lite0.safetensors")
    generic = build_backbone("timm:tf_efficientnet_lite0", weights=str(tmp_path / "lite0.safetensors"))
    assert (generic.mean, generic.std, generic.input_size) == (named.mean, named.std, 224)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(generic.imagenet_head(generic.features.eval()(x)), named.imagenet_head(named.features.eval()(x)))
    names = [c.name for c in optimization_coordinates(generic.features, torch.nn.Linear(1, 1))]
    assert names == [c.name for c in optimization_coordinates(named.features, torch.nn.Linear(1, 1))]
    assert len(names) == 9 and _photo_top1(generic) == 17


def test_a_torchvision_model_from_a_local_state_dict(tmp_path):
    import torchvision

    reference = torchvision.models.mobilenet_v3_small(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "mnv3.pth")
    backbone = build_backbone("torchvision:mobilenet_v3_small", weights=str(tmp_path / "mnv3.pth"))
    assert backbone.imagenet_head.out_features == 1000 and backbone.input_size == 224
    assert backbone.mean == (0.485, 0.456, 0.406)  # from the weights' own transforms
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(backbone.imagenet_head(backbone.features.eval()(x)), reference(x), atol=1e-6)


def test_generic_backbones_refuse_what_they_cannot_use(tmp_path, monkeypatch):
    import timm

    with pytest.raises(UserInputError, match="timm has no model 'no_such_net'"):
        build_backbone("timm:no_such_net", weights=None)
    with pytest.raises(UserInputError, match="torchvision has no model 'no_such_net'"):
        build_backbone("torchvision:no_such_net", weights=None)
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "resnet10t.pth")
    with pytest.raises(UserInputError, match="resnet10t.pth does not fit timm:tf_efficientnet_lite0: "):
        build_backbone("timm:tf_efficientnet_lite0", weights=str(tmp_path / "resnet10t.pth"))
    with pytest.raises(UserInputError, match="has no linear ImageNet classifier"):  # SqueezeNet classifies by conv
        build_backbone("torchvision:squeezenet1_0", weights=None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserInputError, match="not in the local cache"):
        build_backbone("torchvision:resnet18", weights="imagenet")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    with pytest.raises(UserInputError, match="ImageNet weights are not in the local cache"):
        build_backbone("timm:resnet10t", weights="imagenet")
    with pytest.raises(UserInputError, match="timm has no pretrained tag 'resnet50.nosuchtag'"):
        build_backbone("timm:resnet50.nosuchtag", weights=None)


def test_a_timm_model_takes_its_imagenet_weights_from_the_local_cache(tmp_path, monkeypatch):
    """weights="imagenet" looks in the Hugging Face cache, then the torch hub cache, on disk only."""
    import huggingface_hub
    import timm

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    named = build_backbone("efficientnet_lite0")
    url = timm.models.get_pretrained_cfg("tf_efficientnet_lite0").url
    (tmp_path / "checkpoints").mkdir()
    torch.save({**named.features.state_dict(), **{f"classifier.{k}": v for k, v in named.imagenet_head.state_dict().items()}},
               tmp_path / "checkpoints" / os.path.basename(url))
    cached = build_backbone("timm:tf_efficientnet_lite0")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(cached.imagenet_head(cached.features.eval()(x)), named.imagenet_head(named.features.eval()(x)))
