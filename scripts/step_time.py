#!/usr/bin/env python3
"""Step time of Headroom's trainer against the same model in PyTorch eager, side by side.

Runs one configuration of scripts/reference_peaks.py (the reference model from its
package, PyTorch's canonical loop) and the same plan through `headroom probe` (the
trainer, runtime headroom), alternating, ROUNDS times each, and prints the median time
of the steady-state steps (every step after the first) of each and their ratio.

Usage (the reference venv of reference_peaks.py, after the agent is built):

    source scripts/env.sh
    python scripts/step_time.py --id resnet18-128-momentum [--rounds 3] [--steps 4] [--onednn 1]

The configuration's settings are passed to `headroom probe --set`; both sides use the
same thread count (reference_peaks.THREADS).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_peaks as ref  # noqa: E402


def eager(cfg, onednn, steps):
    """Seconds per steady-state step of the reference in PyTorch eager."""
    env = dict(os.environ, OMP_NUM_THREADS=str(ref.THREADS), MKL_NUM_THREADS=str(ref.THREADS))
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys, json; sys.path.insert(0, {here!r}); import reference_peaks as r; r.STEPS = {steps}; "
        f"print(json.dumps(r.run_job(r.BY_ID[{cfg['id']!r}], {onednn!r}, 'time')))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["step_seconds"]


def trainer(cfg, onednn, steps, exe):
    """Seconds per steady-state step of Headroom's trainer (median of steps 2..)."""
    cmd = [exe, "probe", "--model", cfg["model"], "--device", "cpu", "--steps", str(steps), "--json",
           "--set", f"threads={ref.THREADS}", "--set", f"onednn={'true' if onednn else 'false'}",
           "--set", f"batch={cfg['batch']}", "--set", f"accum={cfg['accumulation']}",
           "--set", f"precision={cfg['precision']}"]
    for k, v in cfg["settings"]:
        cmd += ["--set", f"{k}={v}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    times = json.loads(out.stdout)["step_times_ms"][1:]
    return statistics.median(times) / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--id", default="resnet18-128-momentum")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--onednn", default="1")
    ap.add_argument("--exe", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "debug", "headroom"))
    args = ap.parse_args()
    cfg = ref.BY_ID[args.id]
    onednn = args.onednn == "1"
    e, h = [], []
    for r in range(args.rounds):
        e.append(eager(cfg, onednn, args.steps))
        h.append(trainer(cfg, onednn, args.steps, args.exe))
        print(f"round {r + 1}: PyTorch eager {e[-1] * 1e3:.0f} ms/step, Headroom trainer {h[-1] * 1e3:.0f} ms/step",
              file=sys.stderr)
    me, mh = statistics.median(e), statistics.median(h)
    print(json.dumps({"id": args.id, "onednn": onednn, "threads": ref.THREADS, "eager_ms": round(me * 1e3, 1),
                      "trainer_ms": round(mh * 1e3, 1), "trainer_over_eager": round(mh / me, 3),
                      "eager_all_ms": [round(x * 1e3) for x in e], "trainer_all_ms": [round(x * 1e3) for x in h]}))


if __name__ == "__main__":
    main()
