#!/usr/bin/env python3
"""Checks `headroom export` against the real libraries: every preset's Hugging Face
export must construct `transformers.TrainingArguments`, its Lightning export a
`lightning.Trainer`, and its DeepSpeed export may use only keys DeepSpeed's config
reads (from the DeepSpeed source given with --deepspeed-src, which needs no build).

    python scripts/check_exports.py --headroom target/debug/headroom [--deepspeed-src DIR]

Needs transformers, accelerate, lightning and pyyaml from PyPI.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import typing

import yaml


def export(headroom, plan, fmt):
    out = subprocess.run([headroom, "export", "--plan", plan, "--format", fmt], check=True, capture_output=True, text=True)
    return out.stdout


def deepspeed_keys(src):
    keys = set()
    for path in glob.glob(os.path.join(src, "deepspeed", "runtime", "**", "*.py"), recursive=True):
        with open(path) as f:
            keys.update(re.findall(r'^[A-Z0-9_]+ = "([a-z0-9_]+)"', f.read(), re.M))
    return keys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--headroom", required=True)
    ap.add_argument("--deepspeed-src")
    args = ap.parse_args()
    from transformers import TrainingArguments
    import lightning
    from lightning.fabric.connector import _PRECISION_INPUT_STR

    ds = deepspeed_keys(args.deepspeed_src) if args.deepspeed_src else None
    failures = 0
    for plan in sorted(glob.glob("examples/w*-*.yaml")):
        hf = json.loads(export(args.headroom, plan, "hf"))
        with tempfile.TemporaryDirectory() as tmp:
            hf["output_dir"] = tmp
            try:
                ta = TrainingArguments(**hf)
                assert ta.per_device_train_batch_size == hf["per_device_train_batch_size"]
            except Exception as e:  # noqa: BLE001 - report every preset
                print(f"{plan}: TrainingArguments refused the hf export: {e}")
                failures += 1
        trainer = yaml.safe_load(export(args.headroom, plan, "lightning"))["trainer"]
        try:
            precisions = typing.get_args(_PRECISION_INPUT_STR)
            assert trainer["precision"] in precisions, f"precision {trainer['precision']} not in {precisions}"
            # No GPU here: the precision is checked above; every other key must be one
            # Trainer takes.
            lightning.Trainer(**{**trainer, "accelerator": "cpu", "devices": 1, "precision": "32-true"},
                              logger=False, enable_checkpointing=False, enable_progress_bar=False)
        except Exception as e:  # noqa: BLE001
            print(f"{plan}: lightning.Trainer refused the lightning export: {e}")
            failures += 1
        if ds is not None:
            cfg = json.loads(export(args.headroom, plan, "deepspeed"))
            unknown = [k for k in cfg if k not in ds]
            unknown += [f"fp16.{k}" for k in cfg.get("fp16", {}) if k not in ds]
            if unknown:
                print(f"{plan}: keys DeepSpeed does not read: {unknown}")
                failures += 1
        print(f"{plan}: ok")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
