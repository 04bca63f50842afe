"""serve/metrics.py: the server's counters and histograms, written as Prometheus text."""

from __future__ import annotations

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
