#!/usr/bin/env python3
"""Regenerates shared/fixtures/reference_params.json: the parameter counts of the
reference implementations behind Headroom's model zoo.

Each entry instantiates the reference model from its PyPI package with random
initialisation (nothing is downloaded) and counts `sum(p.numel() for p in
model.parameters())`, which counts tied weights once. The `settings` of an entry are
the zoo keys (`headroom estimate --model NAME --set key=value`) that describe the
same model, so the Rust tests build each zoo entry from them and compare.

Not part of the normal test run. To regenerate:

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.11.0 \
        torchvision==0.26.0 timm monai open_clip_torch transformers
    /tmp/ref/bin/python scripts/reference_params.py > shared/fixtures/reference_params.json
"""

import json
import sys

import torch


def count(model):
    return sum(p.numel() for p in model.parameters())


def mlp(settings):
    layers, features = [], settings["in_features"]
    for h in settings["hidden"]:
        layers += [torch.nn.Linear(features, h), torch.nn.ReLU()]
        features = h
    layers.append(torch.nn.Linear(features, settings["num_classes"]))
    return torch.nn.Sequential(*layers)


def torchvision_resnet(name):
    def build(settings):
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=settings.get("num_classes", 1000))

    return build


def seresnext(settings):
    import timm

    return timm.create_model("seresnext50_32x4d", pretrained=False, num_classes=settings.get("num_classes", 1000))


def vit(settings):
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=settings.get("image", 224),
        patch_size=settings.get("patch_size", 16),
        num_layers=settings.get("num_layers", 12),
        num_heads=settings.get("num_heads", 12),
        hidden_dim=settings.get("hidden_dim", 768),
        mlp_dim=settings.get("mlp_dim", 3072),
        num_classes=settings.get("num_classes", 1000),
    )


def monai_unet(dims):
    def build(settings):
        from monai.networks.nets import UNet

        return UNet(
            spatial_dims=dims,
            in_channels=settings.get("in_channels", 1),
            out_channels=settings.get("out_channels", 2),
            channels=settings.get("channels", (16, 32, 64, 128, 256)),
            strides=settings.get("strides", (2, 2, 2, 2)),
            num_res_units=settings.get("num_res_units", 2),
        )

    return build


def swin_unetr(settings):
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(
        in_channels=settings.get("in_channels", 1),
        out_channels=settings.get("out_channels", 2),
        feature_size=settings.get("feature_size", 24),
    )


def clip(settings):
    import open_clip

    if not settings:
        return open_clip.create_model("ViT-B-32", pretrained=None)
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=settings["vision_layers"],
        width=settings["vision_width"],
        patch_size=settings["patch_size"],
        image_size=settings["image"],
    )
    text = CLIPTextCfg(
        context_length=settings["seq"],
        vocab_size=settings["vocab_size"],
        width=settings["text_width"],
        heads=settings["text_heads"],
        layers=settings["text_layers"],
    )
    return CLIP(embed_dim=settings["embed_dim"], vision_cfg=vision, text_cfg=text)


def gpt2(settings):
    from transformers import GPT2Config, GPT2LMHeadModel

    keys = {k: v for k, v in settings.items() if k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")}
    return GPT2LMHeadModel(GPT2Config(**keys))


CASES = [
    ("mlp", {"in_features": 784, "hidden": [512, 256], "num_classes": 10}, mlp),
    ("resnet18", {}, torchvision_resnet("resnet18")),
    ("resnet18", {"num_classes": 10}, torchvision_resnet("resnet18")),
    ("resnet34", {}, torchvision_resnet("resnet34")),
    ("resnet50", {}, torchvision_resnet("resnet50")),
    ("resnet50", {"num_classes": 2}, torchvision_resnet("resnet50")),
    ("seresnext50_32x4d", {}, seresnext),
    ("seresnext50_32x4d", {"num_classes": 10}, seresnext),
    ("vit", {}, vit),
    ("vit", {"patch_size": 32}, vit),
    (
        "vit",
        {"image": 64, "patch_size": 8, "num_layers": 4, "num_heads": 4, "hidden_dim": 128, "mlp_dim": 512,
         "num_classes": 10},
        vit,
    ),
    ("unet2d", {}, monai_unet(2)),
    ("unet2d", {"in_channels": 3, "out_channels": 3, "channels": [8, 16, 32], "strides": [2, 2],
                "num_res_units": 0}, monai_unet(2)),
    ("unet3d", {}, monai_unet(3)),
    ("unet3d", {"channels": [16, 32, 64], "strides": [2, 1], "num_res_units": 1}, monai_unet(3)),
    ("swin_unetr", {}, swin_unetr),
    ("swin_unetr", {"feature_size": 48}, swin_unetr),
    ("swin_unetr", {"feature_size": 36, "in_channels": 4, "out_channels": 3}, swin_unetr),
    ("clip", {}, clip),
    (
        "clip",
        {"embed_dim": 128, "vision_layers": 2, "vision_width": 128, "patch_size": 16, "image": 64, "seq": 32,
         "vocab_size": 1000, "text_width": 128, "text_heads": 2, "text_layers": 2},
        clip,
    ),
    ("gpt2", {}, gpt2),
    ("gpt2", {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256, "vocab_size": 1000}, gpt2),
]


def main():
    torch.manual_seed(0)
    out = []
    for name, settings, build in CASES:
        model = build(settings)
        out.append({"model": name, "settings": settings, "params": count(model)})
        print(f"{name} {settings}: {out[-1]['params']:,}", file=sys.stderr)
    # The feature_size rule the zoo must enforce, checked against MONAI itself.
    from monai.networks.nets import SwinUNETR

    try:
        SwinUNETR(in_channels=1, out_channels=2, feature_size=32)
        rejects = False
    except ValueError:
        rejects = True
    print(json.dumps({"generated_by": "scripts/reference_params.py", "torch": torch.__version__,
                      "swin_unetr_rejects_feature_size_32": rejects, "cases": out}, indent=1))


if __name__ == "__main__":
    main()
