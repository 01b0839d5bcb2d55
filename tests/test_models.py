"""Model factory: timm backbones with 1 input channel, small-input stem, init weights, specs."""

from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline import models
from pipeline.errors import UserError
from pipeline.models import create_model, model_from_spec, model_spec


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def test_resnet10t_small_input_logits_embed_and_head() -> None:
    model = create_model("resnet10t", num_classes=10, small_input=True).eval()
    x = torch.randn(2, 1, 24, 24)
    emb = model.embed(x)
    assert emb.shape == (2, model.embed_dim) == (2, 512)
    logits = model.head(emb)
    assert logits.shape == (2, 10)
    assert torch.allclose(model(x), logits)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 10


def test_small_input_keeps_resolution() -> None:
    """The CIFAR-style stem divides by 8 overall instead of 32."""
    x = torch.randn(1, 1, 24, 24)
    plain = create_model("resnet10t", 3, small_input=False).eval()
    small = create_model("resnet10t", 3, small_input=True).eval()
    assert plain.backbone.forward_features(x).shape[-1] == 1
    assert small.backbone.forward_features(x).shape[-1] == 3
    assert isinstance(small.backbone.maxpool, nn.Identity)


def test_small_input_replaces_resnet18_7x7_stem() -> None:
    model = create_model("resnet18", 4, small_input=True)
    conv = model.backbone.conv1
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.in_channels == 1
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 4)


def test_non_resnet_model_warns_once_for_small_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_SMALL_INPUT_WARNED", set())
    with pytest.warns(UserWarning, match="small_input has no effect on 'test_efficientnet'"):
        model = create_model("test_efficientnet", 3, small_input=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_model("test_efficientnet", 3, small_input=True)
    model.eval()
    x = torch.randn(2, 1, 16, 16)
    assert model(x).shape == (2, 3)
    assert model.embed(x).shape == (2, model.embed_dim)


def test_dropout_sits_before_the_head_only() -> None:
    model = create_model("resnet10t", 3, drop_rate=0.5).train()
    x = torch.randn(4, 1, 16, 16)
    model.backbone.eval()  # BN in eval: embed is then deterministic, so only the head can add noise
    assert torch.equal(model.embed(x), model.embed(x))
    emb = model.embed(x)
    assert not torch.equal(model.head(emb), model.head(emb))


def test_unknown_model_lists_close_matches() -> None:
    with pytest.raises(UserError, match="unknown timm model 'resnet1B'.*resnet18"):
        create_model("resnet1B")


def _rgb_checkpoint(num_classes: int) -> dict[str, torch.Tensor]:
    return timm.create_model("resnet10t", pretrained=False, in_chans=3, num_classes=num_classes).state_dict()


def test_init_weights_adapts_rgb_conv_and_drops_wrong_head(tmp_path, capsys) -> None:
    state = _rgb_checkpoint(num_classes=5)
    path = tmp_path / "rgb.safetensors"
    save_file(state, str(path))
    model = create_model("resnet10t", num_classes=10, init_weights=path)
    out = capsys.readouterr().out
    assert "summed backbone.conv1.0.weight over 3 input channels" in out
    assert "dropped the checkpoint classifier (5 classes, model has 10)" in out
    own = model.state_dict()
    assert torch.allclose(own["backbone.conv1.0.weight"], state["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(own["backbone.layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert torch.equal(own["backbone.bn1.running_var"], state["bn1.running_var"])


def test_init_weights_from_nested_torch_checkpoint_keeps_matching_head(tmp_path) -> None:
    state = _rgb_checkpoint(num_classes=4)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    model = create_model("resnet10t", num_classes=4, init_weights=path)
    assert torch.equal(model.classifier.weight, state["fc.weight"])
    assert torch.equal(model.classifier.bias, state["fc.bias"])


def test_init_weights_roundtrip_of_own_state(tmp_path) -> None:
    source = create_model("resnet10t", 3, small_input=True)
    path = tmp_path / "own.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(1)
    model = create_model("resnet10t", 3, small_input=True, init_weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


class _NotATensor:
    pass


def test_init_weights_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        create_model("resnet10t", 3, init_weights=tmp_path / "missing.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="could not be read"):
        create_model("resnet10t", 3, init_weights=broken)
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _NotATensor()}, pickled)
    with pytest.raises(UserError, match="could not be read"):  # weights_only refuses arbitrary objects
        create_model("resnet10t", 3, init_weights=pickled)
    other = tmp_path / "other.safetensors"
    save_file({"something.else": torch.zeros(3)}, str(other))
    with pytest.raises(UserError, match="no tensor that fits"):
        create_model("resnet10t", 3, init_weights=other)


def test_spec_roundtrip_rebuilds_the_same_model() -> None:
    model = create_model("resnet10t", 6, small_input=True, drop_rate=0.1).eval()
    spec = model_spec(model, 24, {"mean": 0.25, "std": 0.5})
    assert json.loads(json.dumps(spec)) == spec
    assert spec["input_size"] == [24, 24] and spec["in_chans"] == 1 and spec["embed_dim"] == 512
    rebuilt = model_from_spec(spec).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 24, 24)
    assert torch.equal(rebuilt(x), model(x))
    with pytest.raises(UserError, match="lacks timm_name"):
        model_from_spec({k: v for k, v in spec.items() if k != "timm_name"})
