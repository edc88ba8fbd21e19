#!/usr/bin/env python3
"""Measures the peak memory of one steady-state training step of the reference
implementations behind Headroom's zoo (torchvision, timm, MONAI, Hugging Face, open_clip)
on the CPU, and writes shared/fixtures/reference_peaks.json.

This is the truth the estimator is checked against: the models, losses, optimizers and
gradient checkpointing exactly as a user's own PyTorch script runs them, not Headroom's
trainer. Each entry records the exact constructor calls, so anyone can rerun it.

The training loop is the canonical one from the PyTorch tutorials, and every variable in
it lives as long as Python keeps it bound:

    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accumulation):
            batch = make_batch()                 # what a DataLoader hands over
            with autocast:                       # bf16 entries only
                out = model(inputs)
                loss = loss_fn(out, labels)
            loss = loss / accumulation           # accumulation > 1 only
            loss.backward()
        optimizer.step()

so `batch`, `out` and `loss` stay alive through the backward pass and the optimizer step,
and the previous step's `out` until the next forward pass returns.

Two independent measurements, each in a fresh process:
- the profiler: torch.profiler memory events (`profile_memory=True`) from before the
  model is built, summed in time order, give the c10 CPU allocator's exact live bytes;
  the peak inside the last step is the absolute step peak, with the phase it falls in;
- peak RSS: with glibc told to mmap every block of 64 KiB or more and to trim eagerly,
  the last step's rise of VmHWM over the RSS at its start (after `clear_refs`), which
  must match the profiler's rise over the step's baseline (the cross-check).
Both run with oneDNN on (PyTorch's CPU default, `torch.backends.mkldnn.enabled`) and off
(libtorch's native kernels).

Not part of the normal test run: it needs the reference packages and about an hour on
2 cores. To regenerate:

    python3 -m venv /tmp/ref
    echo "$HOME/.cache/headroom/torch-2.11.0/lib/python3.11/site-packages" \\
        > /tmp/ref/lib/python3.11/site-packages/torch-venv.pth
    /tmp/ref/bin/pip install torchvision==0.26.0 timm==1.0.31 monai==1.6.1 \\
        transformers==5.23.0 open_clip_torch==3.3.0 einops==0.8.2 numpy scipy
    /tmp/ref/bin/python scripts/reference_peaks.py --out shared/fixtures/reference_peaks.json

`--only ID[,ID]` runs a subset, `--trace ID` prints one entry's allocation timeline op by
op (to compare with `headroom estimate --trace`), `--no-rss` skips the cross-check,
`--isa avx2,avx512_core` adds measurements with oneDNN (and ATen) limited to those
instruction sets (`ONEDNN_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`): what a CPU with only that
ISA runs. `--configs FILE` measures another set of configurations (the random ones of
`scripts/random_configs.py`). SwinUNETR needs `einops` in the venv.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time

STEPS = 3  # the first creates the optimizer state; the last is measured
THREADS = 2


# --- the configurations -------------------------------------------------------------
# Each entry: `id`, the zoo `model` and its `settings` (what `headroom estimate --model
# M --set k=v` takes), and the Python that builds the same job: `build` (the model),
# `optimizer`, `loss` (None: the model computes it), `task` (how the batch looks and how
# the forward is called), `batch`, `accumulation`, `precision` and `checkpointing` (a
# statement run after the model is built, exactly as the reference's API enables it).

VIT_SMALL = dict(image_size=128, patch_size=16, num_layers=6, num_heads=6, hidden_dim=384, mlp_dim=1536,
                 num_classes=100)
VIT_SETTINGS = [("image", "128"), ("patch_size", "16"), ("num_layers", "6"), ("num_heads", "6"),
                ("hidden_dim", "384"), ("mlp_dim", "1536"), ("num_classes", "100")]
GPT2_SMALL = "GPT2Config(n_layer=6, n_embd=384, n_head=6, n_positions=256, vocab_size=8000)"
GPT2_SETTINGS = [("n_layer", "6"), ("n_embd", "384"), ("n_head", "6"), ("n_positions", "256"), ("seq", "256"),
                 ("vocab_size", "8000")]
GPT2_V50K = "GPT2Config(n_layer=6, n_embd=384, n_head=6, n_positions=256, vocab_size=50257)"
GPT2_V50K_SETTINGS = [("n_layer", "6"), ("n_embd", "384"), ("n_head", "6"), ("n_positions", "256"), ("seq", "256"),
                      ("vocab_size", "50257")]
GPT2_4X256 = "GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=128, vocab_size=8000)"
GPT2_4X256_SETTINGS = [("n_layer", "4"), ("n_embd", "256"), ("n_head", "4"), ("n_positions", "128"), ("seq", "128"),
                       ("vocab_size", "8000")]
CLIP_SMALL = ("open_clip.model.CLIP(embed_dim=256, vision_cfg=open_clip.model.CLIPVisionCfg(layers=4, width=256, "
              "patch_size=16, image_size=128), text_cfg=open_clip.model.CLIPTextCfg(context_length=64, "
              "vocab_size=8000, width=256, heads=4, layers=4))")
CLIP_SETTINGS = [("embed_dim", "256"), ("vision_layers", "4"), ("vision_width", "256"), ("patch_size", "16"),
                 ("image", "128"), ("seq", "64"), ("vocab_size", "8000"), ("text_width", "256"),
                 ("text_heads", "4"), ("text_layers", "4")]

SGD = "torch.optim.SGD(model.parameters(), lr=0.01)"
NESTEROV = "torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)"
ADAM_L2 = "torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)"
MOMENTUM = "torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)"
ADAM = "torch.optim.Adam(model.parameters(), lr=1e-3)"
ADAMW = "torch.optim.AdamW(model.parameters(), lr=1e-3)"
OPTIMIZER_WORDS = {SGD: [("optimizer", "sgd")], MOMENTUM: [("optimizer", "momentum")],
                   NESTEROV: [("optimizer", "momentum"), ("weight_decay", "1e-4"), ("nesterov", "true")],
                   ADAM: [("optimizer", "adam")], ADAM_L2: [("optimizer", "adam"), ("weight_decay", "1e-4")],
                   ADAMW: [("optimizer", "adamw")]}

CE = "torch.nn.CrossEntropyLoss()"


def entry(id, model, settings, build, task, batch, optimizer, loss=CE, accumulation=1, precision="fp32",
          checkpointing=None, checkpoint_setting=None, outputs=None):
    """`outputs`: "kept" (`out = model(x)`, the loop's default here) or "dropped" (only the
    loss is kept, as `loss = model(**batch).loss` and Hugging Face's Trainer do); given,
    it is also Headroom's `outputs` setting."""
    settings = list(settings) + [("batch", str(batch))] + OPTIMIZER_WORDS[optimizer]
    if outputs:
        settings.append(("outputs", outputs))
    if accumulation > 1:
        settings.append(("accum", str(accumulation)))
    if precision != "fp32":
        settings.append(("precision", precision))
    if checkpoint_setting:
        settings.append(checkpoint_setting)
    return dict(id=id, model=model, settings=settings, build=build, task=task, batch=batch,
                optimizer=optimizer, loss=loss, accumulation=accumulation, precision=precision,
                checkpointing=checkpointing, outputs=outputs or "kept")


def mlp_build(in_features, hidden, classes):
    layers, f = [], in_features
    for h in hidden:
        layers += [f"torch.nn.Linear({f}, {h})", "torch.nn.ReLU()"]
        f = h
    layers.append(f"torch.nn.Linear({f}, {classes})")
    return "torch.nn.Sequential(" + ", ".join(layers) + ")"


def small_cnn_build(in_ch, channels, image, classes):
    layers, c, side = [], in_ch, image
    for w in channels:
        layers += [f"torch.nn.Conv2d({c}, {w}, 3, padding=1)", "torch.nn.ReLU()", "torch.nn.MaxPool2d(2)"]
        c, side = w, side // 2
    layers += ["torch.nn.Flatten()", f"torch.nn.Linear({c * side * side}, {classes})"]
    return "torch.nn.Sequential(" + ", ".join(layers) + ")"


CONFIGS = [
    entry("mlp-adamw", "mlp", [("in_features", "784"), ("hidden", "512,256"), ("num_classes", "10")],
          mlp_build(784, [512, 256], 10), ("classify", (784,), 10), 256, ADAMW),
    entry("mlp-sgd-bf16-ckpt", "mlp", [("in_features", "784"), ("hidden", "1024,1024,1024,512"),
                                       ("num_classes", "10")],
          mlp_build(784, [1024, 1024, 1024, 512], 10), ("classify", (784,), 10), 512, SGD, precision="bf16",
          checkpointing="sequential:2", checkpoint_setting=("checkpoint_segments", "2")),
    entry("small_cnn-momentum-accum2", "small_cnn", [("image", "32"), ("channels", "16,32")],
          small_cnn_build(3, [16, 32], 32, 10), ("classify", (3, 32, 32), 10), 64, MOMENTUM, accumulation=2),
    entry("resnet18-224-momentum", "resnet18", [("image", "224")], "torchvision.models.resnet18(weights=None)",
          ("classify", (3, 224, 224), 1000), 8, MOMENTUM),
    entry("resnet18-128-sgd", "resnet18", [("image", "128")], "torchvision.models.resnet18(weights=None)",
          ("classify", (3, 128, 128), 1000), 16, SGD),
    entry("resnet18-96-momentum-bf16", "resnet18", [("image", "96")], "torchvision.models.resnet18(weights=None)",
          ("classify", (3, 96, 96), 1000), 8, MOMENTUM, precision="bf16"),
    entry("resnet18-128-nesterov", "resnet18", [("image", "128")], "torchvision.models.resnet18(weights=None)",
          ("classify", (3, 128, 128), 1000), 8, NESTEROV),
    entry("resnet34-128-adamw-accum2", "resnet34", [("image", "128")], "torchvision.models.resnet34(weights=None)",
          ("classify", (3, 128, 128), 1000), 8, ADAMW, accumulation=2),
    entry("resnet50-128-adam", "resnet50", [("image", "128")], "torchvision.models.resnet50(weights=None)",
          ("classify", (3, 128, 128), 1000), 16, ADAM),
    entry("resnet50-128-adam-bf16", "resnet50", [("image", "128")], "torchvision.models.resnet50(weights=None)",
          ("classify", (3, 128, 128), 1000), 16, ADAM, precision="bf16"),
    entry("seresnext50-128-momentum", "seresnext50_32x4d", [("image", "128")],
          "timm.create_model('seresnext50_32x4d', pretrained=False)", ("classify", (3, 128, 128), 1000), 8,
          MOMENTUM),
    entry("seresnext50-128-momentum-ckpt", "seresnext50_32x4d", [("image", "128")],
          "timm.create_model('seresnext50_32x4d', pretrained=False)", ("classify", (3, 128, 128), 1000), 8,
          MOMENTUM, checkpointing="model.set_grad_checkpointing(True)",
          checkpoint_setting=("checkpoint", "blocks")),
    entry("vit-128-adamw", "vit", VIT_SETTINGS,
          "torchvision.models.VisionTransformer(" + ", ".join(f"{k}={v}" for k, v in VIT_SMALL.items()) + ")",
          ("classify", (3, 128, 128), 100), 16, ADAMW),
    entry("vit-128-sgd-bf16", "vit", VIT_SETTINGS,
          "torchvision.models.VisionTransformer(" + ", ".join(f"{k}={v}" for k, v in VIT_SMALL.items()) + ")",
          ("classify", (3, 128, 128), 100), 8, SGD, precision="bf16"),
    entry("vit-128-adamw-smoothing", "vit", VIT_SETTINGS + [("loss", "ce"), ("label_smoothing", "0.1")],
          "torchvision.models.VisionTransformer(" + ", ".join(f"{k}={v}" for k, v in VIT_SMALL.items()) + ")",
          ("classify", (3, 128, 128), 100), 16, ADAMW, loss="torch.nn.CrossEntropyLoss(label_smoothing=0.1)"),
    entry("unet2d-256-adam", "unet2d", [("image", "256")],
          "monai.networks.nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), "
          "strides=(2, 2, 2, 2), num_res_units=2)", ("segment", (1, 256, 256), 2), 4, ADAM),
    entry("unet2d-256-adam-l2", "unet2d", [("image", "256")],
          "monai.networks.nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), "
          "strides=(2, 2, 2, 2), num_res_units=2)", ("segment", (1, 256, 256), 2), 8, ADAM_L2),
    entry("unet2d-512-bce-adamw", "unet2d", [("image", "512"), ("in_channels", "3"), ("out_channels", "1"),
                                            ("loss", "bce")],
          "monai.networks.nets.UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(16, 32, 64, 128, 256), "
          "strides=(2, 2, 2, 2), num_res_units=2)", ("segment", (3, 512, 512), 1), 2, ADAMW,
          loss="torch.nn.BCEWithLogitsLoss()"),
    entry("unet2d-256-dice-sgd", "unet2d", [("image", "256"), ("out_channels", "3"), ("loss", "dice")],
          "monai.networks.nets.UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(16, 32, 64, 128, 256), "
          "strides=(2, 2, 2, 2), num_res_units=2)", ("segment", (1, 256, 256), 3), 4, SGD,
          loss="monai.losses.DiceLoss(to_onehot_y=True, softmax=True)"),
    entry("unet3d-64-adamw", "unet3d", [("volume", "64")],
          "monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), "
          "strides=(2, 2, 2, 2), num_res_units=2)", ("segment", (1, 64, 64, 64), 2), 1, ADAMW),
    entry("unet3d-48-momentum-bf16", "unet3d", [("volume", "48")],
          "monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), "
          "strides=(2, 2, 2, 2), num_res_units=2)", ("segment", (1, 48, 48, 48), 2), 1, MOMENTUM, precision="bf16"),
    entry("unet3d-64-dicece-adam-accum2", "unet3d", [("volume", "64"), ("loss", "dice_ce")],
          "monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), "
          "strides=(2, 2, 2, 2), num_res_units=2)", ("segment", (1, 64, 64, 64), 2), 2, ADAM, accumulation=2,
          loss="monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)"),
    # Reviewers' two CPU cases: a larger 3-D volume in bf16 and a 2-D step at 512² in fp32.
    entry("unet3d-80-momentum-bf16", "unet3d", [("volume", "80")],
          "monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), "
          "strides=(2, 2, 2, 2), num_res_units=2)", ("segment", (1, 80, 80, 80), 2), 1, MOMENTUM, precision="bf16"),
    entry("unet2d-512-momentum", "unet2d", [("image", "512")],
          "monai.networks.nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), "
          "strides=(2, 2, 2, 2), num_res_units=2)", ("segment", (1, 512, 512), 2), 2, MOMENTUM),
    entry("swin_unetr-64-adamw", "swin_unetr", [("volume", "64"), ("feature_size", "24")],
          "monai.networks.nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=24)",
          ("segment", (1, 64, 64, 64), 2), 1, ADAMW),
    entry("swin_unetr-64-sgd-ckpt", "swin_unetr", [("volume", "64"), ("feature_size", "24")],
          "monai.networks.nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=24, use_checkpoint=True)",
          ("segment", (1, 64, 64, 64), 2), 1, SGD, checkpointing="# use_checkpoint=True in the constructor",
          checkpoint_setting=("checkpoint", "blocks")),
    entry("swin_unetr-64-fs12-dicece-adamw-bf16", "swin_unetr", [("volume", "64"), ("feature_size", "12"),
                                                                ("loss", "dice_ce")],
          "monai.networks.nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12)",
          ("segment", (1, 64, 64, 64), 2), 1, ADAMW, precision="bf16",
          loss="monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)"),
    entry("clip-adamw", "clip", CLIP_SETTINGS, CLIP_SMALL, ("clip", (3, 128, 128), (64, 8000)), 16, ADAMW,
          loss="open_clip.ClipLoss()"),
    entry("clip-momentum-bf16-ckpt", "clip", CLIP_SETTINGS, CLIP_SMALL, ("clip", (3, 128, 128), (64, 8000)), 16,
          MOMENTUM, loss="open_clip.ClipLoss()", precision="bf16",
          checkpointing="model.set_grad_checkpointing(True)", checkpoint_setting=("checkpoint", "blocks")),
    entry("gpt2-adamw", "gpt2", GPT2_SETTINGS, f"transformers.GPT2LMHeadModel(transformers.{GPT2_SMALL})",
          ("lm", 256, 8000), 8, ADAMW, loss=None, outputs="kept"),
    entry("gpt2-adamw-ckpt", "gpt2", GPT2_SETTINGS, f"transformers.GPT2LMHeadModel(transformers.{GPT2_SMALL})",
          ("lm", 256, 8000), 8, ADAMW, loss=None, checkpointing="model.gradient_checkpointing_enable()",
          checkpoint_setting=("checkpoint", "blocks"), outputs="kept"),
    entry("gpt2-sgd-bf16-accum2", "gpt2", GPT2_SETTINGS, f"transformers.GPT2LMHeadModel(transformers.{GPT2_SMALL})",
          ("lm", 256, 8000), 4, SGD, loss=None, precision="bf16", accumulation=2, outputs="kept"),
    # Hugging Face Trainer's loop (`loss = model(**batch).loss`: the logits go before
    # backward), at GPT-2's real vocabulary and at a smaller shape with SGD momentum.
    entry("gpt2-v50257-adamw-trainer-loop", "gpt2", GPT2_V50K_SETTINGS,
          f"transformers.GPT2LMHeadModel(transformers.{GPT2_V50K})", ("lm", 256, 50257), 4, ADAMW, loss=None,
          outputs="dropped"),
    entry("gpt2-4x256-momentum-trainer-loop", "gpt2", GPT2_4X256_SETTINGS,
          f"transformers.GPT2LMHeadModel(transformers.{GPT2_4X256})", ("lm", 128, 8000), 8, MOMENTUM, loss=None,
          outputs="dropped"),
]
BY_ID = {c["id"]: c for c in CONFIGS}


# --- one job ------------------------------------------------------------------------

def namespace(build=None):
    """The packages a build expression may name (only those it names, when given: each
    import costs seconds per measurement)."""
    import torch
    ns = {"torch": torch}
    for name in ("torchvision", "timm", "monai", "transformers", "open_clip", "segmentation_models_pytorch"):
        if build is not None and name not in build:
            continue
        try:
            ns[name] = __import__(name)
            if name == "monai":
                import monai.losses  # noqa: F401
                import monai.networks.nets  # noqa: F401
            if name == "open_clip":
                import open_clip.model  # noqa: F401
        except ImportError:
            pass
    return ns


def make_batch(torch, task, b):
    kind = task[0]
    if kind == "classify":
        _, shape, classes = task
        return torch.randn(b, *shape), torch.randint(0, classes, (b,))
    if kind == "segment":
        _, shape, classes = task
        spatial = shape[1:]
        return torch.randn(b, *shape), None  # labels depend on the loss, see segment_labels
    if kind == "lm":
        _, seq, vocab = task
        return torch.randint(0, vocab, (b, seq)), None
    if kind == "tokens":
        # Feature sequences [B, T, D], a class per position.
        _, shape, classes = task
        return torch.randn(b, *shape), torch.randint(0, classes, (b, shape[0]))
    if kind == "token_ids":
        # Token ids [B, T] (a Hugging Face encoder's input_ids), a class per position.
        _, seq, vocab, classes = task
        return torch.randint(0, vocab, (b, seq)), torch.randint(0, classes, (b, seq))
    if kind == "seq_ids":
        # Token ids [B, T], a class per sequence.
        _, seq, vocab, classes = task
        return torch.randint(0, vocab, (b, seq)), torch.randint(0, classes, (b,))
    if kind == "regress":
        _, shape, out_shape = task
        return torch.randn(b, *shape), torch.randn(b, *out_shape)
    if kind == "clip":
        _, shape, (seq, vocab) = task
        return (torch.randn(b, *shape), torch.randint(0, vocab, (b, seq))), None
    raise ValueError(kind)


def segment_labels(torch, cfg, x):
    """Labels in the layout each loss expects: class indices for cross-entropy, a float
    mask for BCE, MONAI's `[B, 1, ...]` class map for Dice losses with `to_onehot_y`."""
    _, shape, classes = cfg["task"]
    b, spatial = x.shape[0], tuple(x.shape[2:])
    loss = cfg["loss"]
    if loss.startswith("torch.nn.BCEWithLogitsLoss"):
        return (torch.rand(b, 1, *spatial) > 0.5).float()
    if loss.startswith("monai."):
        return torch.randint(0, classes, (b, 1, *spatial)).float()
    return torch.randint(0, classes, (b, *spatial))


def step_functions(torch, model, task, segments, loss_fn):
    """The model's forward pass and the loss as the task calls them: a language model
    takes its inputs as labels and returns its loss, CLIP takes image and text, a
    `checkpoint_sequential` plan runs in `segments`."""

    def forward(inputs):
        if task[0] == "lm":
            return model(input_ids=inputs, labels=inputs)
        if task[0] == "clip":
            return model(*inputs)
        if segments:
            return torch.utils.checkpoint.checkpoint_sequential(model, segments, inputs, use_reentrant=False)
        return model(inputs)

    def compute_loss(out, labels):
        if task[0] == "lm":
            return out.loss
        if task[0] == "clip":
            return loss_fn(*out)
        return loss_fn(out, labels)

    return forward, compute_loss


def run_job(cfg, onednn, measure, keep=None):
    """Builds and trains `cfg` for STEPS steps; `measure` is 'profiler' or 'rss'. With
    `keep` (a dict), the profiler is left there under "prof"."""
    import torch
    torch.set_num_threads(THREADS)
    torch.backends.mkldnn.enabled = onednn
    # "Native" means libtorch's own kernels, as Headroom's trainer uses them: NNPACK (which
    # PyTorch tries for batches of 16 or more when oneDNN declines) goes off with oneDNN.
    torch.backends.nnpack.set_flags(onednn)
    torch.manual_seed(0)
    import warnings
    warnings.filterwarnings("ignore")

    prof = None
    if measure == "profiler":
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.__enter__()
    from torch.profiler import record_function

    ns = namespace(cfg["build"] if cfg.get("modules") else None)
    if cfg.get("modules"):
        # An exported model's own source (scripts/own_models.py).
        exec(cfg["modules"], ns)
    model = eval(cfg["build"], ns)
    model.train()
    ns["model"] = model
    if cfg["checkpointing"] and not cfg["checkpointing"].startswith("#") and \
            not cfg["checkpointing"].startswith("sequential:"):
        exec(cfg["checkpointing"], ns)
    optimizer = eval(cfg["optimizer"], ns)
    loss_fn = eval(cfg["loss"], ns) if cfg["loss"] else None
    accumulation = cfg["accumulation"]
    task = cfg["task"]
    segments = int(cfg["checkpointing"].split(":")[1]) if (cfg["checkpointing"] or "").startswith(
        "sequential:") else 0
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg["precision"] == "bf16" \
        else contextlib.nullcontext

    forward, compute_loss = step_functions(torch, model, task, segments, loss_fn)

    marks = []  # (name, start_ns, end_ns) of the last step's phases, for the profiler

    @contextlib.contextmanager
    def phase(name, last):
        if not last:
            yield
            return
        t0 = time.perf_counter_ns()
        with record_function("headroom::" + name):
            yield
        marks.append((name, t0, time.perf_counter_ns()))

    rss = None
    batch = out = loss = None
    times = []
    for step in range(STEPS):
        last = step == STEPS - 1
        if last and measure == "rss":
            rss = RssWindow()
        t_step = time.perf_counter()
        with phase("step", last):
            optimizer.zero_grad(set_to_none=True)
            for _ in range(accumulation):
                with phase("forward", last):
                    inputs, labels = make_batch(torch, task, cfg["batch"])
                    if task[0] == "segment":
                        labels = segment_labels(torch, cfg, inputs)
                    batch = (inputs, labels)
                # One autocast block around the model and the loss, as the AMP recipes
                # (PyTorch's, MONAI's, Lightning's, Hugging Face's Trainer) write it:
                # the cache of cast weights lives until the loss is computed.
                with autocast():
                    with phase("forward", last):
                        out = forward(inputs)
                    with phase("loss", last):
                        loss = compute_loss(out, labels)
                        if cfg.get("outputs", "kept") == "dropped":
                            out = None
                with phase("loss", last):
                    if accumulation > 1:
                        loss = loss / accumulation
                with phase("backward", last):
                    loss.backward()
            with phase("optimizer_step", last):
                optimizer.step()
        times.append(time.perf_counter() - t_step)
        if last and rss is not None:
            rss.close()
    del batch, out, loss
    result = {"step_seconds": times[-1], "threads": torch.get_num_threads()}
    if prof is not None:
        prof.__exit__(None, None, None)
        result.update(profile_peak(prof))
        if keep is not None:
            keep["prof"] = prof
    if rss is not None:
        result.update({"rss_rise_bytes": rss.rise, "rss_start_bytes": rss.start})
    return result


class RssWindow:
    """The rise of the process's resident set over a window: VmHWM after clearing it."""

    def __init__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start = self.read("VmRSS")

    @staticmethod
    def read(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(key)

    def close(self):
        self.rise = self.read("VmHWM") - self.start


def memory_events(prof):
    evs = prof.profiler.kineto_results.events()
    mem = sorted(((e.start_ns(), e.nbytes()) for e in evs if e.name() == "[memory]"))
    ranges = {}
    for e in evs:
        if e.name().startswith("headroom::"):
            ranges.setdefault(e.name()[len("headroom::"):], []).append((e.start_ns(), e.end_ns()))
    return evs, mem, ranges


def profile_peak(prof):
    _, mem, ranges = memory_events(prof)
    (s0, s1), = ranges["step"]
    live = baseline = peak = 0
    peak_t = s0
    for t, n in mem:
        if t > s1:
            break
        if t < s0:
            live += n
            baseline = live
            continue
        live += n
        if live > peak:
            peak, peak_t = live, t
    peak = max(peak, baseline)
    phase = "step"
    for name, spans in ranges.items():
        if name != "step" and any(a <= peak_t <= b for a, b in spans):
            phase = name
    return {"peak_bytes": peak, "baseline_bytes": baseline, "peak_phase": phase,
            "profiler_rise_bytes": peak - baseline}


def trace(cfg, onednn):
    """Prints the last step's allocations op by op: time order, the innermost ATen op or
    autograd node that made each, and the running total."""
    holder = {}
    result = run_job(cfg, onednn, "profiler", keep=holder)
    evs, mem, ranges = memory_events(holder["prof"])
    (s0, s1), = ranges["step"]
    ops = sorted(((e.start_ns(), e.end_ns(), e.name()) for e in evs
                  if e.name() != "[memory]" and not e.name().startswith("headroom::")), key=lambda o: o[0])
    live = 0
    for t, n in mem:
        if t < s0:
            live += n
            continue
        if t > s1:
            break
        live += n
        inner = None
        for a, b, name in ops:
            if a > t:
                break
            if a <= t <= b and (inner is None or b - a <= inner[1] - inner[0]):
                inner = (a, b, name)
        ph = next((k for k, spans in ranges.items() if k != "step" and any(a <= t <= b for a, b in spans)), "")
        print(f"{ph:<15} {inner[2] if inner else '?':<48} {n:>14} {live:>14}")
    print(json.dumps(result), file=sys.stderr)


# --- the parent: every entry, each measurement in its own process -------------------

# oneDNN's names for the instruction sets it dispatches on, as `ONEDNN_MAX_CPU_ISA` takes
# them, and the matching ATen CPU capability (`ATEN_CPU_CAPABILITY`): a CPU limited this
# way runs the kernels, blockings and scratchpads a CPU with only that ISA runs.
ISA_LIMITS = {"sse41": ("SSE41", "default"), "avx2": ("AVX2", "avx2"), "avx512_core": ("AVX512_CORE", "avx512"),
              "avx512_core_bf16": ("AVX512_CORE_BF16", "avx512"), "avx512_core_amx": ("AVX512_CORE_AMX", "avx512")}


def load_configs(path):
    """The configurations to measure: this script's own, or those of a file written by
    `scripts/random_configs.py` (the same fields, in JSON)."""
    if not path:
        return CONFIGS
    with open(path) as f:
        return json.load(f)["configs"]


def child(cfg_id, onednn, measure, isa=None, configs=""):
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    if isa:
        env.update(ONEDNN_MAX_CPU_ISA=ISA_LIMITS[isa][0], ATEN_CPU_CAPABILITY=ISA_LIMITS[isa][1])
    if measure == "rss":
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--child", cfg_id, "--onednn", "1" if onednn else "0", "--measure", measure]
    if configs:
        cmd += ["--configs", configs]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{cfg_id} ({measure}, onednn={onednn}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def versions():
    import torch
    out = {"torch": torch.__version__}
    for name in ("torchvision", "timm", "monai", "transformers", "open_clip"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


ONEDNN_FLAGS = ("sse4_1", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_tile",
                "amx_bf16", "amx_int8")


def cpu_flags():
    """The CPU's flags that oneDNN's dispatch reads."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ONEDNN_FLAGS if f in have]
    return []


def cpu_isa():
    """The instruction set oneDNN dispatches on here, by the rule of Headroom's
    `shared::machine::CpuIsa::from_flags`."""
    flags = set(cpu_flags())
    core = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    if core and {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"} <= flags:
        return "avx512_core_amx"
    if core and "avx512_bf16" in flags:
        return "avx512_core_bf16"
    if core:
        return "avx512_core"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "sse41" if "sse4_1" in flags else None


def where(isa):
    """What each measurement records of where it ran: the CPU, the ISA oneDNN dispatched
    on (the CPU's own, or the limit it ran under) and the day."""
    return {"cpu": cpu_model(), "isa": isa or cpu_isa(), "date": datetime.date.today().isoformat()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="shared/fixtures/reference_peaks.json")
    ap.add_argument("--only", default="")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--isa", default="",
                    help="also measure oneDNN with the CPU limited to these ISAs (comma-separated, at most the "
                         "machine's own): stored as measured['onednn:ISA'], nothing else is rerun")
    ap.add_argument("--trace", default="")
    ap.add_argument("--onednn", default="1")
    ap.add_argument("--child", default="")
    ap.add_argument("--measure", default="profiler")
    ap.add_argument("--configs", default="", help="measure the configurations of this file instead")
    args = ap.parse_args()
    measure(args)


def measure(args):
    configs = load_configs(args.configs)
    by_id = {c["id"]: c for c in configs}
    if args.child:
        print(json.dumps(run_job(by_id[args.child], args.onednn == "1", args.measure)))
        return
    if args.trace:
        trace(by_id[args.trace], args.onednn == "1")
        return
    chosen = [c for c in configs if not args.only or c["id"] in args.only.split(",")]
    previous, old = {}, {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
            previous = {e["id"]: e for e in old.get("entries", [])}
    # A partial run keeps the whole run's date and duration; each measurement has its own.
    partial = bool(args.only or args.isa)
    entries = []
    failed = []
    started = time.time()
    limits = [i for i in args.isa.split(",") if i]
    order = list(ISA_LIMITS)
    for isa in limits:
        if isa not in ISA_LIMITS or order.index(isa) > order.index(cpu_isa() or "sse41"):
            sys.exit(f"--isa: {isa} is not one of {order} up to this CPU's {cpu_isa()}")
    for i, cfg in enumerate(chosen):
        if limits:
            e = previous.get(cfg["id"])
            if e is None:
                if args.configs:
                    print(f"--isa: {cfg['id']} has no full measurement; skipped", file=sys.stderr)
                    continue
                sys.exit(f"--isa: {cfg['id']} has no full measurement yet; measure it first")
            for isa in limits:
                m = dict(child(cfg["id"], True, "profiler", isa, args.configs), **where(isa))
                e["measured"]["onednn:" + isa] = m
                print(f"[{i + 1}/{len(chosen)}] {cfg['id']} onednn:{isa}: peak {m['peak_bytes'] / 2**20:.2f} MiB "
                      f"({m['peak_phase']}), {m['step_seconds']:.1f} s/step", file=sys.stderr)
            entries.append(e)
            write(args, configs, previous, old, entries, partial, started, failed)
            continue
        measured = {}
        for onednn in (True, False):
            key = "onednn" if onednn else "native"
            try:
                m = dict(child(cfg["id"], onednn, "profiler", None, args.configs), **where(None))
            except RuntimeError as err:
                # A drawn configuration PyTorch refuses is reported and left out; a
                # curated one must run.
                if not args.configs:
                    raise
                print(f"[{i + 1}/{len(chosen)}] {cfg['id']} {key}: left out: {str(err)[-400:]}", file=sys.stderr)
                failed.append(cfg["id"])
                break
            if not args.no_rss:
                r = child(cfg["id"], onednn, "rss", None, args.configs)
                m["rss_rise_bytes"] = r["rss_rise_bytes"]
                m["rss_vs_profiler_pct"] = round(100.0 * (r["rss_rise_bytes"] - m["profiler_rise_bytes"]) /
                                                 max(m["profiler_rise_bytes"], 1), 2)
            measured[key] = m
            print(f"[{i + 1}/{len(chosen)}] {cfg['id']} {key}: peak {m['peak_bytes'] / 2**20:.2f} MiB "
                  f"({m['peak_phase']}), rss check {m.get('rss_vs_profiler_pct', '-')} %, "
                  f"{m['step_seconds']:.1f} s/step", file=sys.stderr)
        e = {k: cfg[k] for k in ("id", "model", "build", "optimizer", "loss", "batch", "accumulation",
                                 "precision", "checkpointing", "outputs")}
        e["settings"] = [list(p) for p in cfg["settings"]]
        e["task"] = cfg["task"][0]
        if args.configs:
            e["task_spec"] = cfg["task"]
        if cfg["id"] in failed:
            continue
        e["measured"] = measured
        entries.append(e)
        write(args, configs, previous, old, entries, partial, started, failed)
    write(args, configs, previous, old, entries, partial, started, failed)


def write(args, configs, previous, old, entries, partial, started, failed):
    """The fixture with `entries` merged in (written after every configuration, so that
    a stopped run keeps what it measured)."""
    # Keep entries that were not rerun.
    ids = {e["id"] for e in entries}
    merged = [previous[c["id"]] if c["id"] not in ids and c["id"] in previous else
              next(e for e in entries if e["id"] == c["id"]) for c in configs
              if c["id"] in ids or c["id"] in previous]
    if args.configs:
        # Another draw's entries in the same file stay.
        drawn_now = {c["id"] for c in configs}
        merged = [e for e in previous.values() if e["id"] not in drawn_now] + merged
    doc = {
        "generated_by": "scripts/reference_peaks.py",
        "date": old.get("date") if partial else datetime.date.today().isoformat(),
        "versions": versions(),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_flags": cpu_flags(),
        "isa_limits": "measured['onednn:ISA'] ran with ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY limiting this "
                      "CPU to that ISA",
        "threads": THREADS,
        "steps": STEPS,
        "loop": "canonical PyTorch loop: batch, out and loss stay bound until reassigned, or only the loss for "
                "entries whose outputs are \"dropped\" (Hugging Face Trainer's loop; see the script)",
        "seconds": old.get("seconds") if partial else round(time.time() - started),
        "entries": merged,
    }
    if partial or args.configs:
        # The file keeps what drew its sets (random_configs.py adds a new draw at the end).
        doc["generated_by"] = old.get("generated_by", doc["generated_by"])
        if "drawn" in old:
            doc["drawn"] = old["drawn"]
    if failed:
        doc["left_out"] = failed
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
