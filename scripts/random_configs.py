#!/usr/bin/env python3
"""Draws random valid training configurations for every zoo model and measures them in
PyTorch the way `scripts/reference_peaks.py` measures its curated ones, into
shared/fixtures/random_peaks.json.

The curated fixture was the set the estimator was built against; this one is drawn by
chance, so that nobody tuned a rule to it. Each configuration draws the model's own
keys within ranges its reference constructor accepts (widths divisible by heads,
images divisible by patches and strides), the micro-batch, the input size, the
optimizer with its weight decay, momentum and implementation (for-loop, foreach,
fused), the precision, the loss and its label smoothing, checkpointing where the
reference has an API for it, accumulation and what the loop keeps of the outputs. Sizes
are kept to what 2 CPU threads measure in seconds to a minute.

Draw fresh ones whenever the estimator changes (a new `--seed`: the file keeps every
draw, each under its seed), and report the set apart from the curated one (`headroom
accuracy` does):

    /tmp/ref/bin/python scripts/random_configs.py --count 60 --seed 2026120701

`--list` prints the drawn configurations without measuring; every other flag of
`reference_peaks.py` (`--only`, `--trace`, `--no-rss`) works on the drawn set.
"""

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference_peaks as ref  # noqa: E402

MODELS = ["mlp", "small_cnn", "resnet18", "resnet34", "resnet50", "seresnext50_32x4d", "vit", "unet2d", "unet3d",
          "swin_unetr", "clip", "gpt2"]


def optimizer(rng, precision):
    """An optimizer with its hyper-parameters and implementation: the PyTorch call and
    Headroom's settings for it."""
    name = rng.choice(["sgd", "momentum", "adam", "adamw"])
    wd = rng.choice(["0", "1e-4", "0.01"])
    impls = ["auto", "for_loop", "foreach"] + (["fused"] if name in ("adam", "adamw") else [])
    impl = rng.choice(impls)
    args = ["model.parameters()", "lr=1e-3" if name.startswith("adam") else "lr=0.01", f"weight_decay={wd}"]
    settings = [("optimizer", name), ("weight_decay", wd)]
    if name == "momentum":
        nesterov = rng.random() < 0.3
        args.append("momentum=0.9")
        if nesterov:
            args.append("nesterov=True")
            settings.append(("nesterov", "true"))
    if impl == "for_loop":
        args.append("foreach=False")
    elif impl == "foreach":
        args.append("foreach=True")
    elif impl == "fused":
        args.append("fused=True")
    if impl != "auto":
        settings.append(("optimizer_impl", impl))
    cls = {"sgd": "SGD", "momentum": "SGD", "adam": "Adam", "adamw": "AdamW"}[name]
    return f"torch.optim.{cls}({', '.join(args)})", settings


def classify_loss(rng):
    smoothing = rng.choice([0.0, 0.0, 0.1])
    if smoothing:
        return f"torch.nn.CrossEntropyLoss(label_smoothing={smoothing})", [("loss", "ce"),
                                                                          ("label_smoothing", str(smoothing))]
    return ref.CE, []


def segment_loss(rng, out_channels):
    """The loss (and out_channels' constraint): BCE needs one output channel, the
    others two or more."""
    if out_channels == 1:
        return "torch.nn.BCEWithLogitsLoss()", [("loss", "bce")]
    kind = rng.choice(["ce", "dice", "dice_ce"])
    if kind == "ce":
        return ref.CE, []
    call = "DiceLoss" if kind == "dice" else "DiceCELoss"
    return f"monai.losses.{call}(to_onehot_y=True, softmax=True)", [("loss", kind)]


def model_config(rng, model):
    """(settings, build, task, batch, loss, loss settings, checkpointing, its setting)."""
    ckpt = ckpt_setting = None
    if model == "mlp":
        inf = rng.choice([32, 64, 256, 784, 1024, 2048])
        hidden = [rng.choice([32, 64, 128, 256, 512, 1024, 2048]) for _ in range(rng.randint(1, 4))]
        classes = rng.choice([2, 10, 100, 1000])
        settings = [("in_features", str(inf)), ("hidden", ",".join(map(str, hidden))), ("num_classes", str(classes))]
        loss, ls = classify_loss(rng)
        if len(hidden) >= 2 and rng.random() < 0.3:
            n = rng.randint(2, len(hidden))
            ckpt, ckpt_setting = f"sequential:{n}", ("checkpoint_segments", str(n))
        return (settings, ref.mlp_build(inf, hidden, classes), ("classify", (inf,), classes),
                rng.choice([8, 32, 64, 128, 256, 512]), loss, ls, ckpt, ckpt_setting)
    if model == "small_cnn":
        channels = [rng.choice([8, 12, 16, 24, 32, 48, 64]) for _ in range(rng.randint(1, 3))]
        image = rng.choice([16, 24, 32, 48, 64, 96])
        image -= image % (2 ** len(channels))
        in_ch = rng.choice([1, 3, 4])
        classes = rng.choice([2, 10, 100])
        settings = [("image", str(image)), ("in_channels", str(in_ch)), ("channels", ",".join(map(str, channels))),
                    ("num_classes", str(classes))]
        loss, ls = classify_loss(rng)
        return (settings, ref.small_cnn_build(in_ch, channels, image, classes), ("classify", (in_ch, image, image),
                                                                                 classes),
                rng.choice([4, 8, 16, 32, 64, 128]), loss, ls, None, None)
    if model in ("resnet18", "resnet34", "resnet50", "seresnext50_32x4d"):
        big = model in ("resnet50", "seresnext50_32x4d")
        image = rng.choice([64, 96, 128] if big else [64, 96, 128, 160, 192])
        in_ch = rng.choice([1, 3, 3])
        classes = rng.choice([10, 100, 1000])
        settings = [("image", str(image)), ("in_channels", str(in_ch)), ("num_classes", str(classes))]
        if model == "seresnext50_32x4d":
            build = f"timm.create_model('seresnext50_32x4d', pretrained=False, num_classes={classes}, in_chans={in_ch})"
            if rng.random() < 0.3:
                ckpt, ckpt_setting = "model.set_grad_checkpointing(True)", ("checkpoint", "blocks")
        else:
            build = f"torchvision.models.{model}(weights=None, num_classes={classes})"
            if in_ch != 3:
                # torchvision's stem for another channel count, as users replace it.
                build = (f"(lambda m: (setattr(m, 'conv1', torch.nn.Conv2d({in_ch}, 64, 7, 2, 3, bias=False)), m)[1])"
                         f"({build})")
        loss, ls = classify_loss(rng)
        batch = rng.choice([2, 4, 8] if big else [2, 4, 8, 16])
        return settings, build, ("classify", (in_ch, image, image), classes), batch, loss, ls, ckpt, ckpt_setting
    if model == "vit":
        patch = rng.choice([8, 16, 32])
        image = patch * rng.randint(4, 8)
        heads = rng.choice([2, 3, 4, 6, 8])
        hidden = heads * rng.choice([32, 48, 64])
        mlp = hidden * rng.choice([2, 4])
        layers = rng.randint(2, 6)
        classes = rng.choice([10, 100, 1000])
        dropout = rng.choice([0.0, 0.0, 0.1])
        attn_dropout = rng.choice([0.0, 0.0, 0.0, 0.1])
        kw = dict(image_size=image, patch_size=patch, num_layers=layers, num_heads=heads, hidden_dim=hidden,
                  mlp_dim=mlp, dropout=dropout, attention_dropout=attn_dropout, num_classes=classes)
        settings = [("image", str(image)), ("patch_size", str(patch)), ("num_layers", str(layers)),
                    ("num_heads", str(heads)), ("hidden_dim", str(hidden)), ("mlp_dim", str(mlp)),
                    ("num_classes", str(classes)), ("dropout", str(dropout)), ("attention_dropout", str(attn_dropout))]
        loss, ls = classify_loss(rng)
        build = "torchvision.models.VisionTransformer(" + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")"
        return (settings, build, ("classify", (3, image, image), classes), rng.choice([2, 4, 8, 16, 32]), loss, ls,
                None, None)
    if model in ("unet2d", "unet3d"):
        three = model == "unet3d"
        levels = rng.randint(3, 5)
        base = rng.choice([8, 16] if three else [8, 16, 32])
        channels = [base * 2 ** i for i in range(levels)]
        strides = [2] * (levels - 1)
        units = rng.randint(0, 3)
        norm = rng.choice(["instance", "instance", "batch"])
        step = 2 ** (levels - 1)
        size = rng.choice([32, 48, 64, 80] if three else [64, 96, 128, 192, 256, 320])
        size -= size % step
        in_ch = rng.choice([1, 1, 3])
        out_ch = rng.choice([1, 2, 3, 4])
        spatial = (size,) * (3 if three else 2)
        settings = [("volume" if three else "image", str(size)), ("in_channels", str(in_ch)),
                    ("out_channels", str(out_ch)), ("channels", ",".join(map(str, channels))),
                    ("strides", ",".join(map(str, strides))), ("num_res_units", str(units)), ("norm", norm)]
        loss, ls = segment_loss(rng, out_ch)
        build = (f"monai.networks.nets.UNet(spatial_dims={3 if three else 2}, in_channels={in_ch}, "
                 f"out_channels={out_ch}, channels={tuple(channels)}, strides={tuple(strides)}, "
                 f"num_res_units={units}, norm='{norm}')")
        batch = rng.choice([1, 2] if three else [1, 2, 4, 8])
        return settings, build, ("segment", (in_ch,) + spatial, out_ch), batch, loss, ls, None, None
    if model == "swin_unetr":
        # 64 is the smallest volume SwinUNETR trains (its bottleneck is 1 voxel at 32,
        # where instance norm refuses); feature size 12 keeps it to seconds per step.
        fs, volume = 12, 64
        in_ch = rng.choice([1, 2])
        out_ch = rng.choice([2, 3])
        settings = [("volume", str(volume)), ("feature_size", str(fs)), ("in_channels", str(in_ch)),
                    ("out_channels", str(out_ch))]
        loss, ls = segment_loss(rng, out_ch)
        use_ckpt = rng.random() < 0.3
        build = (f"monai.networks.nets.SwinUNETR(in_channels={in_ch}, out_channels={out_ch}, feature_size={fs}"
                 f"{', use_checkpoint=True' if use_ckpt else ''})")
        if use_ckpt:
            ckpt, ckpt_setting = "# use_checkpoint=True in the constructor", ("checkpoint", "blocks")
        return (settings, build, ("segment", (in_ch, volume, volume, volume), out_ch), 1, loss, ls, ckpt,
                ckpt_setting)
    if model == "clip":
        embed = rng.choice([128, 256, 512])
        vwidth = rng.choice([128, 192, 256, 384])
        vlayers = rng.randint(2, 6)
        patch = rng.choice([16, 32])
        image = patch * rng.randint(4, 7)
        seq = rng.choice([32, 48, 64, 77])
        vocab = rng.choice([1000, 8000, 16000])
        theads = rng.choice([2, 4, 8])
        twidth = theads * rng.choice([32, 64])
        tlayers = rng.randint(2, 6)
        settings = [("embed_dim", str(embed)), ("vision_layers", str(vlayers)), ("vision_width", str(vwidth)),
                    ("patch_size", str(patch)), ("image", str(image)), ("seq", str(seq)), ("vocab_size", str(vocab)),
                    ("text_width", str(twidth)), ("text_heads", str(theads)), ("text_layers", str(tlayers))]
        build = (f"open_clip.model.CLIP(embed_dim={embed}, vision_cfg=open_clip.model.CLIPVisionCfg(layers={vlayers}, "
                 f"width={vwidth}, patch_size={patch}, image_size={image}), text_cfg=open_clip.model.CLIPTextCfg("
                 f"context_length={seq}, vocab_size={vocab}, width={twidth}, heads={theads}, layers={tlayers}))")
        if rng.random() < 0.3:
            ckpt, ckpt_setting = "model.set_grad_checkpointing(True)", ("checkpoint", "blocks")
        return (settings, build, ("clip", (3, image, image), (seq, vocab)), rng.choice([4, 8, 16, 32]),
                "open_clip.ClipLoss()", [], ckpt, ckpt_setting)
    if model == "gpt2":
        layers = rng.randint(2, 6)
        heads = rng.choice([2, 4, 6, 8])
        embd = heads * rng.choice([32, 64])
        positions = rng.choice([128, 256, 512])
        seq = rng.choice([s for s in (64, 128, 256, 512) if s <= positions])
        vocab = rng.choice([1000, 8000, 32000, 50257])
        pdrop = rng.choice([0.1, 0.1, 0.0])
        settings = [("n_layer", str(layers)), ("n_embd", str(embd)), ("n_head", str(heads)),
                    ("n_positions", str(positions)), ("seq", str(seq)), ("vocab_size", str(vocab)),
                    ("resid_pdrop", str(pdrop)), ("embd_pdrop", str(pdrop)), ("attn_pdrop", str(pdrop))]
        build = (f"transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer={layers}, n_embd={embd}, "
                 f"n_head={heads}, n_positions={positions}, vocab_size={vocab}, resid_pdrop={pdrop}, "
                 f"embd_pdrop={pdrop}, attn_pdrop={pdrop}))")
        if rng.random() < 0.3:
            ckpt, ckpt_setting = "model.gradient_checkpointing_enable()", ("checkpoint", "blocks")
        return (settings, build, ("lm", seq, vocab), rng.choice([1, 2, 4, 8]) if seq <= 256 else rng.choice([1, 2]),
                None, [], ckpt, ckpt_setting)
    raise ValueError(model)


def draw(seed, count):
    """`count` configurations, the models in turn so that every one is drawn."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        model = MODELS[i % len(MODELS)]
        settings, build, task, batch, loss, loss_settings, ckpt, ckpt_setting = model_config(rng, model)
        precision = "bf16" if rng.random() < 0.35 else "fp32"
        accumulation = rng.choice([1, 1, 1, 2, 3])
        opt, opt_settings = optimizer(rng, precision)
        if model == "gpt2":
            outputs = rng.choice(["kept", "dropped"])
        else:
            outputs = "dropped" if rng.random() < 0.2 else "kept"
        settings = settings + loss_settings + [("batch", str(batch))] + opt_settings + [("outputs", outputs)]
        if accumulation > 1:
            settings.append(("accum", str(accumulation)))
        if precision != "fp32":
            settings.append(("precision", precision))
        if ckpt_setting:
            settings.append(ckpt_setting)
        out.append(dict(id=f"r{seed}-{i:03d}-{model}", model=model, settings=settings, build=build, task=task,
                        batch=batch, optimizer=opt, loss=loss, accumulation=accumulation, precision=precision,
                        checkpointing=ckpt, outputs=outputs))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--seed", type=int, default=2026120701)
    ap.add_argument("--out", default="shared/fixtures/random_peaks.json")
    ap.add_argument("--list", action="store_true", help="print the drawn configurations and stop")
    ap.add_argument("--keep-configs", default="", help="also write the drawn configurations here")
    args, rest = ap.parse_known_args()
    configs = draw(args.seed, args.count)
    if args.list:
        for c in configs:
            print(c["id"], " ".join(f"{k}={v}" for k, v in c["settings"]))
        return
    earlier = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            earlier = [d for d in json.load(f).get("drawn", []) if d.get("seed") != args.seed]
    if args.keep_configs:
        path = args.keep_configs
        f = open(path, "w")
    else:
        fd, path = tempfile.mkstemp(suffix=".json", prefix="headroom-random-")
        f = os.fdopen(fd, "w")
    with f:
        json.dump({"seed": args.seed, "count": args.count, "configs": configs}, f, indent=1)
    cmd = [sys.executable, os.path.join(HERE, "reference_peaks.py"), "--configs", path, "--out", args.out] + rest
    code = subprocess.call(cmd)
    if code == 0 and os.path.exists(args.out):
        with open(args.out) as f:
            doc = json.load(f)
        doc["generated_by"] = "scripts/random_configs.py"
        # Every draw the file holds, in the order they were measured.
        doc["drawn"] = earlier + [{"seed": args.seed, "count": args.count,
                                   "date": datetime.date.today().isoformat()}]
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    if not args.keep_configs:
        os.unlink(path)
    sys.exit(code)


if __name__ == "__main__":
    main()
