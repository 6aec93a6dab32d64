"""Shield calibration: which radius r makes a SPELL shield catch near-copies of the protected images and leave
distinct images alone. Plain torch, numpy and Pillow; never imports ComfyUI.

A shield's r (SpellRepellency's ``radius``) is an RMS distance in the model's latent space (after the latent
format's ``process_latent_in``): "how close counts as a copy". It depends on the VAE, the size and the images,
so it is measured rather than guessed:

1. ``near_copies``: each protected image is altered the way a copy would be (crop and resize back, a small
   shift, a horizontal flip, JPEG re-compression, colour changes), deterministically from a seed;
2. every image is encoded to the model's space (the caller's ``encode``: VAE, then the latent format);
3. ``calibrate``: the RMS distance of each near-copy to its own source, and of each distinct image to its nearest
   protected image (by default the distinct images are the protected images themselves, each against the nearest
   *other* one); r is the smallest value (3 significant digits) that at least ``target`` of the near-copies lie
   strictly inside, and the report says what share of distinct images r would also catch.

When the shield holds variants of each protected image (``spell_core.variants``: shifted, zoomed, mirrored
versions, as SPELL Protected Set Loader's ``variants`` makes them), the distances are taken to the nearest variant:
a near-copy to the nearest version of its own source, a distinct image to the nearest version of any protected
image (by default, of any *other* one).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import charts, variants
from .repellency import flat32, nearest

KINDS = ("crop", "shift", "flip", "jpeg", "colour")


@dataclass(frozen=True)
class Strengths:
    """How strong each near-copy alteration is, drawn uniformly per copy from these ranges."""

    crop_area: tuple[float, float] = (0.85, 0.95)  # share of the image's area kept, then resized back
    shift: float = 0.04  # largest shift, share of the side (edges repeated into the gap)
    jpeg_quality: tuple[int, int] = (50, 80)  # Pillow's JPEG quality
    brightness: float = 0.10  # factor 1 +- this
    contrast: float = 0.10  # factor 1 +- this, around the image's mean grey
    saturation: float = 0.10  # factor 1 +- this (no effect on grey images)
    hue: float = 0.02  # rotation by up to this share of a full turn (no effect on grey images)


# ----------------------------------------------------------------------------------------- near-copies
def crop(x: torch.Tensor, rng: np.random.Generator, s: Strengths) -> torch.Tensor:
    """[H, W, C] -> a window of crop_area of the area (aspect kept, random place), resized back (bilinear)."""
    h, w = x.shape[:2]
    side = math.sqrt(rng.uniform(*s.crop_area))
    ch, cw = max(1, round(h * side)), max(1, round(w * side))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    window = x[top:top + ch, left:left + cw].permute(2, 0, 1)[None]
    return F.interpolate(window, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0].permute(1, 2, 0)


def shift(x: torch.Tensor, rng: np.random.Generator, s: Strengths) -> torch.Tensor:
    """[H, W, C] moved by a whole number of pixels (at least one, at most shift of the side, in each axis),
    the edge rows and columns repeated into the gap."""
    h, w = x.shape[:2]
    dy, dx = (int(rng.integers(1, max(1, round(s.shift * n)) + 1)) * int(rng.choice((-1, 1))) for n in (h, w))
    return variants.shifted(x, dy, dx)


def flip(x: torch.Tensor, rng: np.random.Generator, s: Strengths) -> torch.Tensor:
    """[H, W, C] mirrored left to right."""
    return x.flip(1)


def jpeg(x: torch.Tensor, rng: np.random.Generator, s: Strengths) -> torch.Tensor:
    """[H, W, C] saved as JPEG by Pillow at a quality in jpeg_quality and read back (1 or 3 channels as one
    picture, others channel by channel)."""
    quality = int(rng.integers(s.jpeg_quality[0], s.jpeg_quality[1] + 1))
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    planes = [pixels] if pixels.shape[2] in (1, 3) else [pixels[..., c:c + 1] for c in range(pixels.shape[2])]
    out = []
    for p in planes:
        buffer = io.BytesIO()
        Image.fromarray(p[..., 0] if p.shape[2] == 1 else p).save(buffer, "JPEG", quality=quality)
        back = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
        out.append(back.reshape(p.shape))
    return torch.from_numpy(np.concatenate(out, 2).astype(np.float32) / 255).to(x.dtype)


def colour(x: torch.Tensor, rng: np.random.Generator, s: Strengths) -> torch.Tensor:
    """[H, W, C] with brightness, contrast, saturation and hue changed (for 3 channels; fewer: brightness and
    contrast only), clipped to 0..1."""
    b, c, sat = (1 + rng.uniform(-a, a) for a in (s.brightness, s.contrast, s.saturation))
    turn = rng.uniform(-s.hue, s.hue)
    y = x * b
    y = (y - y.mean()) * c + y.mean()
    if x.shape[2] == 3:
        grey = y.mean(2, keepdim=True)
        y = grey + (y - grey) * sat
        y = rotate_hue(y, turn)
    return y.clamp(0, 1)


def rotate_hue(x: torch.Tensor, turn: float) -> torch.Tensor:
    """[H, W, 3] rotated about the grey axis by turn of a full circle (grey pixels stay as they are)."""
    a = 2 * math.pi * turn
    k = torch.full((3,), 1 / math.sqrt(3), dtype=x.dtype)
    cross = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=x.dtype)
    rot = math.cos(a) * torch.eye(3, dtype=x.dtype) + math.sin(a) * cross + (1 - math.cos(a)) * torch.outer(k, k)
    return x @ rot.T


ALTER = {"crop": crop, "shift": shift, "flip": flip, "jpeg": jpeg, "colour": colour}


def near_copies(images: torch.Tensor, copies: int, seed: int = 0, kinds=KINDS, strengths: Strengths = Strengths()):
    """Pixel images [N, H, W, C] in 0..1 -> (near-copies [N·copies, H, W, C], source index [N·copies] long,
    kind of each copy [N·copies] str). Copy j of image i is of kind kinds[j mod len(kinds)]; its random draw comes
    from (seed, i, j) alone, so a copy does not change when others are added."""
    unknown = [k for k in kinds if k not in ALTER]
    if unknown or not kinds:
        raise ValueError(f"near-copy kinds must be some of {KINDS}, got {list(kinds)}")
    x = images.detach().float().cpu()
    out, source, kind = [], [], []
    for i in range(x.shape[0]):
        for j in range(copies):
            k = kinds[j % len(kinds)]
            rng = np.random.default_rng([seed, i, j])
            out.append(ALTER[k](x[i], rng, strengths).clamp(0, 1))
            source.append(i)
            kind.append(k)
    empty = x.new_zeros((0,) + tuple(x.shape[1:]))
    return (torch.stack(out) if out else empty), torch.tensor(source, dtype=torch.long), kind


# ----------------------------------------------------------------------------------------- measurement
def covering_radius(d: torch.Tensor, target: float) -> float:
    """Smallest r with 3 significant digits such that a share ≥ target of d lies strictly below r."""
    need = max(1, math.ceil(target * d.numel() - 1e-9))
    q = float(d.sort().values[need - 1])
    if q <= 0:  # copies identical to their sources: any positive r covers them
        return float(torch.finfo(torch.float32).tiny)
    unit = 10 ** (math.floor(math.log10(q)) - 2)
    r = math.ceil(q / unit) * unit
    r = float(f"{r:.3g}")
    return r if r > q else float(f"{r + unit:.3g}")


def rms_pairs(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """RMS distance of row i of x [M, D] to row i of z [M, D] -> [M] (``rms_cdist``'s diagonal, without the
    M x M matrix)."""
    return torch.linalg.vector_norm(x - z, dim=1) / math.sqrt(x.shape[1])


def share_below(d: torch.Tensor, r: float) -> float:
    """Share of d strictly below r, compared in float64 (a float32 comparison would round r onto a distance)."""
    return float((d.double() < r).double().mean()) if d.numel() else float("nan")


def balanced_radius(copy_d: torch.Tensor, distinct_d: torch.Tensor) -> float:
    """r where the share of near-copies missed (d ≥ r) and the share of distinct images caught (d < r) are most
    nearly equal, the larger of the two as small as it can be (the equal error rate), to 3 significant digits."""
    near, far = copy_d.double().sort().values, distinct_d.double().sort().values
    candidates = torch.cat([near, far]).unique()
    miss = 1 - torch.searchsorted(near, candidates, side="left").double() / near.numel()  # share with d >= r
    caught = torch.searchsorted(far, candidates, side="left").double() / far.numel()  # share with d < r
    return float(f"{float(candidates[torch.argmin(torch.maximum(miss, caught))]):.3g}")


@dataclass
class ShieldCalibration:
    """What ``calibrate`` measured; ``text()`` is the report."""

    radius: float  # suggested r: the smallest (3 significant digits) with >= target of the near-copies inside
    target: float
    max_false_positive: float
    copy_distances: torch.Tensor  # [M] RMS distance of each near-copy to its own source
    copy_kinds: list[str]
    distinct_distances: torch.Tensor  # [K] RMS distance of each distinct image to its nearest protected image
    distinct_what: str  # "other protected images" or "supplied distinct images"
    n_protected: int
    per_image: int = 1  # versions of each protected image the shield holds (spell_core.variants)
    variants_what: str = ""  # how they were made, for the report
    balanced: float | None = None  # set when the two overlap (false positives above max_false_positive)
    notes: list[str] = field(default_factory=list)

    @property
    def coverage(self) -> float:
        return share_below(self.copy_distances, self.radius)

    @property
    def false_positive(self) -> float:
        return share_below(self.distinct_distances, self.radius)

    @property
    def overlap(self) -> bool:
        return self.false_positive > self.max_false_positive

    def per_kind(self) -> dict[str, dict]:
        """kind -> {"n", "coverage" (at the suggested r), "median", "needs" (r covering target of that kind)}."""
        out = {}
        for k in dict.fromkeys(self.copy_kinds):
            d = self.copy_distances[torch.tensor([c == k for c in self.copy_kinds])]
            out[k] = {"n": int(d.numel()), "coverage": share_below(d, self.radius), "median": float(d.median()),
                      "needs": covering_radius(d, self.target)}
        return out

    def text(self) -> str:
        c, d = self.copy_distances, self.distinct_distances
        lines = [
            f"suggested shield radius r = {self.radius:.3g} (RMS, the model's latent space)",
            f"shield: {self.n_protected} protected images, "
            + (f"{self.variants_what}: {self.n_protected * self.per_image} references; distances to the nearest "
               f"version" if self.per_image > 1 else "each as it is (variants: none)"),
            f"near-copies inside r: {100 * self.coverage:.1f}% of {c.numel()} (target >= {100 * self.target:g}%)",
            f"distinct images inside r: {100 * self.false_positive:.1f}% of {d.numel()} ({self.distinct_what}; "
            f"target <= {100 * self.max_false_positive:g}%)",
            f"near-copy distance to its source{' (its nearest version)' if self.per_image > 1 else ''}: median {quantile(c, 0.5):.3g}, 95% {quantile(c, 0.95):.3g}, "
            f"max {float(c.max()):.3g}",
            f"distinct distance to the nearest protected image: min {float(d.min()):.3g}, 5% {quantile(d, 0.05):.3g}, "
            f"median {quantile(d, 0.5):.3g}",
            "per kind (near-copies inside r; median distance; r that kind alone needs):",
        ]
        for k, v in self.per_kind().items():
            lines.append(f"  {k}: {100 * v['coverage']:.1f}% of {v['n']}; median {v['median']:.3g}; "
                         f"needs {v['needs']:.3g}")
        if self.overlap:
            miss = 1 - share_below(c, self.balanced)
            lines.append(
                f"OVERLAP: no radius holds {100 * self.target:g}% of the near-copies and at most "
                f"{100 * self.max_false_positive:g}% of the distinct images: the smallest that holds "
                f"{100 * self.target:g}% (r = {self.radius:.3g}) also holds {100 * self.false_positive:.1f}% of the "
                f"distinct images. Where the two errors balance, r = {self.balanced:.3g} misses {100 * miss:.1f}% of "
                f"the near-copies and catches {100 * share_below(d, self.balanced):.1f}% of the distinct images. "
                f"Choose which error costs more, or check whether the distinct images are near-duplicates of "
                f"protected ones." + (" Where shifts or crops need the largest r (per kind above), try variants "
                                      "'shifts + zoom' here and in SPELL Protected Set Loader: the shield then holds "
                                      "shifted and zoomed versions of each image." if self.per_image == 1 else ""))
        return "\n".join(lines + self.notes)

    def chart(self, title: str = "SPELL Shield Calibration") -> np.ndarray:
        """The two distance histograms with r (``charts.calibration_chart``), [H, W, 3] uint8."""
        subtitle = (f"{self.n_protected} protected images" + (f" x {self.per_image} versions" if self.per_image > 1
                                                               else "") + f", {self.copy_distances.numel()} near-copies "
                    f"({', '.join(dict.fromkeys(self.copy_kinds))}), {self.distinct_distances.numel()} "
                    f"{self.distinct_what}\ninside r = {self.radius:.3g}: near-copies {100 * self.coverage:.1f}%, "
                    f"distinct images {100 * self.false_positive:.1f}%")
        return charts.calibration_chart(self.copy_distances.tolist(), self.distinct_distances.tolist(), self.radius,
                                        self.balanced, title=title, subtitle=subtitle)


def quantile(d: torch.Tensor, q: float) -> float:
    return float(torch.quantile(d.double(), q))


def calibrate(protected: torch.Tensor, copies: torch.Tensor, source: torch.Tensor, kinds: list[str],
              distinct: torch.Tensor | None = None, target: float = 0.95,
              max_false_positive: float = 0.05, per_image: int = 1, variants_what: str = "") -> ShieldCalibration:
    """protected [N·per_image, ...] (image-major: rows i·per_image .. the versions of image i, the first one the image
    itself, as ``variants.make`` orders them), copies [M, ...] (copy m made from image source[m], of kind kinds[m]),
    distinct [K, ...] or None (then each protected image against the nearest version of any other one; needs
    N ≥ 2), all latents in the model's space -> the suggested radius and what it covers."""
    if protected.shape[1:] != copies.shape[1:] or (distinct is not None and distinct.shape[1:] != protected.shape[1:]):
        raise ValueError(f"latents of different shapes: protected {tuple(protected.shape[1:])}, near-copies "
                         f"{tuple(copies.shape[1:])}" + ("" if distinct is None else
                                                         f", distinct {tuple(distinct.shape[1:])}"))
    if copies.shape[0] == 0 or copies.shape[0] != source.numel() or len(kinds) != source.numel():
        raise ValueError(f"need one source index and kind per near-copy: {copies.shape[0]} copies, "
                         f"{source.numel()} sources, {len(kinds)} kinds")
    if distinct is not None and distinct.shape[0] == 0:
        raise ValueError("the distinct set is empty: give at least one image, or none (then the protected images)")
    if per_image < 1 or protected.shape[0] % per_image:
        raise ValueError(f"{protected.shape[0]} protected latents are not {per_image} versions per image")
    n = protected.shape[0] // per_image
    if int(source.max()) >= n or int(source.min()) < 0:
        raise ValueError(f"near-copy sources must index the {n} protected images, got {int(source.min())}..{int(source.max())}")
    source = source.to(protected.device)
    if per_image == 1:
        copy_d = rms_pairs(flat32(copies), flat32(protected)[source])
    else:  # each near-copy against the nearest version of its own source
        versions = flat32(protected).reshape(n, per_image, -1)
        copy_d = torch.empty(copies.shape[0], dtype=torch.float32, device=protected.device)
        flat = flat32(copies)
        for i in source.unique().tolist():
            rows = (source == i).nonzero()[:, 0]
            copy_d[rows] = nearest(flat[rows], versions[i])
    if distinct is None:
        if n < 2:
            raise ValueError("the distinct images default to the other protected images: give at least 2")
        owner = torch.arange(n, device=protected.device).repeat_interleave(per_image)
        others = owner[None, :] != torch.arange(n, device=protected.device)[:, None]
        distinct_d = nearest(protected[::per_image], protected, others)
        what = "other protected images"
    else:
        distinct_d = nearest(distinct, protected)
        what = "supplied distinct images"
    copy_d, distinct_d = copy_d.float().cpu(), distinct_d.float().cpu()
    result = ShieldCalibration(covering_radius(copy_d, target), target, max_false_positive, copy_d, list(kinds),
                               distinct_d, what, n, per_image, variants_what)
    if result.overlap:
        result.balanced = balanced_radius(copy_d, distinct_d)
    return result


def calibrate_images(images: torch.Tensor, encode, copies: int, seed: int = 0, kinds=KINDS,
                     distinct_images: torch.Tensor | None = None, batch: int = 16,
                     strengths: Strengths = Strengths(), variants_name: str = "none") -> ShieldCalibration:
    """The whole calibration from pixel images [N, H, W, C] in 0..1: near-copies made, the shield's versions of
    each image made (``variants.PRESETS[variants_name]``, as SPELL Protected Set Loader makes them), everything
    encoded with ``encode`` (pixels [B, H, W, C] -> latents in the model's space), ``batch`` images per call, then
    measured."""
    spec = variants.preset(variants_name)
    pixels, source, kind = near_copies(images, copies, seed, kinds, strengths)

    def encoded(x):
        return torch.cat([encode(x[a:a + batch]).detach().float().cpu() for a in range(0, x.shape[0], batch)])

    protected = encoded(variants.make(images.detach().float().cpu(), spec))
    distinct = None if distinct_images is None else encoded(distinct_images.detach().float().cpu())
    return calibrate(protected, encoded(pixels), source, kind, distinct, per_image=spec.count,
                     variants_what=variants.describe(variants_name))
