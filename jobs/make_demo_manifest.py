"""Write the demo manifest: 24 varied prompts, a few with their own seed or settings.

Usage: python jobs/make_demo_manifest.py [OUT.parquet]
"""

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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


def main(out: str = "jobs/data/demo.parquet") -> None:
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


if __name__ == "__main__":
    main(*sys.argv[1:])
