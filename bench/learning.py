"""Does every family learn through its own pipeline? The full learning table (trainer/learning.py).

Every registered variant trains its tiny model on its learning case (Variant.learning), plus full fine-tuning and a
quantized base for a few families; each run is then sampled by the family's diffusers pipeline (`__call__`, the user's
loading path) and compared with its training targets, and repeated with the training target's sign flipped (the
negative control, which must fail). tests/test_learning.py runs the same cases (those with in_suite) as tests.

    python bench/learning.py [--only qwen-image,flux] [--negative all|bench|none] [--adapters no|also|only] [--out bench/results/learning.md]
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer.models.base import LearningCase  # noqa: E402

# Beside every variant's LoRA: full fine-tuning (Qwen-Image and a FLUX-type family) and a quantized base.
# run name -> (variant, case, training method, quantize)
EXTRA_RUNS = {
    "qwen-image, full fine-tuning": ("qwen-image", LearningCase(steps=300, learning_rate=1e-3), "full", "none"),
    "flux, full fine-tuning": ("flux", LearningCase(steps=300, learning_rate=2e-3), "full", "none"),
    "qwen-image, nf4 base": ("qwen-image", None, "lora", "nf4"),  # None: the variant's own case
    # Qwen-Image 2.1's own case is its edit case (references at 288 px); its text-to-image case, in the bench only
    "qwen-image-2.1, text-to-image": ("qwen-image-2.1", LearningCase(0, 300, 5e-3, in_suite=False), "lora", "none"),
}
# Adapter types (bench only; the suite checks their files and loading family by family):
# run name -> (variant, overrides, steps or None for the variant's own case). LoKr's Kronecker product gives the tiny
# FLUX model little capacity per step: it separates its captions only by ~800 steps (300: choice +0.05..+0.19);
# Z-Image's needs 600 (300: error x0.56).
ADAPTER_RUNS = {
    "qwen-image, LoKr": ("qwen-image", {"lora_type": "lokr", "lokr_factor": 4}, None),
    "qwen-image, LoHa": ("qwen-image", {"lora_type": "loha"}, None),
    "qwen-image, DoRA": ("qwen-image", {"use_dora": "true"}, None),
    "flux, LoKr (loaded by trainer.pipelines.load_lora)": ("flux", {"lora_type": "lokr", "lokr_factor": 4}, 800),
    "z-image, LoKr (loaded by diffusers' load_lora_weights)": ("z-image", {"lora_type": "lokr", "lokr_factor": 4}, 600),
}


def runs(only: list[str] | None = None) -> dict[str, tuple]:
    """run name -> (variant, case, method, quantize): every variant's LoRA case, then EXTRA_RUNS."""
    from trainer.models import variants

    table = {name: (name, v.learning, v.learning.method, "none") for name, (_cls, v) in sorted(variants().items())}
    for name, (variant, case, method, quantize) in EXTRA_RUNS.items():
        table[name] = (variant, case or variants()[variant][1].learning, method, quantize)
    return {k: v for k, v in table.items() if not only or v[0] in only}


def run_one(models: Path, work: Path, variant: str, case: LearningCase, method: str, quantize: str, wrong_sign: bool, **extra):
    from trainer import learning
    from utils.make_tiny_models import make_tiny_model

    return learning.run(make_tiny_model(variant, models / variant), work, case, method, quantize, wrong_sign, **extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--negative", choices=["all", "bench", "none"], default="all",
                   help="wrong-sign control runs: for every run, only for the runs the suite does not test, or none")
    p.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    p.add_argument("--adapters", choices=["no", "also", "only"], default="no",
                   help="the adapter-type runs (LoKr, LoHa, DoRA; bench only): not, beside the others, or alone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    from trainer.models import variants

    header = ("| run | case | steps | lr | in suite | train s | error: base -> trained | choice: base -> trained (min) "
              "| learns | wrong sign learns |")
    lines = [header, "| --- " * 10 + "|"]
    print(header, flush=True)
    print(lines[1], flush=True)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        only = [s for s in args.only.split(",") if s]
        table = [(name, run, {}) for name, run in runs(only).items()] if args.adapters != "only" else []
        if args.adapters != "no":
            for name, (variant, extra, steps) in ADAPTER_RUNS.items():
                case = variants()[variant][1].learning
                if not only or variant in only:
                    table.append((name, (variant, replace(case, steps=steps or case.steps), "lora", "none"), extra))
        for i, (name, (variant, case, method, quantize), extra) in enumerate(table):
            case = replace(case, in_suite=False) if extra else case
            report, seconds = run_one(tmp / "models", tmp / f"run{i}", variant, case, method, quantize, False, **extra)
            negative = "not run" if args.negative == "none" else "in the suite"
            if args.negative == "all" or (args.negative == "bench" and not case.in_suite):
                wrong, _ = run_one(tmp / "models", tmp / f"run{i}-wrong", variant, case, method, quantize, True, **extra)
                negative = "no (control fails, as it must)" if wrong.failures() else "**YES: the check cannot fail**"
                failed += not wrong.failures()
            kinds = {0: "text-to-image", 1: "edit (mirror)", 2: "2 refs (pick first)"}
            t, b = report.trained, report.base
            control = variants()[variant][1].control if variant in variants() else ""
            kind = ("inpaint (visible half)" if case.inpaint else "2 layers (caption orders)" if case.layered else "control (mirror)" if control
                    else kinds[case.references])
            line = (f"| {name} | {kind} | {case.steps} | {case.learning_rate:g} | {'yes' if case.in_suite else 'bench'} "
                    f"| {seconds:.1f} | {b.mean_error:.3f} -> {t.mean_error:.3f} (x{report.error_ratio:.2f}) "
                    f"| {b.mean_choice:+.2f} -> {t.mean_choice:+.2f} ({min(t.choice):+.2f}) "
                    f"| {'yes' if not report.failures() else 'NO: ' + '; '.join(report.failures())} | {negative} |")
            failed += bool(report.failures())
            lines.append(line)
            print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
