"""The registered architectures: torchvision families, efficientnet-pytorch, and ``timm/<name>``.

Registered explicitly by ``register_all()`` (called once from ``trainer.models``), never by
import side effects elsewhere.
"""
from __future__ import annotations

from functools import partial

from torch import nn

from .registry import ModelSpec, register_model, register_prefix
from .timm_models import TIMM_PREFIX, timm_spec

TORCHVISION_MODELS = {
    # name: (family, head path)
    "resnet18": ("resnet", "fc"),
    "resnet34": ("resnet", "fc"),
    "resnet50": ("resnet", "fc"),
    "resnet101": ("resnet", "fc"),
    "resnext50_32x4d": ("resnext", "fc"),
    "resnext101_32x8d": ("resnext", "fc"),
    "densenet121": ("densenet", "classifier"),
    "densenet169": ("densenet", "classifier"),
    "mobilenet_v2": ("mobilenet_v2", "classifier.-1"),
    "mobilenet_v3_small": ("mobilenet_v3", "classifier.-1"),
    "mobilenet_v3_large": ("mobilenet_v3", "classifier.-1"),
    "efficientnet_b0": ("efficientnet", "classifier.-1"),
    "efficientnet_b1": ("efficientnet", "classifier.-1"),
    "efficientnet_b2": ("efficientnet", "classifier.-1"),
    "efficientnet_b3": ("efficientnet", "classifier.-1"),
    "efficientnet_b4": ("efficientnet", "classifier.-1"),
    # the 2020-2022 families
    "efficientnet_v2_s": ("efficientnet_v2", "classifier.-1"),
    "regnet_y_400mf": ("regnet", "fc"),
    "regnet_y_800mf": ("regnet", "fc"),
    "regnet_y_1_6gf": ("regnet", "fc"),
    "regnet_x_400mf": ("regnet", "fc"),
    "convnext_tiny": ("convnext", "classifier.-1"),
    "convnext_small": ("convnext", "classifier.-1"),
    "swin_t": ("swin", "head"),
    "vit_b_16": ("vit", "heads.head"),
}
EFFICIENTNET_PYTORCH = [f"efficientnet-b{i}" for i in range(8)]
# the eval crop of each model's default ImageNet weights (torchvision's Weights.transforms)
TORCHVISION_DEFAULT_SIZES = {"efficientnet_b1": 240, "efficientnet_b2": 288, "efficientnet_b3": 300,
                             "efficientnet_b4": 380, "efficientnet_v2_s": 384}
EFFNET_PT_SIZES = [224, 240, 260, 300, 380, 456, 528, 600]
# the position embedding of a ViT is built for one input size; patches are 16 px
SIZE_MULTIPLES = {"vit_b_16": 16}


def _torchvision_builder(name: str, img_size: int) -> nn.Module:
    import torchvision.models as tvm

    if name.startswith("vit_"):
        return getattr(tvm, name)(weights=None, image_size=img_size)
    return getattr(tvm, name)(weights=None)


def _effnet_pt_builder(name: str, img_size: int) -> nn.Module:
    from efficientnet_pytorch import EfficientNet

    # image_size sets the static "same" padding of the convolutions for this input size.
    return EfficientNet.from_name(name, image_size=img_size)


_registered = False


def register_all() -> None:
    global _registered
    if _registered:
        return
    for name, (family, head) in TORCHVISION_MODELS.items():
        register_model(ModelSpec(name, family, partial(_torchvision_builder, name), head, "torchvision",
                                 TORCHVISION_DEFAULT_SIZES.get(name, 224), SIZE_MULTIPLES.get(name, 1)))
    for i, name in enumerate(EFFICIENTNET_PYTORCH):
        register_model(ModelSpec(name, "efficientnet-pytorch", partial(_effnet_pt_builder, name), "_fc",
                                 "efficientnet-pytorch", EFFNET_PT_SIZES[i]))
    register_prefix(TIMM_PREFIX, timm_spec)
    _registered = True
