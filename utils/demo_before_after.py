"""Render the demo's before / after picture: the same prompts and seeds with the base model and with the LoRA.

    python utils/demo_before_after.py --model demo/base-qwen-image --lora demo/output --data demo/dataset \
        --out demo/before_after.png

Rows: the trigger-word prompt the LoRA was trained on (two seeds), then a base concept the LoRA's data does not
contain (utils/make_demo_dataset.py HELD_OUT), which should stay as the base draws it. The score printed at the end is the pixel distance (mean squared,
pixels in [0, 1]) of each render to the nearest training picture of its prompt: the trained concept should come much
closer with the LoRA, the untrained prompt should not move away. Both renders go through the pipeline's own
__call__ (`inference.py`'s loading path).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CELL = 192  # each 64 px render is shown 3x, nearest-neighbour


def distance(a, b) -> float:
    import numpy as np

    return float(np.mean((np.asarray(a, dtype=np.float32) / 255.0 - np.asarray(b, dtype=np.float32) / 255.0) ** 2))


def grid(rows: list[tuple[str, object, object]]):
    from PIL import Image, ImageDraw

    label_h, head_h, pad = 18, 20, 6
    width = 2 * CELL + 3 * pad
    img = Image.new("RGB", (width, head_h + len(rows) * (CELL + label_h + pad) + pad), "white")
    d = ImageDraw.Draw(img)
    d.text((pad + CELL // 2 - 25, 4), "base model", fill="black")
    d.text((2 * pad + CELL + CELL // 2 - 30, 4), "with the LoRA", fill="black")
    y = head_h
    for label, before, after in rows:
        d.text((pad, y), label, fill="black")
        y += label_h
        img.paste(before.resize((CELL, CELL), Image.NEAREST), (pad, y))
        img.paste(after.resize((CELL, CELL), Image.NEAREST), (2 * pad + CELL, y))
        y += CELL + pad
    return img


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the demo base model (utils/make_demo_base.py)")
    p.add_argument("--lora", required=True, help="the trained LoRA (file or output_dir)")
    p.add_argument("--data", required=True, help="the LoRA's training pictures (for the score)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    args = p.parse_args(argv)

    import torch
    from PIL import Image

    from trainer.pipelines import adapter_for, load_pipeline, output_images, resolve_lora
    from utils.make_demo_dataset import COLOURS, CONCEPT_CAPTION, HELD_OUT, TRIGGER, centred

    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    other_caption = HELD_OUT
    _a, colour, shape, *_ = HELD_OUT.split()
    prompts = [(CONCEPT_CAPTION, 0), (CONCEPT_CAPTION, 1), (other_caption, 0)]
    concept = [Image.open(f).convert("RGB") for f in sorted(Path(args.data).glob("*.png")) if f.name.startswith(TRIGGER)]
    references = {CONCEPT_CAPTION: concept,
                  other_caption: [centred(shape, COLOURS[colour], 64, s) for s in (0.25, 0.33)]}

    adapter = adapter_for(args.model)
    pipe = load_pipeline(adapter, torch.float32, "cpu")

    def render():
        return [output_images(pipe(prompt=prompt, width=64, height=64, num_inference_steps=args.steps, true_cfg_scale=1.0,
                                   generator=torch.Generator("cpu").manual_seed(seed)))[0] for prompt, seed in prompts]

    before = render()
    directory, weight_name = resolve_lora(args.lora)
    pipe.load_lora_weights(directory, weight_name=weight_name, adapter_name="demo")
    after = render()
    rows = [(f"'{prompt}', seed {seed}", b, a) for (prompt, seed), b, a in zip(prompts, before, after)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(rows).save(out)

    def score(images, k):
        return min(distance(images[k], r) for r in references[prompts[k][0]])

    trained = [(score(before, k), score(after, k)) for k in (0, 1)]
    b, a = sum(t[0] for t in trained) / 2, sum(t[1] for t in trained) / 2
    ob, oa = score(before, 2), score(after, 2)
    print(f"wrote {out}")
    print("score (mean squared pixel distance to the nearest training picture of the prompt; lower is closer):")
    print(f"  '{CONCEPT_CAPTION}' (trained): base {b:.4f} -> LoRA {a:.4f} ({b / max(a, 1e-9):.1f}x closer)")
    print(f"  '{other_caption}' (not in the LoRA's data): base {ob:.4f} -> LoRA {oa:.4f}; "
          f"the LoRA moved it by {distance(before[2], after[2]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
