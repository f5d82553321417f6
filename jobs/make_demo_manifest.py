"""Write the demo manifests.

python jobs/make_demo_manifest.py [OUT.parquet]          # 24 txt2img prompts (make demo)
python jobs/make_demo_manifest.py --modes OUT.parquet    # all four modes, with input images
"""

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SUBJECTS = [
    "a red fox",
    "a lighthouse",
    "a bowl of ramen",
    "an old tram",
    "a snowy pine forest",
    "a paper crane",
    "a desert canyon",
    "a koi pond",
]
STYLES = ["watercolor", "35mm photo, golden hour", "isometric pixel art"]


def txt2img(out: str) -> None:
    rows = []
    for i, (subject, style) in enumerate((s, t) for s in SUBJECTS for t in STYLES):
        rows.append(
            {
                "id": f"demo-{i:03d}",
                "prompt": f"{subject}, {style}",
                # Every fifth row pins its own seed, as a user rerunning a favourite would.
                "seed": 1000 + i if i % 5 == 0 else None,
                "negative_prompt": "blurry, low quality" if i % 3 == 0 else None,
            }
        )
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("id", pa.string()),
                ("prompt", pa.string()),
                ("seed", pa.int64()),
                ("negative_prompt", pa.string()),
            ]
        ),
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    print(f"wrote {len(rows)} rows to {out}")


def modes(out: str) -> None:
    """Four modes side by side; input images next to the manifest (URIs are relative)."""
    folder = Path(out).parent / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)).save(
        folder / "init.png"
    )
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    rows = []
    for i, subject in enumerate(SUBJECTS):
        rows.append({"id": f"t{i}", "prompt": subject, "mode": "txt2img"})
        rows.append(
            {
                "id": f"i{i}",
                "prompt": f"{subject}, oil painting",
                "mode": "img2img",
                "init_image": "inputs/init.png",
                "strength": 0.6,
            }
        )
        rows.append(
            {
                "id": f"p{i}",
                "prompt": f"{subject} in the middle",
                "mode": "inpaint",
                "init_image": "inputs/init.png",
                "mask_image": "inputs/mask.png",
                "strength": 0.9,
            }
        )
        rows.append(
            {
                "id": f"d{i}",
                "prompt": f"{subject}, same layout",
                "mode": "depth2img",
                "init_image": "inputs/init.png",
                "strength": 0.7,
            }
        )
    columns = ["id", "prompt", "mode", "init_image", "mask_image", "strength"]
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), out)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--modes":
        modes(args[1] if len(args) > 1 else "jobs/data/modes.parquet")
    else:
        txt2img(*args)
