"""Shield variants: a protected image stored as a few shifted, zoomed (and mirrored) versions of itself, so that a
shield also holds what a copy of it usually is. Plain torch; never imports ComfyUI.

A shield's test is an RMS distance in the latent space. A copy that is shifted by a few pixels or cropped a little
lies far from its source there (on the demo's 16x16 digits a 2-pixel shift of 64 moves a digit as far as the
nearest other handwritten digit of its class), so no single radius catches such copies and leaves distinct images
alone. With variants, a shifted or cropped copy lies close to the variant that is shifted or zoomed the same way,
and only the residual counts; ``spell_core.calibration`` measures both.

Variant 0 of every image is the image itself; the others are whole-pixel shifts by -s, 0, +s of the side in each
axis (edges repeated into the gap), each at zoom 1 and at every centre zoom, each also mirrored when asked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Variants:
    """Which versions of each protected image the shield holds."""

    shift: float = 0.0  # shift step, share of the side (whole pixels, at least 1 when > 0); 0: no shifts
    zooms: tuple[float, ...] = ()  # centre zooms besides 1 (1.05: the centred window of 1/1.05 of the side, resized back)
    mirror: bool = False  # also every variant mirrored left to right

    def __post_init__(self):
        if not 0 <= self.shift < 0.5:
            raise ValueError(f"the shift step is a share of the side in 0..0.5, got {self.shift}")
        if any(not 1 < z <= 2 for z in self.zooms):
            raise ValueError(f"zooms enlarge the centre: each in (1, 2], got {list(self.zooms)}")

    @property
    def count(self) -> int:
        """Versions per image, the image itself included."""
        return (9 if self.shift else 1) * (1 + len(self.zooms)) * (2 if self.mirror else 1)

    def offsets(self, side: int) -> tuple[int, ...]:
        """Whole-pixel shifts for a side of that many pixels, 0 first."""
        if not self.shift:
            return (0,)
        step = max(1, round(self.shift * side))
        return (0, -step, step)


# The choices the nodes offer (SPELL Protected Set Loader's and SPELL Shield Calibration's ``variants``).
PRESETS = {
    "none": Variants(),
    "shifts": Variants(shift=0.03),
    "shifts + zoom": Variants(shift=0.03, zooms=(1.05,)),
    "shifts + zoom + mirror": Variants(shift=0.03, zooms=(1.05,), mirror=True),
}


def preset(name: str) -> Variants:
    if name not in PRESETS:
        raise ValueError(f"unknown variants {name!r}: choose one of {list(PRESETS)}")
    return PRESETS[name]


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """[..., H, W, C] moved down by dy and right by dx whole pixels, the edge rows and columns repeated into the
    gap."""
    h, w = x.shape[-3:-1]
    rows = torch.arange(h, device=x.device).sub(dy).clamp(0, h - 1)
    cols = torch.arange(w, device=x.device).sub(dx).clamp(0, w - 1)
    return x.index_select(-3, rows).index_select(-2, cols)


def zoomed(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """[N, H, W, C] -> the centred window of 1/zoom of each side, resized back to H x W (bilinear, antialiased)."""
    h, w = x.shape[1:3]
    ch, cw = max(1, round(h / zoom)), max(1, round(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    window = x[:, top:top + ch, left:left + cw].permute(0, 3, 1, 2)
    return F.interpolate(window, size=(h, w), mode="bilinear", align_corners=False, antialias=True).permute(0, 2, 3, 1)


def make(images: torch.Tensor, spec: Variants) -> torch.Tensor:
    """Pixel images [N, H, W, C] -> [N·count, H, W, C], image-major: rows i·count .. i·count + count - 1 are the
    versions of image i, row i·count the image itself."""
    x = images.float()
    if spec.count == 1:
        return x.clone()
    h, w = x.shape[1:3]
    out = []
    for scaled in [x] + [zoomed(x, z) for z in spec.zooms]:
        for dy in spec.offsets(h):
            for dx in spec.offsets(w):
                out.append(shifted(scaled, dy, dx))
    if spec.mirror:
        out += [v.flip(2) for v in out]
    return torch.stack(out, 1).clamp(0, 1).reshape((-1,) + tuple(x.shape[1:]))


def describe(name: str) -> str:
    """One line for summaries and reports."""
    spec = preset(name)
    if spec.count == 1:
        return "each image as it is"
    parts = [f"shifted by -{spec.shift:g}, 0, +{spec.shift:g} of the side"] if spec.shift else []
    parts += [f"zoomed x{', x'.join(f'{z:g}' for z in spec.zooms)}"] if spec.zooms else []
    parts += ["mirrored"] if spec.mirror else []
    return f"{spec.count} versions of each image ({'; '.join(parts)})"
