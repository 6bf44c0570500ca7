"""Image data made in the tests: an ImageNet-layout folder of variable-size JPEGs and the same as Parquet shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

CLASSES = ("ant", "bee", "cat", "dog")


def _image(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    """A learnable picture: the class sets the colour and the stripe direction, plus noise."""
    colour = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)][label], dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = np.sin((xx if label % 2 else yy) / 3.0)[..., None]
    pixels = colour * (0.6 + 0.4 * stripes) + rng.normal(0, 12, (h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_image_folder(root: Path, train: int = 200, val: int = 20, seed: int = 0) -> Path:
    """``root/train/<class>/*.JPEG`` (``train`` images) and ``root/val/<class>/*.JPEG``, sizes 20-72 px, plus
    ImageNet's odd files in train: a grayscale JPEG, a CMYK JPEG, PNG bytes named .JPEG, and one 320x480 JPEG
    (large enough for DCT-scaled decoding)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            label = i % len(CLASSES)
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(20, 73, size=2))
            img = Image.fromarray(_image(rng, label, h, w))
            path = folder / f"{split}_{i:04d}.JPEG"
            odd = i if split == "train" else -1
            if odd == 0:
                img.convert("L").save(path, format="JPEG", quality=90)
            elif odd == 1:
                img.convert("CMYK").save(path, format="JPEG", quality=90)
            elif odd == 2:
                img.save(path, format="PNG")
            elif odd == 3:
                Image.fromarray(_image(rng, label, 320, 480)).save(path, format="JPEG", quality=90)
            else:
                img.save(path, format="JPEG", quality=int(rng.integers(70, 95)))
    return root


def write_parquet(root: Path, image_root: Path, rows_per_group: int = 25) -> Path:
    """The image folder's files as Hugging Face-style shards: ``root/train/*.parquet`` (two shards) and
    ``root/val/*.parquet``, with the class names in the schema's ``huggingface`` metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": list(CLASSES), "_type": "ClassLabel"}}}}
    for split in ("train", "val"):
        files = [(p, c) for c, name in enumerate(CLASSES) for p in sorted((image_root / split / name).iterdir())]
        (root / split).mkdir(parents=True, exist_ok=True)
        half = (len(files) + 1) // 2
        for shard, part in enumerate((files[:half], files[half:])):
            images = [{"bytes": p.read_bytes(), "path": p.name} for p, _ in part]
            table = pa.table({"image": images, "label": pa.array([c for _, c in part], pa.int64())})
            table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
            pq.write_table(table, root / split / f"{split}-{shard:05d}-of-00002.parquet", row_group_size=rows_per_group)
    return root


def jpeg_bytes(h: int, w: int, seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_image(np.random.default_rng(seed), 0, h, w)).save(buf, format="JPEG")
    return buf.getvalue()


def scramble(path: Path, seed: int = 0) -> None:
    """Keep the JPEG's header (up to its scan) and its end marker; replace the compressed data with noise: the
    index takes it (its header reads), decoding it fails."""
    b = bytearray(path.read_bytes())
    sos = b.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(b[sos + 2:sos + 4], "big")
    b[start:-2] = np.random.default_rng(seed).integers(0, 256, len(b) - 2 - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(b))
