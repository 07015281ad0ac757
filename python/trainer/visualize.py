"""Layer visualisation: feature-map grids of named layers and Grad-CAM overlays, as PNG files.

    python -m trainer visualize --checkpoint runs/digits/best.pt --list-layers
    python -m trainer visualize --checkpoint runs/digits/best.pt --image data/digits/val/3/digit_0003.png \
        --layers layer1,layer3 --out runs/digits/vis [--cam-class 8] [--cam-layer layer4]

Feature maps come from forward hooks on any named module (``--list-layers`` prints the names with
their output shapes). Grad-CAM (Selvaraju et al.): the target layer's activations A (C, h, w) are
weighted by the spatial mean of d score_c / dA, summed over channels, passed through ReLU,
upsampled to the input and scaled to [0, 1]. The default target layer per family is its last
convolutional feature map (``DEFAULT_CAM_LAYERS``).
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import Normalize, decode_image, eval_transform
from .errors import UnknownNameError, UserError

# family -> (module whose output is the last spatial feature map before global pooling,
#            pattern of the stage outputs to fall back on when that map is too coarse)
DEFAULT_CAM_LAYERS = {
    "resnet": ("layer4", r"layer\d"),
    "resnext": ("layer4", r"layer\d"),
    "densenet": ("features", r"features\.(denseblock\d|transition\d)|features"),
    "mobilenet_v2": ("features", r"features\.\d+|features"),
    "mobilenet_v3": ("features", r"features\.\d+|features"),
    "efficientnet": ("features", r"features\.\d+|features"),
    "efficientnet-pytorch": ("_bn1", r"_blocks\.\d+|_bn1"),
    "efficientnet_v2": ("features", r"features\.\d+|features"),
    "regnet": ("trunk_output", r"trunk_output\.block\d|trunk_output"),
    "convnext": ("features", r"features\.\d+|features"),
}
# Transformers have no (N, C, H, W) map before pooling (ViT: tokens; Swin: channels-last stages), so
# Grad-CAM has no default layer there: --cam-layer names one explicitly.
NO_DEFAULT_CAM = {"vit", "swin"}
MIN_CAM_SIZE = 4  # a map smaller than 4x4 carries (almost) no spatial information


class LayerError(UnknownNameError):
    def __str__(self) -> str:
        return self.args[0]


def resolve_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise LayerError(f"no layer named {name!r} in this model.{hint} 'python -m trainer visualize --checkpoint CKPT "
                     f"--list-layers' prints all {len(names)} names.")


def default_cam_layer(model: torch.nn.Module, family: str, img_size: tuple[int, int]) -> str:
    """The family's last feature map; when that is smaller than MIN_CAM_SIZE at this input size (e.g. a
    resnet's layer4 is 1x1 for 32x32 digits), the deepest stage output that is at least that large."""
    try:
        final, pattern = DEFAULT_CAM_LAYERS[family]
    except KeyError:
        why = " (a transformer: no convolutional feature map)" if family in NO_DEFAULT_CAM else ""
        raise LayerError(f"no default Grad-CAM layer for family {family!r}{why}; pass --cam-layer NAME") from None
    shapes = {n: shape for n, _, shape in list_layers(model, img_size)}
    if len(shapes.get(final, ())) == 3 and min(shapes[final][1:]) >= MIN_CAM_SIZE:
        return final
    stages = [n for n, shape in shapes.items() if re.fullmatch(pattern, n) and len(shape) == 3]
    big = [n for n in stages if min(shapes[n][1:]) >= MIN_CAM_SIZE]
    if big:
        return big[-1]
    return max(stages, key=lambda n: min(shapes[n][1:])) if stages else final


@torch.no_grad()
def list_layers(model: torch.nn.Module, img_size: tuple[int, int]) -> list[tuple[str, str, tuple]]:
    """(name, module type, output shape) for every named module, in registration order, from one forward
    pass of a blank (1, 3, H, W) input."""
    shapes: dict[str, tuple] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue
        def hook(m, inp, out, name=name):
            if isinstance(out, torch.Tensor):
                shapes.setdefault(name, tuple(out.shape[1:]))
        handles.append(mod.register_forward_hook(hook))
    try:
        model.eval()(torch.zeros(1, 3, *img_size))
    finally:
        for h in handles:
            h.remove()
    return [(n, type(m).__name__, shapes.get(n, ())) for n, m in model.named_modules() if n]


@torch.no_grad()
def feature_maps(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """x (1, 3, H, W) normalised -> {name: (C, h, w) activations} (or (D,) for non-spatial layers)."""
    mods = {n: resolve_layer(model, n) for n in names}
    out: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: out.setdefault(n, o.detach().clone()))
               for n, m in mods.items()]
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return {n: out[n][0] for n in names}


def grad_cam(model: torch.nn.Module, x: torch.Tensor, layer: str, class_index: int | None = None
             ) -> tuple[np.ndarray, int, np.ndarray]:
    """x (1, 3, H, W) normalised -> (cam (H, W) float32 in [0, 1], class index, softmax probs (K,))."""
    target = resolve_layer(model, layer)
    store: dict[str, torch.Tensor] = {}

    def hook(mod, inp, out):
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise LayerError(f"Grad-CAM needs a layer with a (N, C, h, w) output; {layer!r} gives "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        # clone: later in-place ops (e.g. densenet's relu(inplace=True)) must not change the saved values
        store["act"] = out.detach().clone()
        out.register_hook(lambda g: store.__setitem__("grad", g.detach().clone()))

    model.eval()
    handle = target.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)  # makes a graph even when every weight is frozen
            logits = model(x)
            k = logits.shape[1]
            idx = int(logits.argmax(1)) if class_index is None else int(class_index)
            if not 0 <= idx < k:
                raise UserError(f"class index {idx} is out of range for {k} classes")
            logits[0, idx].backward()
    finally:
        handle.remove()
    act, grad = store["act"][0], store["grad"][0]  # (C, h, w)
    weights = grad.mean(dim=(1, 2))  # (C,)
    cam = F.relu((weights[:, None, None] * act).sum(0))  # (h, w)
    cam = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    if float(cam.max()) > 1e-6 * float((weights[:, None, None] * act).abs().sum(0).max() + 1e-12):
        cam = cam / cam.max()
    else:
        cam = torch.zeros_like(cam)  # a flat map (e.g. a 1x1 layer): nothing to localise, not noise
    probs = torch.softmax(logits.detach().float(), 1)[0].numpy()
    return cam.numpy().astype(np.float32), idx, probs


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_feature_grid(fmap: torch.Tensor, path: str | os.PathLike, title: str, max_channels: int = 32) -> None:
    """(C, h, w) -> a grid of the first ``max_channels`` channels, each scaled to its own range."""
    plt = _plt()
    if fmap.dim() != 3:
        raise LayerError(f"{title}: output shape {tuple(fmap.shape)} is not a (C, h, w) feature map; pick a "
                         "convolutional layer")
    c = min(fmap.shape[0], max_channels)
    cols = int(np.ceil(np.sqrt(c)))
    rows = int(np.ceil(c / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < c:
            ax.imshow(fmap[i].float().numpy(), cmap="viridis", interpolation="nearest")
            ax.set_title(str(i), fontsize=7)
    fig.suptitle(f"{title}: {c} of {fmap.shape[0]} channels, {fmap.shape[1]}x{fmap.shape[2]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_gradcam(image: np.ndarray, cam: np.ndarray, path: str | os.PathLike, title: str) -> None:
    """image (H, W, 3) uint8 (what the model saw), cam (H, W) in [0, 1] -> input | heatmap | overlay."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("input")
    axes[1].imshow(cam, cmap="jet", vmin=0, vmax=1, interpolation="bilinear")
    axes[1].set_title("Grad-CAM")
    axes[2].imshow(image, interpolation="nearest")
    axes[2].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
    axes[2].set_title("overlay")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def visualize_image(checkpoint: str | os.PathLike, image: str | os.PathLike, out_dir: str | os.PathLike,
                    layers: list[str] | None = None, cam: bool = True, cam_layer: str | None = None,
                    cam_class: str | None = None, max_channels: int = 32) -> dict:
    """Write ``<layer>.png`` feature grids and ``gradcam_<class>.png``; return what was written and predicted."""
    from .inference import model_from_checkpoint

    loaded = model_from_checkpoint(checkpoint)
    model = loaded.model
    for name in layers or []:
        resolve_layer(model, name)  # fail before any work
    cam_layer = cam_layer or default_cam_layer(model, loaded.spec.family, loaded.preprocess.crop_size)
    resolve_layer(model, cam_layer)
    class_index = None
    if cam_class is not None:
        if cam_class in loaded.classes:
            class_index = loaded.classes.index(cam_class)
        else:
            raise UserError(f"--cam-class {cam_class!r} is not one of the classes {loaded.classes}")
    crop = eval_transform(decode_image(image), loaded.preprocess)  # (3, H, W) uint8
    x = Normalize(loaded.preprocess.mean, loaded.preprocess.std)(crop[None])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(image).stem
    written = []
    for name, fmap in feature_maps(model, x, layers or []).items():
        path = out / f"{stem}_{_safe(name)}.png"
        save_feature_grid(fmap, path, f"{loaded.spec.name} {name}", max_channels)
        written.append(str(path))
    result = {"files": written, "image": str(image)}
    if cam:
        heat, idx, probs = grad_cam(model, x, cam_layer, class_index)
        pred = int(probs.argmax())
        label = loaded.classes[idx]
        path = out / f"{stem}_gradcam_{_safe(label)}.png"
        save_gradcam(crop.permute(1, 2, 0).numpy(), heat, path,
                     f"{loaded.spec.name} {cam_layer}: class {label} (p={probs[idx]:.3f}); predicted "
                     f"{loaded.classes[pred]} (p={probs[pred]:.3f})")
        written.append(str(path))
        result.update(cam_layer=cam_layer, cam_class=label, predicted=loaded.classes[pred],
                      predicted_prob=float(probs[pred]))
    return result
