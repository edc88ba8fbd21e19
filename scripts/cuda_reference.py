#!/usr/bin/env python3
"""CUDA truth for docs/accuracy-cuda.md (issue 12): what PyTorch itself uses on a GPU.

Two measurements, written as JSON under --out:

- cuda_context.json: the CUDA context and the library workspaces on their own, in a
  fresh process per CUDA_MODULE_LOADING setting (LAZY, PyTorch's default, and EAGER):
  device memory in use (all processes, from cudaMemGetInfo) before CUDA starts, after
  `torch.cuda.init()`, after the first fp32 and bf16 matmuls (cuBLAS and its
  workspace), after the first convolution (cuDNN), after the first SDPA call; with the
  caching allocator's reserved bytes at each point.
- cuda_reference.json: one steady-state training step of each configuration as a plain
  PyTorch script runs it, with PyTorch's defaults (its optimizers' foreach path on
  CUDA, SDPA where the model uses it): `max_memory_allocated`, `max_memory_reserved`
  and the device's use (cudaMemGetInfo) over the last of STEPS steps, once with
  cudnn.benchmark off (the default) and once on. The configurations are the CPU
  reference's (scripts/reference_peaks.py, the same constructor calls) and the
  workloads W1, W2, W3 and W5 of docs/workloads.md before and after their users' fixes, at their
  real sizes. Configurations that share an allocator setting run in one process;
  between them the cache is emptied and the peaks reset. One that runs out of memory
  is recorded as such, with the bytes it asked for.

The training loop is reference_peaks.py's (the canonical PyTorch loop, fp16 with a
GradScaler as the AMP recipe writes it). `--device cpu --quick` rehearses the plumbing
on a CPU with tiny sizes (no CUDA figures), as the test run of the GPU session does.

    python3 scripts/cuda_reference.py --out /tmp/cuda          # on the GPU machine
    python3 scripts/cuda_reference.py --device cpu --quick --out /tmp/cuda-rehearsal
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_peaks as ref  # noqa: E402

STEPS = 3

DICE_CE = "monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)"
W1_ADAMW = "torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-5)"
W2_SGD = "torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)"
W3_ADAM = "torch.optim.Adam(model.parameters(), lr=1e-4)"
UNET2D = ("monai.networks.nets.UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(16, 32, 64, 128, 256), "
          "strides=(2, 2, 2, 2), num_res_units=2)")


def workload(id, plan, build, task, batch, optimizer, loss, accumulation=1, precision="fp32", checkpointing=None,
             alloc_conf="", setup=""):
    """`setup` runs once in the configuration's own process before CUDA is used (a
    memory fraction); `alloc_conf` is its PYTORCH_CUDA_ALLOC_CONF."""
    return dict(id=id, plan=plan, build=build, task=task, batch=batch, optimizer=optimizer, loss=loss,
                accumulation=accumulation, precision=precision, checkpointing=checkpointing, alloc_conf=alloc_conf,
                setup=setup)


W5_ADAMW = "torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)"
# open_clip's ViT-B/32, spelled out as the zoo's `clip` defaults are.
CLIP_B32 = ("open_clip.model.CLIP(embed_dim=512, vision_cfg=open_clip.model.CLIPVisionCfg(layers=12, width=768, "
            "patch_size=32, image_size=224), text_cfg=open_clip.model.CLIPTextCfg(context_length=77, "
            "vocab_size=49408, width=512, heads=8, layers=12))")
SERESNEXT = "timm.create_model('seresnext50_32x4d', pretrained=False)"

# The workloads as their users' PyTorch scripts run them (examples/w*.yaml hold the same
# plans for Headroom). W4 (its CPU-side surface term in the loss) is not scripted yet.
WORKLOADS = [
    workload("w1-before", "examples/w1-before.yaml",
             "monai.networks.nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=48)",
             ("segment", (1, 96, 96, 96), 2), 2, W1_ADAMW, DICE_CE, accumulation=2),
    workload("w1-after", "examples/w1-after.yaml",
             "monai.networks.nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=36, use_checkpoint=True)",
             ("segment", (1, 64, 64, 64), 2), 1, W1_ADAMW, DICE_CE, accumulation=8, precision="fp16",
             checkpointing="# use_checkpoint=True in the constructor", alloc_conf="expandable_segments:True"),
    workload("w2-before", "examples/w2-before.yaml", SERESNEXT, ("classify", (3, 224, 224), 1000), 64, W2_SGD,
             ref.CE),
    workload("w2-after", "examples/w2-after.yaml", SERESNEXT, ("classify", (3, 224, 224), 1000), 8, W2_SGD, ref.CE,
             accumulation=8, checkpointing="model.set_grad_checkpointing(True)"),
    workload("w3-before", "examples/w3-before.yaml", UNET2D, ("segment", (3, 1024, 1024), 1), 4, W3_ADAM,
             "torch.nn.BCEWithLogitsLoss()"),
    workload("w3-after", "examples/w3-after.yaml", UNET2D, ("segment", (3, 1024, 1024), 1), 1, W3_ADAM,
             "torch.nn.BCEWithLogitsLoss()", accumulation=4, precision="fp16",
             alloc_conf="expandable_segments:True"),
    workload("w5-before", "examples/w5-before.yaml", CLIP_B32, ("clip", (3, 224, 224), (77, 49408)), 96, W5_ADAMW,
             "open_clip.ClipLoss()", precision="fp16"),
    workload("w5-after", "examples/w5-after.yaml", CLIP_B32, ("clip", (3, 224, 224), (77, 49408)), 16, W5_ADAMW,
             "open_clip.ClipLoss()", accumulation=8, precision="fp16",
             setup="torch.cuda.set_per_process_memory_fraction(0.95)"),
]


def quick(cfg):
    """A tiny version of `cfg` for rehearsing on a CPU."""
    small = dict(cfg)
    kind = cfg["task"][0]
    if kind in ("classify", "segment"):
        shape = cfg["task"][1]
        if len(shape) > 1:
            # Norm layers need more than one value per channel at the bottleneck.
            shape = (shape[0],) + tuple(min(d, 64) for d in shape[1:])
        small["task"] = (kind, shape, cfg["task"][2])
        small["build"] = cfg["build"].replace("image_size=128", "image_size=64").replace("feature_size=48",
                                                                                          "feature_size=12")
    small["batch"] = 2
    small["accumulation"] = min(cfg["accumulation"], 2)
    return small


def used(torch):
    free, total = torch.cuda.mem_get_info()
    return total - free


# --- the context and workspaces ---------------------------------------------------

def context_child():
    import torch
    out = {"module_loading": os.environ.get("CUDA_MODULE_LOADING", "(default)")}
    t0 = time.perf_counter()
    torch.cuda.init()
    out["init_seconds"] = time.perf_counter() - t0
    points = []

    def point(name):
        torch.cuda.synchronize()
        points.append({"after": name, "device_used_bytes": used(torch),
                       "reserved_bytes": torch.cuda.memory_reserved(), "allocated_bytes": torch.cuda.memory_allocated()})

    point("torch.cuda.init()")
    a = torch.randn(1024, 1024, device="cuda")
    point("a 4 MiB tensor")
    (a @ a).sum().item()
    point("first fp32 matmul (cuBLAS)")
    b = a.bfloat16()
    (b @ b).float().sum().item()
    point("first bf16 matmul")
    x = torch.randn(8, 64, 56, 56, device="cuda")
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).cuda()
    conv(x).sum().backward()
    point("first convolution, forward and backward (cuDNN)")
    q = torch.randn(4, 8, 512, 64, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item()
    point("first SDPA (bf16, 512 tokens)")
    out["points"] = points
    out["total_bytes"] = torch.cuda.mem_get_info()[1]
    print(json.dumps(out))


def nvidia_smi_used():
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30).stdout
        return int(text.split()[0]) << 20
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def contexts():
    rows = []
    for loading in ("LAZY", "EAGER"):
        env = dict(os.environ, CUDA_MODULE_LOADING=loading)
        before = nvidia_smi_used()
        p = subprocess.run([sys.executable, __file__, "--context-child"], env=env, capture_output=True, text=True,
                           timeout=300)
        if p.returncode != 0:
            rows.append({"module_loading": loading, "error": p.stderr[-2000:]})
            continue
        row = json.loads(p.stdout.strip().splitlines()[-1])
        row["device_used_before_bytes"] = before
        rows.append(row)
    return rows


# --- one training step of PyTorch itself -----------------------------------------

def step_peaks(cfg, device, benchmark):
    """Trains `cfg` for STEPS steps on `device`; the last step's peaks."""
    import torch
    on_cuda = device == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = benchmark
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_used = used(torch)
        base_allocated = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    ns = ref.namespace()
    model = eval(cfg["build"], ns).to(device)
    model.train()
    ns["model"] = model
    ck = cfg["checkpointing"] or ""
    if ck and not ck.startswith("#") and not ck.startswith("sequential:"):
        exec(ck, ns)
    optimizer = eval(cfg["optimizer"], ns)
    loss_fn = eval(cfg["loss"], ns) if cfg["loss"] else None
    if loss_fn is not None and hasattr(loss_fn, "to"):
        loss_fn = loss_fn.to(device)
    task = cfg["task"]
    segments = int(ck.split(":")[1]) if ck.startswith("sequential:") else 0
    precision = cfg["precision"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if not on_cuda and dtype == torch.float16:
        # A CPU rehearsal: fp16 kernels there are slow to the point of uselessness; bf16
        # takes the same path (autocast, then the GradScaler below).
        dtype = torch.bfloat16
    autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None

    def to_device(v):
        if isinstance(v, tuple):
            return tuple(t.to(device) for t in v)
        return None if v is None else v.to(device)

    forward, compute_loss = ref.step_functions(torch, model, task, segments, loss_fn)

    batch = out = loss = None
    result = {}
    for step in range(STEPS):
        last = step == STEPS - 1
        if last and on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_allocated = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg["accumulation"]):
            inputs, labels = ref.make_batch(torch, task, cfg["batch"])
            if task[0] == "segment":
                labels = ref.segment_labels(torch, cfg, inputs)
            inputs, labels = to_device(inputs), to_device(labels)
            batch = (inputs, labels)
            with autocast():
                out = forward(inputs)
                loss = compute_loss(out, labels)
            if cfg["accumulation"] > 1:
                loss = loss / cfg["accumulation"]
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if on_cuda:
            torch.cuda.synchronize()
        if last:
            result["step_seconds"] = time.perf_counter() - t0
            if on_cuda:
                result.update({
                    "max_allocated_bytes": torch.cuda.max_memory_allocated() - base_allocated,
                    "step_start_allocated_bytes": start_allocated - base_allocated,
                    "max_reserved_bytes": torch.cuda.max_memory_reserved(),
                    "device_used_bytes": used(torch),
                    "device_used_before_bytes": base_used,
                    "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
                })
    del batch, out, loss, optimizer, model
    return result


def reference_child(ids, device, benchmark, quick_mode):
    import torch
    torch.set_num_threads(2 if device == "cpu" else torch.get_num_threads())
    import warnings
    warnings.filterwarnings("ignore")
    by_id = {c["id"]: c for c in ref.CONFIGS + WORKLOADS}
    # One setup per process (configurations are grouped by it).
    setup = by_id[ids[0]].get("setup", "")
    if setup and device == "cuda":
        exec(setup, {"torch": torch})
    for cfg_id in ids:
        cfg = by_id[cfg_id]
        cfg = quick(cfg) if quick_mode else cfg
        row = {"id": cfg_id, "cudnn_benchmark": benchmark}
        try:
            row.update(step_peaks(cfg, device, benchmark))
        except torch.OutOfMemoryError as e:
            row["out_of_memory"] = str(e).split("\n")[0][:400]
        except Exception as e:  # a reference package missing, a constructor refused
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)


def references(device, quick_mode, only):
    configs = ref.CONFIGS + WORKLOADS
    if only:
        configs = [c for c in configs if c["id"] in only]
    if quick_mode and not only:
        # One of each kind of model is enough to rehearse the plumbing.
        seen, picked = set(), []
        for c in configs:
            kind = c.get("model", c["id"].split("-")[0])
            if kind not in seen and c["task"][0] in ("classify", "segment"):
                seen.add(kind)
                picked.append(c)
        configs = picked[:4] + [c for c in WORKLOADS if c in configs][:1]
    rows = []
    groups = {}
    for c in configs:
        groups.setdefault((c.get("alloc_conf", ""), c.get("setup", "")), []).append(c["id"])
    for benchmark in (False, True):
        for (alloc_conf, _), ids in groups.items():
            env = dict(os.environ)
            if alloc_conf:
                env["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf
            cmd = [sys.executable, __file__, "--reference-child", ",".join(ids), "--device", device]
            if benchmark:
                cmd.append("--benchmark")
            if quick_mode:
                cmd.append("--quick")
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            for line in p.stdout.splitlines():
                if line.startswith("{"):
                    row = json.loads(line)
                    row["alloc_conf"] = alloc_conf
                    rows.append(row)
            if p.returncode != 0:
                rows.append({"group": ids, "cudnn_benchmark": benchmark, "error": p.stderr[-2000:]})
        if device == "cpu":
            break  # cuDNN's setting means nothing there
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=False, default="/tmp/cuda-reference")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated configuration ids")
    ap.add_argument("--context-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reference-child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--benchmark", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.context_child:
        return context_child()
    if a.reference_child:
        return reference_child(a.reference_child.split(","), a.device, a.benchmark, a.quick)
    os.makedirs(a.out, exist_ok=True)
    import torch
    meta = {"versions": ref.versions(), "device": a.device, "steps": STEPS, "quick": a.quick}
    if a.device == "cuda":
        meta.update({"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version()})
        t0 = time.perf_counter()
        with open(os.path.join(a.out, "cuda_context.json"), "w") as f:
            json.dump({"meta": meta, "rows": contexts()}, f, indent=1)
        print(f"context: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()
    rows = references(a.device, a.quick, set(filter(None, a.only.split(","))))
    with open(os.path.join(a.out, "cuda_reference.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    bad = [r for r in rows if "error" in r]
    print(f"references: {len(rows)} rows ({len(bad)} errors) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for r in bad:
        print(f"  {r.get('id', r.get('group'))}: {r['error'][-400:]}", file=sys.stderr)


if __name__ == "__main__":
    main()
