#!/usr/bin/env python3
"""Measures how far memory rises during a validation pass of the reference models run
by PyTorch itself on the CPU, and writes shared/fixtures/reference_validation.json.

The pass is the one every training script has, after a training step (its gradients
still allocated, as `optimizer.zero_grad(set_to_none=True)` runs only at the next step):

    model.eval()
    with torch.no_grad():
        for batch in val_loader:             # two batches
            out = model(x); loss = loss_fn(out, y)
    model.train()

The rise is the profiler's (`profile_memory=True`) live bytes over the pass, from its
start: what `headroom estimate --trace` shows in its `validation` phase. Eval mode is
where PyTorch's own shortcuts show: `nn.MultiheadAttention`'s fused fast path
(`torch._native_multi_head_attention`, even head counts only), dropout returning its
input, batch norm on running statistics, and locals that keep their tensors bound while
later layers run (no saved tensors hide them).

Run with the reference venv described in scripts/reference_peaks.py (torchvision):

    /tmp/ref/bin/python scripts/reference_validation.py --out shared/fixtures/reference_validation.json
"""

import argparse
import datetime
import json
import platform

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

THREADS = 4


def vit(heads, dropout):
    return dict(
        model="vit",
        build=lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=heads, hidden_dim=32 * heads,
            mlp_dim=128, num_classes=10, dropout=dropout),
        settings=[("image", "32"), ("patch_size", "8"), ("num_layers", "2"), ("num_heads", str(heads)),
                  ("hidden_dim", str(32 * heads)), ("mlp_dim", "128"),
                  ("num_classes", "10"), ("dropout", str(dropout))],
        input=(3, 32, 32), classes=10)


ENTRIES = {
    # An even head count: the fused fast path.
    "vit-32-2heads-dropout": dict(vit(2, 0.1), batch=4, val_batch=32),
    # An odd head count: PyTorch keeps the spelled-out path.
    "vit-32-3heads": dict(vit(3, 0.0), batch=4, val_batch=32),
    "resnet18-32": dict(model="resnet18", build=lambda: torchvision.models.resnet18(num_classes=10),
                        settings=[("image", "32"), ("num_classes", "10")], input=(3, 32, 32), classes=10,
                        batch=4, val_batch=16),
}


def measure(e):
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    m = e["build"]()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    x = torch.randn(e["batch"], *e["input"])
    y = torch.randint(0, e["classes"], (e["batch"],))
    opt.zero_grad(set_to_none=True)
    out = m(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    loss.backward()
    opt.step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        m.eval()
        with torch.no_grad():
            for _ in range(2):
                vx = torch.randn(e["val_batch"], *e["input"])
                vy = torch.randint(0, e["classes"], (e["val_batch"],))
                vout = m(vx)
                vloss = torch.nn.functional.cross_entropy(vout, vy)
        del vx, vy, vout, vloss
        m.train()
    events = prof.profiler.kineto_results.events()
    mem = sorted((ev.start_ns(), ev.nbytes()) for ev in events if ev.name() == "[memory]")
    live = peak = 0
    for _, n in mem:
        live += n
        peak = max(peak, live)
    return peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="shared/fixtures/reference_validation.json")
    args = ap.parse_args()
    entries = []
    for id_, e in ENTRIES.items():
        rise = measure(e)
        print(f"{id_:28s} validation rise {rise:>12,} B")
        entries.append(dict(id=id_, model=e["model"],
                            settings=e["settings"] + [("threads", str(THREADS)), ("batch", str(e["batch"])), ("val_batch", str(e["val_batch"])),
                                                      ("val_batches", "2"), ("optimizer", "sgd"),
                                                      ("runtime", "pytorch")],
                            rise_bytes=rise))
    doc = dict(torch=torch.__version__, torchvision=torchvision.__version__, threads=THREADS,
               onednn=torch.backends.mkldnn.enabled, machine=platform.machine(),
               date=datetime.date.today().isoformat(), entries=entries)
    # One entry per line, so that a change shows as one line of the diff.
    rows = doc.pop("entries")
    head = json.dumps(doc, indent=1)[:-2]
    with open(args.out, "w") as f:
        f.write(head + ',\n "entries": [\n' + ",\n".join("  " + json.dumps(e) for e in rows) + "\n ]\n}\n")


if __name__ == "__main__":
    main()
