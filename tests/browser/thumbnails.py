"""Template card thumbnails (example_workflows/<name>.jpg) from the images of a real run in the browser: the
saved outputs on top (4 per row), the first preview (a report chart) below; square, as the cards crop them."""
from __future__ import annotations

import io
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image

SIDE = 512


def fetch(server_url: str, image: dict) -> Image.Image:
    query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{server_url}/view?{query}", timeout=30) as r:
        return Image.open(io.BytesIO(r.read())).convert("RGB")


def write_thumbnail(server_url: str, images: list[dict], path: Path) -> Path:
    outputs = [fetch(server_url, i) for i in images if i.get("type") == "output"][:8]
    previews = [fetch(server_url, i) for i in images if i.get("type") == "temp"][:1]
    card = Image.new("RGB", (SIDE, SIDE), (255, 255, 255) if previews else (24, 24, 24))
    half = SIDE // 2 if previews else SIDE
    if outputs:
        cols = 4
        rows = -(-len(outputs) // cols)
        cell = min(SIDE // cols, half // rows)
        x0, y0 = (SIDE - cols * cell) // 2, (half - rows * cell) // 2
        for n, img in enumerate(outputs):
            tile = img.resize((cell, cell), Image.Resampling.NEAREST)
            card.paste(tile, (x0 + (n % cols) * cell, y0 + (n // cols) * cell))
    if previews:
        chart = previews[0]
        chart.thumbnail((SIDE, SIDE - half), Image.Resampling.LANCZOS)
        card.paste(chart, ((SIDE - chart.width) // 2, half + (SIDE - half - chart.height) // 2))
    card.save(path, "JPEG", quality=88, optimize=True)
    return path
