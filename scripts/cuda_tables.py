#!/usr/bin/env python3
"""Turns the files of one GPU run (scripts/gpu_session.sh) into docs/accuracy-cuda.md:

1. the trainer against its estimate (`headroom accuracy --device cuda`, as written);
2. PyTorch's own peaks for each configuration (scripts/cuda_reference.py) against
   Headroom's estimate for the same plan on the same card, for PyTorch's defaults
   (`runtime=pytorch`): allocated peak, reserved peak and device use, each with its
   error, cudnn.benchmark off and on;
3. the CUDA context and workspaces per lazy-loading setting.

The estimates are computed here, with this checkout's `headroom estimate`, so the
tables answer for the code that is committed next to them.

    scripts/cuda_tables.py DIR [--gpu h200] [--headroom PATH] > docs/accuracy-cuda.md
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_reference  # noqa: E402
import reference_peaks as ref  # noqa: E402

MIB = 1 << 20


def mib(v):
    return "–" if v is None else f"{v / MIB:,.1f}"


def pct(est, measured):
    if est is None or not measured:
        return None
    return 100.0 * (est - measured) / measured


def fmt_pct(p):
    return "–" if p is None else f"{p:+.2f} %"


def estimate(headroom, cfg, gpu):
    """Headroom's estimate of `cfg` on `gpu` for PyTorch's defaults, as JSON."""
    if "plan" in cfg:
        source = ["--plan", cfg["plan"]]
    else:
        source = ["--model", cfg["model"]]
        for k, v in cfg["settings"]:
            source += ["--set", f"{k}={v}"]
    cmd = [headroom, "estimate", *source, "--set", "runtime=pytorch", "--gpu", gpu, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": p.stderr.strip()[-300:]}
    return json.loads(p.stdout)


def reference_table(rows, headroom, gpu):
    by_id = {c["id"]: c for c in ref.CONFIGS + cuda_reference.WORKLOADS}
    out = ["| configuration | cudnn.benchmark | PyTorch allocated peak (MiB) | estimate | error "
           "| reserved peak | estimate | error | device used | estimate | error |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    errors = []
    cache = {}
    for r in rows:
        if "id" not in r:
            out.append(f"| (a group failed) | {r.get('cudnn_benchmark')} | {r.get('error', '')[-120:]} |||||||||")
            continue
        if r["id"] not in cache:
            cache[r["id"]] = estimate(headroom, by_id[r["id"]], gpu)
        e = cache[r["id"]]
        if "out_of_memory" in r or "error" in r:
            why = r.get("out_of_memory") or r.get("error")
            out.append(f"| {r['id']} | {r['cudnn_benchmark']} | {why[:120]} |||||||||")
            continue
        if "error" in e:
            out.append(f"| {r['id']} | {r['cudnn_benchmark']} | {mib(r.get('max_allocated_bytes'))} | "
                       f"estimate refused: {e['error'][:100]} ||||||||")
            continue
        alloc = r.get("max_allocated_bytes")
        err = pct(e.get("peak_bytes"), alloc)
        if err is not None and not r["cudnn_benchmark"]:
            errors.append(abs(err))
        res = r.get("max_reserved_bytes")
        dev = r.get("device_used_bytes")
        out.append("| " + " | ".join([
            r["id"], str(r["cudnn_benchmark"]),
            mib(alloc), mib(e.get("peak_bytes")), fmt_pct(err),
            mib(res), mib(e.get("reserved_peak_bytes")), fmt_pct(pct(e.get("reserved_peak_bytes"), res)),
            mib(dev), mib(e.get("device_peak_bytes")), fmt_pct(pct(e.get("device_peak_bytes"), dev)),
        ]) + " |")
    headline = ""
    if errors:
        headline = (f"Allocated peak, cudnn.benchmark off: median |error| {statistics.median(errors):.2f} %, "
                    f"worst {max(errors):.2f} % over {len(errors)} configurations (targets: 3 % and 8 %).\n\n")
    return headline + "\n".join(out)


def context_table(doc):
    out = ["| CUDA_MODULE_LOADING | point | device used (MiB) | rise (MiB) | reserved (MiB) |",
           "|---|---|---|---|---|"]
    for row in doc.get("rows", []):
        if "error" in row:
            out.append(f"| {row['module_loading']} | failed: {row['error'][-120:]} ||||")
            continue
        before = row.get("device_used_before_bytes")
        out.append(f"| {row['module_loading']} | before CUDA starts (nvidia-smi) | {mib(before)} | | |")
        prev = before
        for p in row["points"]:
            rise = None if prev is None else p["device_used_bytes"] - prev
            out.append(f"| {row['module_loading']} | {p['after']} | {mib(p['device_used_bytes'])} | {mib(rise)} | "
                       f"{mib(p['reserved_bytes'])} |")
            prev = p["device_used_bytes"]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--headroom", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "debug",
                                                     "headroom"))
    a = ap.parse_args()
    read = lambda name: json.load(open(os.path.join(a.dir, name))) if os.path.exists(  # noqa: E731
        os.path.join(a.dir, name)) else {}
    refs = read("cuda_reference.json")
    ctx = read("cuda_context.json")
    meta = refs.get("meta", {})
    env = open(os.path.join(a.dir, "env.txt")).read() if os.path.exists(os.path.join(a.dir, "env.txt")) else ""
    print("# Headroom on CUDA, measured\n")
    print(f"From one run of `scripts/gpu_session.sh`; device {meta.get('gpu', meta.get('device'))}, "
          f"CUDA {meta.get('cuda')}, cuDNN {meta.get('cudnn')}, packages {json.dumps(meta.get('versions', {}))}.\n")
    print("```\n" + env.strip() + "\n```\n")
    print("## 1. Headroom's trainer against its estimate (`headroom accuracy --device cuda`)\n")
    acc = os.path.join(a.dir, "accuracy-cuda-headroom.md")
    print(open(acc).read().strip() if os.path.exists(acc) else "(not in this run)")
    print("\n## 2. PyTorch's own step against Headroom's estimate for PyTorch's defaults\n")
    print(reference_table(refs.get("rows", []), a.headroom, a.gpu))
    print("\n## 3. The CUDA context and library workspaces\n")
    print(context_table(ctx) if ctx else "(not in this run)")


if __name__ == "__main__":
    main()
