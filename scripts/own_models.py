#!/usr/bin/env python3
"""Models outside Headroom's zoo, exported with torch.export as a user would, for the
importer's tests and its accuracy fixture.

For each model below this script can
- export it (`torch.export.export` in train() mode, the batch dynamic) and write the
  graph-only copy the repository keeps: the `.pt2` archive without its weights and
  sample inputs, deflated (`--export shared/fixtures/own`), or the whole file
  (`--export DIR --weights`) as `torch.export.save` writes it;
- write the configurations `scripts/reference_peaks.py --configs` measures
  (`--configs FILE`): the same eager model, trained with the loss and optimizer the
  entry names, measured exactly as the zoo's references are.

    /tmp/ref/bin/python scripts/own_models.py --export shared/fixtures/own --configs /tmp/own.json
    /tmp/ref/bin/python scripts/reference_peaks.py --configs /tmp/own.json --out shared/fixtures/own_peaks.json

The venv is the one `scripts/reference_peaks.py` describes (torch 2.11, torchvision,
timm, transformers).
"""

import argparse
import io
import json
import os
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))

# Hand-written modules, defined here so that the eager reference and the export build the
# same code; `reference_peaks.py` evaluates `build` with this file's namespace.
MODULES = r'''

import torch
import torch.nn as nn
import torch.nn.functional as F

class SmallConvNet(nn.Module):
    """A hand-written image classifier: conv-bn-relu, two residual blocks in a ModuleList."""
    def __init__(self, classes=10, width=16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            for _ in range(2)])
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(width, classes)
    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        for b in self.blocks:
            x = x + b(x)
        x = F.max_pool2d(x, 2)
        x = x.mean((2, 3))
        return self.fc(self.drop(x))

class Signal1d(nn.Module):
    """A 1-D signal classifier (ECG-style): strided conv1d stages, global average pool."""
    def __init__(self, channels=2, classes=5, width=32):
        super().__init__()
        layers, c = [], channels
        for i in range(4):
            layers += [nn.Conv1d(c, width, 7, stride=2, padding=3), nn.BatchNorm1d(width), nn.SiLU(inplace=True)]
            c = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(width, classes)
    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))

class Seg3d(nn.Module):
    """A small 3-D encoder-decoder for volumes: conv3d, max pooling, a transposed
    convolution back up, a skip connection by concatenation."""
    def __init__(self, cin=1, classes=3, width=8):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv3d(cin, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU(inplace=True))
        self.down = nn.Sequential(nn.Conv3d(width, 2 * width, 3, padding=1), nn.BatchNorm3d(2 * width), nn.ReLU(inplace=True))
        self.up = nn.ConvTranspose3d(2 * width, width, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv3d(2 * width, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU(inplace=True))
        self.out = nn.Conv3d(width, classes, 1)
    def forward(self, x):
        a = self.enc(x)
        b = self.down(F.max_pool3d(a, 2))
        return self.out(self.dec(torch.cat([self.up(b), a], 1)))

class Tagger(nn.Module):
    """nn.TransformerEncoder over feature sequences, a class per position."""
    def __init__(self, d=64, heads=4, layers=2, classes=12):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)
    def forward(self, x):
        return self.head(self.encoder(x))

class Regressor(nn.Module):
    """A tabular regressor: linear, GELU and layer norm, trained with MSE."""
    def __init__(self, features=32, hidden=256, out=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.LayerNorm(hidden),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, out))
    def forward(self, x):
        return self.net(x)
'''

SGD = "torch.optim.SGD(model.parameters(), lr=1e-2)"
MOMENTUM = "torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)"
ADAM = "torch.optim.Adam(model.parameters(), lr=1e-3)"
ADAMW = "torch.optim.AdamW(model.parameters(), lr=1e-3)"
OPTIMIZER_WORDS = {SGD: [("optimizer", "sgd")], MOMENTUM: [("optimizer", "momentum")],
                   ADAM: [("optimizer", "adam")], ADAMW: [("optimizer", "adamw")]}
CE = "torch.nn.CrossEntropyLoss()"
# A Hugging Face output's logits, as the loop of a user's own script reads them.
HF_CE = "(lambda out, y: torch.nn.functional.cross_entropy(out.logits, y))"
HF_TOKEN_CE = "(lambda out, y: torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1)))"
TOKEN_CE = "(lambda out, y: torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)))"
MSE = "torch.nn.MSELoss()"
LOSS_WORDS = {CE: "ce", TOKEN_CE: "token_ce", MSE: "mse", HF_CE: "ce", HF_TOKEN_CE: "token_ce"}

# Small Hugging Face configurations (the architecture is the reference's; sizes keep the
# measurement quick).
BERT = ("transformers.{cls}(transformers.BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=2, "
        "num_attention_heads=4, intermediate_size=256, max_position_embeddings=128{extra}))")

# (id, build, example input shape without the batch, task, source)
MODELS = [
    ("small_convnet", "SmallConvNet()", (3, 32, 32), ("classify", [3, 32, 32], 10), "hand-written"),
    ("signal1d", "Signal1d()", (2, 1024), ("classify", [2, 1024], 5), "hand-written 1-D"),
    ("seg3d", "Seg3d()", (1, 16, 16, 16), ("segment", [1, 16, 16, 16], 3), "hand-written 3-D"),
    ("tagger", "Tagger()", (32, 64), ("tokens", [32, 64], 12), "nn.TransformerEncoder"),
    ("regressor", "Regressor()", (32,), ("regress", [32], [4]), "hand-written MLP"),
    ("mobilenet_v3_small", "torchvision.models.mobilenet_v3_small(num_classes=10)", (3, 64, 64),
     ("classify", [3, 64, 64], 10), "torchvision"),
    ("regnet_y_400mf", "torchvision.models.regnet_y_400mf(num_classes=10)", (3, 64, 64),
     ("classify", [3, 64, 64], 10), "torchvision"),
    ("densenet121", "torchvision.models.densenet121(num_classes=10)", (3, 64, 64),
     ("classify", [3, 64, 64], 10), "torchvision"),
    ("shufflenet_v2", "torchvision.models.shufflenet_v2_x0_5(num_classes=10)", (3, 64, 64),
     ("classify", [3, 64, 64], 10), "torchvision"),
    ("convnext_atto", "timm.create_model('convnext_atto', num_classes=10)", (3, 64, 64),
     ("classify", [3, 64, 64], 10), "timm"),
    ("efficientnet_b0", "timm.create_model('efficientnet_b0', num_classes=10)", (3, 64, 64),
     ("classify", [3, 64, 64], 10), "timm"),
    ("vit_tiny", "timm.create_model('vit_tiny_patch16_224', img_size=64, num_classes=10)", (3, 64, 64),
     ("classify", [3, 64, 64], 10), "timm"),
    ("bert_mlm", BERT.format(cls="BertForMaskedLM", extra=""), (32,), ("token_ids", 32, 2000, 2000),
     "Hugging Face BERT"),
    ("bert_cls", BERT.format(cls="BertForSequenceClassification", extra=", num_labels=3"), (32,),
     ("seq_ids", 32, 2000, 3), "Hugging Face BERT"),
    ("mobilenet_v2", "torchvision.models.mobilenet_v2(num_classes=10)", (3, 64, 64), ("classify", [3, 64, 64], 10),
     "torchvision"),
    ("mnasnet", "torchvision.models.mnasnet0_5(num_classes=10)", (3, 64, 64), ("classify", [3, 64, 64], 10),
     "torchvision"),
    ("mixer", "timm.create_model('mixer_s16_224', img_size=64, num_classes=10)", (3, 64, 64),
     ("classify", [3, 64, 64], 10), "timm"),
    ("regnetx", "timm.create_model('regnetx_002', num_classes=10)", (3, 64, 64), ("classify", [3, 64, 64], 10),
     "timm"),
    ("ghostnet", "timm.create_model('ghostnet_050', num_classes=10)", (3, 64, 64), ("classify", [3, 64, 64], 10),
     "timm"),
    ("smp_unet", "segmentation_models_pytorch.Unet('resnet18', encoder_weights=None, classes=3)", (3, 64, 64),
     ("segment", [3, 64, 64], 3), "segmentation_models_pytorch"),
    # 25 M parameters: a 100 MB file with its weights, for the import benchmark.
    ("big_mlp", "Regressor(features=1024, hidden=4096, out=1000)", (1024,), ("regress", [1024], [1000]),
     "hand-written MLP"),
]

# (model id, batch, optimizer, loss, precision)
RUNS = [
    ("small_convnet", 8, ADAMW, CE, "fp32"),
    ("small_convnet", 4, MOMENTUM, CE, "bf16"),
    ("signal1d", 8, ADAM, CE, "fp32"),
    ("seg3d", 2, ADAMW, CE, "fp32"),
    ("seg3d", 2, SGD, CE, "bf16"),
    ("tagger", 4, ADAMW, TOKEN_CE, "fp32"),
    ("tagger", 4, ADAMW, TOKEN_CE, "bf16"),
    ("regressor", 64, ADAM, MSE, "fp32"),
    ("mobilenet_v3_small", 4, ADAMW, CE, "fp32"),
    ("mobilenet_v3_small", 4, MOMENTUM, CE, "bf16"),
    ("regnet_y_400mf", 4, SGD, CE, "fp32"),
    ("densenet121", 2, ADAMW, CE, "fp32"),
    ("shufflenet_v2", 4, ADAM, CE, "fp32"),
    ("convnext_atto", 4, ADAMW, CE, "fp32"),
    ("convnext_atto", 4, ADAMW, CE, "bf16"),
    ("efficientnet_b0", 4, ADAMW, CE, "fp32"),
    ("vit_tiny", 4, ADAMW, CE, "fp32"),
    ("vit_tiny", 4, MOMENTUM, CE, "bf16"),
    ("bert_mlm", 4, ADAMW, HF_TOKEN_CE, "fp32"),
    ("bert_mlm", 4, ADAMW, HF_TOKEN_CE, "bf16"),
    ("bert_cls", 8, ADAM, HF_CE, "fp32"),
    ("mobilenet_v2", 4, MOMENTUM, CE, "fp32"),
    ("mnasnet", 4, ADAMW, CE, "bf16"),
    ("mixer", 4, ADAMW, CE, "fp32"),
    ("regnetx", 8, SGD, CE, "fp32"),
    ("ghostnet", 4, ADAMW, CE, "fp32"),
    ("smp_unet", 2, ADAMW, CE, "fp32"),
    ("smp_unet", 2, ADAMW, CE, "bf16"),
]


def namespace():
    ns = {}
    exec(MODULES, ns)
    for name in ("torchvision", "timm", "transformers", "segmentation_models_pytorch"):
        try:
            ns[name] = __import__(name)
        except ImportError:
            pass
    return ns


def export(model_id, build, shape, task, out_dir, weights):
    import torch
    ns = namespace()
    torch.manual_seed(0)
    model = eval(build, ns).train()
    if task[0] in ("token_ids", "seq_ids"):
        model.config.use_cache = False
        x = torch.randint(0, task[2], (2, *shape))
    else:
        x = torch.randn(2, *shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    path = os.path.join(out_dir, model_id + ".pt2")
    if weights:
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        return path
    # The graph-only copy: what the importer reads, deflated; no weights, no pickles.
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if "/data/weights/weight_" in info.filename or "/data/sample_inputs/" in info.filename:
                continue
            out = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            out.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(out, src.read(info.filename))
    return path


def configs():
    by_id = {m[0]: m for m in MODELS}
    out = []
    for model_id, batch, optimizer, loss, precision in RUNS:
        _, build, shape, task, _ = by_id[model_id]
        settings = [("batch", str(batch)), ("loss", LOSS_WORDS[loss])] + OPTIMIZER_WORDS[optimizer]
        if precision != "fp32":
            settings.append(("precision", precision))
        words = "-".join(w for _, w in OPTIMIZER_WORDS[optimizer][:1])
        out.append(dict(id=f"{model_id}-b{batch}-{words}-{precision}", model="file:" + model_id, settings=settings,
                        build=build, task=list(task), batch=batch, optimizer=optimizer, loss=loss, accumulation=1,
                        precision=precision, checkpointing=None, outputs="kept", modules=MODULES))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", metavar="DIR", help="write each model's .pt2 here")
    ap.add_argument("--weights", action="store_true", help="keep the weights (the whole file torch.export.save writes)")
    ap.add_argument("--only", default="", help="comma-separated model ids")
    ap.add_argument("--configs", metavar="FILE", help="write the configurations reference_peaks.py measures")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    if args.export:
        os.makedirs(args.export, exist_ok=True)
        for model_id, build, shape, task, _ in MODELS:
            if only and model_id not in only:
                continue
            path = export(model_id, build, shape, task, args.export, args.weights)
            print(f"{path}: {os.path.getsize(path)} bytes", file=sys.stderr)
    if args.configs:
        with open(args.configs, "w") as f:
            json.dump({"configs": configs()}, f, indent=1)


if __name__ == "__main__":
    main()
