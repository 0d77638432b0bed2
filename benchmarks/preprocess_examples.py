"""A picture of what --preprocess does: three HAM10000 photographs (600x450), as they are, after hair
removal (DullRazor) and after colour constancy (Shades of Gray, p=6). Writes docs/preprocessing.png.

Run: python benchmarks/preprocess_examples.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from featcache.data.preprocessing import remove_hair, shades_of_gray  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HAM70 = REPO.parent / "shared" / "data" / "ham70"
CLASSES = ("akiec", "mel", "nv")  # the first photograph of each


def main() -> None:
    files = [sorted((HAM70 / label).glob("*.jpg"))[0] for label in CLASSES]
    fig, axes = plt.subplots(len(files), 3, figsize=(10, 2.6 * len(files)))
    for row, file in zip(axes, files, strict=True):
        rgb = np.asarray(Image.open(file).convert("RGB"))
        for ax, (title, image) in zip(row, (("original", rgb), ("hair removal", remove_hair(rgb)),
                                            ("colour constancy", shades_of_gray(rgb))), strict=True):
            ax.imshow(image)
            ax.set_title(f"{file.parent.name}/{file.name}: {title}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    out = REPO / "docs" / "preprocessing.png"
    fig.savefig(out, dpi=64)
    print(f"written {out}")


if __name__ == "__main__":
    main()
