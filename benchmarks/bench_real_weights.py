"""Weights an actor holds at real model size, in fp16: what is left of a 24 GB GPU for one
actor with all four SDXL modes and the refiner?

    .venv/bin/python benchmarks/bench_real_weights.py [--quick]

(--quick is accepted for run_all.py: counting on the meta device is already quick.)

The real SD 1.5 and SDXL component configs (`_real.py`) are built on PyTorch's meta
device (no memory, nothing downloaded) and their parameters counted; bytes = parameters ×
2 (fp16). Per actor configuration, the modules it holds once each, as sdbatch shares
them (`models.load_pipeline`: txt2img/img2img are one set of modules; an inpaint
checkpoint adds its UNet, the VAE and text encoders being byte-identical; SDXL depth2img
adds the ControlNet; the refiner adds its UNet, sharing the VAE and text encoder 2).
Activations are not counted here: they depend on size and batch (SDXL at 1024², batch 1,
SDPA attention: a few GB), and a GPU run measures them (RESULTS.md, GPU section).
"""

from __future__ import annotations

import sys

import harness as h
from _real import parameter_counts

BENCH = "real_weights"
GIB = 1024**3

CONFIGS = {
    "sd15 txt2img": ["sd15 unet", "vae", "clip-l text encoder"],
    "sd15 txt2img + inpaint": ["sd15 unet", "sd15 inpaint unet", "vae", "clip-l text encoder"],
    "sdxl txt2img": ["sdxl unet", "vae", "clip-l text encoder", "openclip-bigG text encoder"],
    "sdxl txt2img + refiner": [
        "sdxl unet", "sdxl refiner unet", "vae", "clip-l text encoder",
        "openclip-bigG text encoder",
    ],
    "sdxl 4 modes + refiner": [
        "sdxl unet", "sdxl inpaint unet", "sdxl depth controlnet", "sdxl refiner unet", "vae",
        "clip-l text encoder", "openclip-bigG text encoder",
    ],
}  # fmt: skip


def main() -> int:
    args = h.parse(h.parser(__doc__, job=False, quick_help="the same (it is quick)"))
    config = {"dtype": "float16"}
    h.header(f"{BENCH}: parameters an actor holds, fp16", config)
    counts = parameter_counts()
    h.table(
        ["component", "parameters (M)", "fp16 GiB"],
        [[name, n / 1e6, 2 * n / GIB] for name, n in counts.items()],
    )
    rows, figures = [], {"components": counts}
    for label, parts in CONFIGS.items():
        gib = 2 * sum(counts[p] for p in parts) / GIB
        rows.append([label, gib, 24 * 1e9 / GIB - gib])
        figures[label] = gib
    h.table(["actor holds", "weights fp16 GiB", "left of a 24 GB GPU, GiB"], rows)
    print(
        "   + SDXL depth2img rows without depth_map: the DPT depth estimator, kept in fp32 "
        "(Intel/dpt-hybrid-midas, not counted here)."
    )
    headline = {f"{label} weights fp16 GiB": gib for label, gib in figures.items()
                if label != "components"}  # fmt: skip
    return h.finish(BENCH, args, config, figures, headline)


if __name__ == "__main__":
    sys.exit(main())
