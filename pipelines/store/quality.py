"""Label quality: per-group sums over the labelled views (agreement with the ground truth, entropy, top-k
mass), added seed by seed and reported as means.
"""

from __future__ import annotations

QualitySums = dict[str, dict[str, float]]  # group -> quantity -> sum over views (see labeling.quality_sums)


def add_quality(a: QualitySums, b: QualitySums) -> QualitySums:
    """The sums of two label-quality records."""
    return {g: {n: a.get(g, {}).get(n, 0.0) + b.get(g, {}).get(n, 0.0) for n in set(a.get(g, {})) | set(b.get(g, {}))}
            for g in set(a) | set(b)}


def quality_report(sums: QualitySums) -> dict[str, dict[str, float]]:
    """Label-quality sums (``pipelines.labeling.quality_sums``) -> per group (``all``, ``area<0.5``,
    ``area>=0.5``): ``views``, ``top1_agreement`` and ``true_in_topk`` (fractions of views), ``mean_entropy``
    (nats) and ``mean_topk_mass``."""
    out = {}
    for group, s in sorted(sums.items()):
        n = s.get("views", 0.0)
        out[group] = {"views": int(n)} | ({
            "top1_agreement": round(s["top1"] / n, 4), "true_in_topk": round(s["in_topk"] / n, 4),
            "mean_entropy": round(s["entropy"] / n, 4), "mean_topk_mass": round(s["topk_mass"] / n, 4),
        } if n else {})
    return out
