"""infra/grafana's dashboard: valid JSON whose every query names a metric the jobs export, and every metric shown."""

from __future__ import annotations

import json
import re
from pathlib import Path

from stillroom.pipelines.core import COUNTER, HISTOGRAM
from stillroom.pipelines.labeling.ray_pool import LABEL_METRICS
from stillroom.student.train_ray import TRAIN_METRICS

DASHBOARD = Path(__file__).parents[1] / "infra" / "grafana" / "stillroom_dashboard.json"


def exported() -> set[str]:
    names = set()
    for prefix, defs in (("label", LABEL_METRICS), ("train", TRAIN_METRICS)):
        for name, d in defs.items():
            base = f"ray_stillroom_{prefix}_{name}"
            names |= ({f"{base}_total"} if d.kind == COUNTER else
                      {f"{base}_{s}" for s in ("sum", "count", "bucket")} if d.kind == HISTOGRAM else {base})
    return names


def test_the_dashboard_shows_every_metric_and_only_those():
    dash = json.loads(DASHBOARD.read_text())
    queried = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"ray_stillroom_\w+", t["expr"])}
    assert queried <= exported(), queried - exported()
    shown = {re.sub(r"_(total|sum|count|bucket)$", "", m) for m in queried}
    assert shown == {re.sub(r"_(total|sum|count|bucket)$", "", m) for m in exported()}
