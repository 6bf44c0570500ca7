"""Ray metrics of a label job (its Ray actors and driver) and a train job (a one-worker run connected to Ray),
read back from the node's real Prometheus endpoint, with their tags and values."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest

from stillroom.pipelines.core import JOB_ID_ENV
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.student.config import TrainConfig
from stillroom.student.run import train

pytestmark = pytest.mark.ray

DATA = "synthetic:n=64,classes=4,size=16"
SAMPLE = re.compile(r'^(\w+)\{(.*)\} (\S+)$')


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and m.group(1).startswith("ray_stillroom_"):
            tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out.append((m.group(1), tags, float(m.group(3))))
    return out


class Scraper(threading.Thread):
    """Reads the endpoint every half second and keeps the last value of each series seen: a gauge that its process
    stopped setting ages out of Ray's export after two report intervals, as a finished worker's should."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.seen, self.done = port, {}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            try:
                found = scrape(self.port)
            except OSError:  # the agent busy: the next look
                continue
            for name, tags, v in found:
                self.seen[(name, tuple(sorted(tags.items())))] = v

    def samples(self):
        return [(name, dict(tags), v) for (name, tags), v in list(self.seen.items())]


def wait_for(scraper: Scraper, wanted: dict[str, str], names: set[str], final: dict[str, float],
             timeout_s: float = 60.0):
    """The samples tagged ``wanted``, once every one of ``names`` is there and each counter of ``final`` has
    reached its value (Ray exports every few seconds: a count may arrive in parts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = [s for s in scraper.samples() if all(s[1].get(k) == v for k, v in wanted.items())]
        missing = names - {s[0] for s in samples}
        missing |= {f"{n} = {v:g}" for n, v in final.items() if value(samples, n) != v}
        if not missing:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"not exported within {timeout_s:g} s: {sorted(missing)}")
        time.sleep(1.0)


def value(samples, name: str, **tags: str) -> float:
    return sum(v for n, t, v in samples if n == name and all(t.get(k) == x for k, x in tags.items()))


def test_label_and_train_jobs_export_tagged_metrics(tmp_path, monkeypatch, ray_cluster, tiny_teacher):
    import ray

    node = ray.get_runtime_context().get_node_id()
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"] and n["NodeID"] == node)
    scraper = Scraper(port)
    scraper.start()
    monkeypatch.setenv(JOB_ID_ENV, "job_metrics_label")
    label = run_labeling(LabelConfig(dataset=DATA, teachers=(tiny_teacher,), seeds=(0, 1), top_k=3, chunk_rows=32,
                                     batch_size=32, num_workers=1, store_root=str(tmp_path / "stores")),
                         backend="ray", progress=False)
    key = label["cache_key"]
    label_names = {f"ray_stillroom_label_{n}" for n in ("views_labeled_total", "images_per_s", "bytes_written_total",
                                                      "seeds_committed_total", "decode_seconds_count",
                                                      "forward_seconds_sum", "write_seconds_count")}
    got = wait_for(scraper, {"job": "job_metrics_label", "store": key, "node": node}, label_names,
                   {"ray_stillroom_label_views_labeled_total": 64 * 2, "ray_stillroom_label_seeds_committed_total": 2,
                    "ray_stillroom_label_write_seconds_count": 2 * 2})
    assert value(got, "ray_stillroom_label_views_labeled_total") == 64 * 2  # samples x seeds
    assert value(got, "ray_stillroom_label_seeds_committed_total") == 2
    assert value(got, "ray_stillroom_label_write_seconds_count") == 2 * 2  # two pieces of each seed
    assert value(got, "ray_stillroom_label_decode_seconds_count") == value(
        got, "ray_stillroom_label_forward_seconds_count") == 2 * 2  # a batch a piece (32 ids x 2 seeds... /2 seeds)
    assert value(got, "ray_stillroom_label_images_per_s") > 0
    # top-k indices and logits, lse, tail, view parameters: at least k int + k float values a view
    assert value(got, "ray_stillroom_label_bytes_written_total") >= 128 * 3 * 2

    monkeypatch.setenv(JOB_ID_ENV, "job_metrics_train")
    result = train(TrainConfig(store=label["store"], dataset=DATA, student="test_resnet", loss="kd",
                               out=str(tmp_path / "run"), batch_size=16, max_steps=2, epochs=2, progress=False,
                               tracker="none", loader_workers=0))
    train_names = {f"ray_stillroom_train_{n}" for n in ("samples_total", "samples_per_s", "loss", "learning_rate",
                                                      "epoch", "eval_top1", "loader_wait_seconds_count")}
    got = wait_for(scraper, {"job": "job_metrics_train", "store": key, "node": node, "rank": "0"}, train_names,
                   {"ray_stillroom_train_samples_total": 2 * 2 * 16, "ray_stillroom_train_epoch": 1,
                    "ray_stillroom_train_loader_wait_seconds_count": 2 * 2})
    assert value(got, "ray_stillroom_train_samples_total") == 2 * 2 * 16  # epochs x steps x batch
    assert value(got, "ray_stillroom_train_epoch") == 1
    assert value(got, "ray_stillroom_train_loader_wait_seconds_count") == 2 * 2
    assert value(got, "ray_stillroom_train_eval_top1") == pytest.approx(result["top1"])
    assert value(got, "ray_stillroom_train_learning_rate") > 0
    terms = {t["term"] for n, t, _ in got if n == "ray_stillroom_train_loss"}
    assert "loss" in terms and len(terms) >= 2, terms
    scraper.done.set()
