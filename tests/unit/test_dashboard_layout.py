"""The Grafana dashboard's layout (no holes) and its GPU panels (Ray's own node metrics)."""

from __future__ import annotations

from collections import defaultdict

import pytest

from raydapt.ops import dashboards


def test_rows_fill_the_width_without_overlap():
    model = dashboards.build()
    rows = defaultdict(list)
    for p in model["panels"]:
        rows[p["gridPos"]["y"]].append(p["gridPos"])
    for y, row in rows.items():
        row.sort(key=lambda g: g["x"])
        assert row[0]["x"] == 0 and sum(g["w"] for g in row) == 24, (y, row)
        assert all(a["x"] + a["w"] == b["x"] for a, b in zip(row, row[1:])), (y, row)


def test_gpu_panels_query_ray_node_metrics():
    model = dashboards.build()
    by_title = {p["title"]: p for p in model["panels"]}
    util = by_title["GPU utilisation"]["targets"][0]["expr"]
    mem = by_title["GPU memory used"]["targets"][0]["expr"]
    assert "ray_node_gpus_utilization" in util and "GpuIndex" in util
    assert "ray_node_gram_used" in mem and by_title["GPU memory used"]["fieldConfig"][
        "defaults"]["unit"] == "bytes"
    assert "node_gpus_utilization" not in dashboards.metrics_used()  # not a raydapt metric
    with pytest.raises(KeyError):
        dashboards.Target("node_made_up", "{s}", "", ray_node=True).expr()
