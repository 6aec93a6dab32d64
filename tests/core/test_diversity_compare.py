"""benchmarks/diversity_decide.py: the count behind issue 12's curve target (the pack's best Vendi or recall at
each peer point's precision or higher)."""
from benchmarks.diversity_decide import compare, curve


def row(method, knob, precision, vendi, recall=0.5):
    stat = lambda v: {"value": v, "ci": [v, v]}  # noqa: E731
    return {"method": method, "knob": knob,
            "stats": {"mean": {"precision": stat(precision), "vendi": stat(vendi), "recall": stat(recall)}}}


RESULTS = [
    row("baseline", None, 0.96, 1.40),
    row("Interval guidance", 2.0, 0.97, 1.50),
    row("Interval guidance", 0.5, 0.95, 1.60),
    row("CADS", 0.25, 0.99, 1.30),
    row("Particle Guidance", 8.0, 0.80, 1.90),
    row("SPELL adaptive 1.1 + interval", 2.0, 0.97, 1.55),  # same precision, more Vendi: above interval 2.0
    row("SPELL adaptive 1.4 + CADS 0.25 + interval", 1.0, 0.951, 1.62),
    row("SPELL adaptive 1.3 + interval", 0.5, 0.90, 1.80),
    row("Some other pack", 1.0, 0.999, 9.0),  # neither the pack (no SPELL in it) nor a peer: ignored
]


def test_each_peer_point_against_the_best_pack_point_at_its_precision_or_higher():
    got = {peer: (best, who, above) for peer, _, _, best, who, above in compare(RESULTS, "vendi")}
    assert got == {
        "Interval guidance 2.0": (1.55, "SPELL adaptive 1.1 + interval 2.0", True),
        # 0.951 ≥ 0.95: the SPELL + CADS + interval point counts; the 0.90 one does not
        "Interval guidance 0.5": (1.62, "SPELL adaptive 1.4 + CADS 0.25 + interval 1.0", True),
        "CADS 0.25": (None, None, False),  # no pack point at precision ≥ 0.99
        # at ≥ 0.80 the best is 1.80 < 1.90
        "Particle Guidance 8.0": (1.80, "SPELL adaptive 1.3 + interval 0.5", False),
    }


def test_a_tie_within_rounding_is_not_above_and_the_report_counts_what_compare_found():
    res = [row("baseline", None, 0.96, 1.40), row("Interval guidance", 1.0, 0.97, 1.5000),
           row("SPELL adaptive 1.0 + interval", 1.0, 0.97, 1.5004)]
    assert [r[5] for r in compare(res, "vendi")] == [False]
    res[-1] = row("SPELL adaptive 1.0 + interval", 1.0, 0.97, 1.5006)
    assert [r[5] for r in compare(res, "vendi")] == [True]
    text = "\n".join(curve(RESULTS, 8))
    assert ("(Vendi, batch 8):** the pack (baseline, SPELL, SPELL with the pack's interval and CADS nodes) is above "
            "at 2 of 4") in text
    assert "(recall, batch 8)" in text
    assert curve([row("baseline", None, 0.96, 1.4)], 8) == []  # no peer in the file: no table
