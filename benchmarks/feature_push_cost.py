"""Cost of the feature-space in-batch push against the latent one: seconds per batch through ComfyUI's sampler.

    python -m benchmarks.feature_push_cost            # batch 8, 20 steps, 5 interleaved repeats (~1 min, 2 cores)
    python -m benchmarks.feature_push_cost --repeats 9

The same seed, prompt ("any digit"), sampler (euler / normal, CFG 4) and scale for three models: no SPELL, SPELL
adaptive (the push in model space) and SPELL features (the push in ``demo.feature_net``'s features, carried back
through its Jacobian). Repeats are interleaved, the order alternating, so a load change on the machine hits every
model alike; the ratio is of medians. Prints only, writes nothing.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.1, help="batch_radius_scale of both SPELL models")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from benchmarks.diversity_decide import build
    from benchmarks.spell_bench import Bench
    from tools import comfy_host

    bench = Bench(comfy_host.start(tempfile.mkdtemp(prefix="spell-feature-cost-")))
    models = {"no SPELL": bench.model, "SPELL adaptive (latent)": build(bench, dict(scale=args.scale)),
              "SPELL features": build(bench, dict(scale=args.scale, features=True))}
    for m in models.values():  # warm-up
        bench.sample(m, "any digit", 1, batch=args.batch)
    times = {k: [] for k in models}
    for i in range(args.repeats):
        order = list(models.items())
        for name, m in (order if i % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            bench.sample(m, "any digit", 500 + i, batch=args.batch)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:24s} median {med[k]:.3f} s per batch of {args.batch} (20 steps); runs "
              + ", ".join(f"{t:.3f}" for t in v))
    print(f"features / latent push: {med['SPELL features'] / med['SPELL adaptive (latent)']:.3f}; "
          f"features / no SPELL: {med['SPELL features'] / med['no SPELL']:.3f}; "
          f"latent / no SPELL: {med['SPELL adaptive (latent)'] / med['no SPELL']:.3f}")


if __name__ == "__main__":
    main()
