"""serve/metrics.py: the server's counters and histograms, written as Prometheus text."""

from __future__ import annotations

import pytest

from lorablend.serve.metrics import SWITCH_BUCKETS, Metrics


def test_counters_add_up_per_label_set():
    m = Metrics()
    m.count("lorablend_requests_total", route="/v1/images")
    m.count("lorablend_requests_total", route="/v1/images")
    m.count("lorablend_requests_total", route="/health")
    text = m.render()
    assert 'lorablend_requests_total{route="/v1/images"} 2' in text
    assert 'lorablend_requests_total{route="/health"} 1' in text


def test_a_histogram_counts_each_observation_in_every_bucket_above_it():
    m = Metrics()
    for v in (0.003, 0.003, 0.2):
        m.observe("lorablend_switch_seconds", v)
    text = m.render()
    assert 'lorablend_switch_seconds_bucket{le="0.005"} 2' in text
    assert 'lorablend_switch_seconds_bucket{le="0.25"} 3' in text
    assert 'lorablend_switch_seconds_bucket{le="+Inf"} 3' in text and "lorablend_switch_seconds_count 3" in text
    assert list(SWITCH_BUCKETS) == sorted(SWITCH_BUCKETS)


def test_gauges_are_read_when_rendered_and_every_metric_has_help():
    m, depth = Metrics(), [3]
    m.gauge("lorablend_queue_depth", lambda: depth[0])
    depth[0] = 5
    assert "lorablend_queue_depth 5" in m.render()
    assert m.render().startswith("# HELP")


def test_several_servers_texts_sum_into_one_valid_exposition():
    from lorablend.serve.metrics import merge_texts

    a, b = Metrics(), Metrics()
    for m, n in ((a, 2), (b, 3)):
        for _ in range(n):
            m.count("lorablend_requests_total", route="/v1/images", method="POST", code="200")
            m.observe("lorablend_generate_seconds", 0.3)
        m.gauge("lorablend_queue_depth", lambda n=n: n)
    b.count("lorablend_requests_total", route="/health", method="GET", code="200")  # a series only b has
    merged = merge_texts([a.render(), b.render()])
    lines = merged.splitlines()
    assert 'lorablend_requests_total{code="200",method="POST",route="/v1/images"} 5' in lines
    assert 'lorablend_requests_total{code="200",method="GET",route="/health"} 1' in lines
    assert "lorablend_generate_seconds_count 5" in lines and "lorablend_queue_depth 5" in lines
    assert lines.count("# TYPE lorablend_requests_total counter") == 1
    prometheus = pytest.importorskip("prometheus_client.parser")
    families = {f.name: f for f in prometheus.text_string_to_metric_families(merged)}
    assert sum(s.value for s in families["lorablend_requests"].samples) == 6
