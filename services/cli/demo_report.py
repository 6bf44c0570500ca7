"""What ``stillroom demo`` reports: its job records read into figures (``summarize``), those figures as a
Markdown table (``table``) and as a picture of test top-1 against compute (``plot``, ``demo.png``).

Compute is counted in core-seconds on the machine that ran the demo: a job's seconds times the CPU cores it
held (a student one, the label workers theirs), so a label job on two cores is not made cheaper than two
students on one core each. The teacher's own training is left out: online and cached KD both need it.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from stillroom.pipelines.core import UsageError, write_atomically

# the student rows, in the table's order: (key in the summary, the row's words)
STUDENT_ROWS = (("supervised", "supervised (ce)"),
                ("online_kd", "online KD (teacher in the loop)"),
                ("cached_kd", "cached KD (from the store)"))
SHARED_BY = (1, 2, 4)  # students that share one labeling, in the picture


def top1_of(job: dict[str, Any]) -> float:
    """A finished train or teacher job's test top-1 (a fraction), or a one-line error naming the job."""
    result = job.get("result") or {}
    top1 = result.get("top1")
    if not isinstance(top1, int | float):
        raise UsageError(f"job {job.get('id')} ({job.get('kind')}) has no top-1 in its result: {sorted(result)}")
    return float(top1)


def student_figures(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """One kind of student over its seeds: each seed's top-1 (%), their mean and range, the mean epoch time and
    the training core-seconds of one student (its epochs' seconds; one core each)."""
    if not jobs:
        raise UsageError("no student jobs to summarize")
    top1 = [round(100 * top1_of(j), 2) for j in jobs]
    epochs = [s for j in jobs for s in j["result"].get("epoch_seconds") or []]
    cores = [float(((j.get("spec") or {}).get("resources") or {}).get("cpus", 1.0)) for j in jobs]
    train_s = [sum(j["result"].get("epoch_seconds") or []) * c for j, c in zip(jobs, cores, strict=True)]
    return {"seeds": [int((j.get("spec") or {}).get("seed", 0)) for j in jobs], "top1": top1,
            "mean": round(statistics.fmean(top1), 2), "low": min(top1), "high": max(top1),
            "epoch_s": round(statistics.fmean(epochs), 2) if epochs else None,
            "train_core_s": round(statistics.fmean(train_s), 1)}


def label_figures(job: dict[str, Any], images: int) -> dict[str, Any]:
    """The labeling paid once: its seconds, the cores its workers held, core-seconds and teacher forwards."""
    r = job.get("result") or {}
    if r.get("cache_hit") or "labeling_s" not in r:
        raise UsageError(f"label job {job.get('id')} computed nothing (a cache hit): pass the job that labeled")
    seeds = list(r.get("seeds_computed") or [])
    cores = int(r.get("cpus_per_worker", 1)) * int((job.get("spec") or {}).get("num_workers", 1))
    seconds = float(r["seconds"])
    return {"job": job.get("id"), "seeds": seeds, "seconds": round(seconds, 1), "cores": cores,
            "core_s": round(seconds * cores, 1), "teacher_forwards": int(r.get("samples", images * len(seeds)))}


def summarize(teacher: dict[str, Any], label: dict[str, Any], students: dict[str, list[dict[str, Any]]],
              images: int, epochs: int, second_run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo's figures from its job records (as ``GET /v1/jobs/{id}`` returns them): ``teacher`` the job that
    trained the teacher, ``label`` the one that labeled the store, ``students`` the finished train jobs of each
    row of ``STUDENT_ROWS``; ``second_run`` what resubmitting the teacher and label jobs cost."""
    missing = [key for key, _ in STUDENT_ROWS if not students.get(key)]
    if missing:
        raise UsageError(f"no finished student jobs for {', '.join(missing)}: the table needs every row")
    rows = {key: student_figures(students[key]) for key, _ in STUDENT_ROWS}
    cached, online = rows["cached_kd"], rows["online_kd"]
    out = {"images": images, "epochs": epochs,
           "teacher": {"model": (teacher.get("spec") or {}).get("model"), "top1": round(100 * top1_of(teacher), 2),
                       "epochs": (teacher.get("spec") or {}).get("epochs")},
           "labels": label_figures(label, images), "students": rows,
           "gain": round(cached["mean"] - rows["supervised"]["mean"], 2),
           "online_over_cached_epoch": (round(online["epoch_s"] / cached["epoch_s"], 2)
                                        if online["epoch_s"] and cached["epoch_s"] else None),
           "online_teacher_forwards": images * epochs}
    if second_run is not None:
        out["second_run"] = second_run
    return out


def _top1_cell(row: dict[str, Any]) -> str:
    if len(row["top1"]) == 1:
        return f"{row['mean']:.2f} (one seed)"
    return f"{row['mean']:.2f} [{row['low']:.2f}, {row['high']:.2f}]"


def table(summary: dict[str, Any]) -> str:
    """The demo's table in Markdown (what it prints and writes to ``demo.md``) and the lines under it."""
    t, lab, rows = summary["teacher"], summary["labels"], summary["students"]
    seeds = ", ".join(str(s) for s in rows["cached_kd"]["seeds"])
    lines = [f"| model ({summary['images']:,} Fashion-MNIST images) | test top-1 %, mean [min, max] over student "
             f"seeds {seeds} | s / epoch | core-s / student |",
             "| --- | --- | --- | --- |",
             f"| teacher `{t['model']}` ({t['epochs']} epochs) | {t['top1']:.2f} | | |"]
    for key, words in STUDENT_ROWS:
        row = rows[key]
        cost = f"{row['train_core_s']:.0f}"
        if key == "cached_kd":
            cost += f" + labels {lab['core_s']:.0f} / students"
        lines.append(f"| student, {words} | {_top1_cell(row)} | {row['epoch_s']:.1f} | {cost} |")
    ratio = summary["online_over_cached_epoch"]
    lines += ["",
              f"- distillation gains **{summary['gain']:+.2f} points** (cached KD minus supervised, means over "
              f"{len(rows['cached_kd']['top1'])} student seeds)",
              f"- an epoch of cached KD takes {rows['cached_kd']['epoch_s']:.1f} s, of online KD "
              f"{rows['online_kd']['epoch_s']:.1f} s on the same views"
              + (f" ({ratio:.2f}x)" if ratio else ""),
              f"- labeling, paid once: {lab['seconds']:.1f} s on {lab['cores']} core(s), "
              f"{lab['teacher_forwards']:,} teacher forwards ({len(lab['seeds'])} seeds); online KD pays "
              f"{summary['online_teacher_forwards']:,} forwards in every student run"]
    again = summary.get("second_run")
    if again:
        lines.append(f"- a second run: teacher {_hit(again['teacher'])}, labels {_hit(again['label'])}; "
                     "only the students train")
    return "\n".join(lines)


def _hit(job: dict[str, Any]) -> str:
    return (f"cache hit in {job['seconds']:.2f} s" if job.get("cache_hit")
            else f"recomputed ({job['seconds']:.1f} s)")


def compute_points(summary: dict[str, Any]) -> dict[str, list[tuple[float, float, float, float]]]:
    """The picture's points, ``(core-seconds per student, mean top-1, min, max)`` for each row; cached KD has one
    point per ``SHARED_BY`` count of students sharing the labeling (its core-seconds split among them)."""
    rows, label_s = summary["students"], summary["labels"]["core_s"]
    out = {}
    for key, _ in STUDENT_ROWS:
        row = rows[key]
        shares = [label_s / n for n in SHARED_BY] if key == "cached_kd" else [0.0]
        out[key] = [(row["train_core_s"] + share, row["mean"], row["low"], row["high"]) for share in shares]
    return out


def plot(summary: dict[str, Any], path: str | Path) -> dict[str, list[tuple[float, float, float, float]]]:
    """``demo.png``: test top-1 against core-seconds per student for each row (bars: min to max over the
    seeds); cached KD's labeling spread over 1, 2 and 4 students. Returns the points drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = compute_points(summary)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"supervised": ("tab:gray", "s"), "online_kd": ("tab:red", "^"), "cached_kd": ("tab:blue", "o")}
    for key, words in STUDENT_ROWS:
        colour, marker = styles[key]
        xs, ys = [p[0] for p in points[key]], [p[1] for p in points[key]]
        err = [[p[1] - p[2] for p in points[key]], [p[3] - p[1] for p in points[key]]]
        ax.errorbar(xs, ys, yerr=err, color=colour, marker=marker, capsize=3, linestyle="-" if len(xs) > 1 else "",
                    label=words)
        if key == "cached_kd":
            for n, x, y in zip(SHARED_BY, xs, ys, strict=True):
                ax.annotate(f"labels shared by {n}", (x, y), textcoords="offset points", xytext=(0, 9),
                            ha="center", fontsize=8, color=colour)
    t = summary["teacher"]
    ax.axhline(t["top1"], color="tab:green", linestyle=":", linewidth=1, label=f"teacher {t['model']}")
    ax.set(xlabel="compute per student: core-seconds on this machine (students' training + their share of labeling)",
           ylabel="test top-1 %",
           title=f"Fashion-MNIST, {summary['images']:,} images, {summary['epochs']} epochs: "
                 f"distillation {summary['gain']:+.2f} points")
    ax.xaxis.label.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.margins(x=0.12, y=0.1)
    fig.tight_layout()
    write_atomically(Path(path), lambda tmp: fig.savefig(tmp, dpi=90))
    plt.close(fig)
    return points
