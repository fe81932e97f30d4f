# SPDX-License-Identifier: Apache-2.0
"""deploy/grafana/kvbridge-dashboard.json queries only what kvbridge exports.

The exported names come from the code's own metric definitions - the
connector's ``build_prom_metrics`` and the proxy's registry - so renaming a
metric without the dashboard (or the reverse) fails here."""

from __future__ import annotations

import functools
import json
import re
import types
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

pytest.importorskip("vllm")

from kvbridge.serve.proxy.metrics import ProxyMetrics  # noqa: E402
from kvbridge.vllm.connector import KVBridgeConnector  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "kvbridge-dashboard.json"

#: the series names each metric type puts on /metrics
_SERIES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}

#: PromQL words that are not metric names
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}


def series_names(registry: CollectorRegistry) -> set[str]:
    return {family.name + suffix for family in registry.collect()
            for suffix in _SERIES[family.type]}


def connector_series() -> set[str]:
    registry = CollectorRegistry()
    metric_types = {cls: functools.partial(cls, registry=registry)
                    for cls in (Gauge, Counter, Histogram)}
    KVBridgeConnector.build_prom_metrics(types.SimpleNamespace(kv_transfer_config=None),
                                         metric_types, ["model_name", "engine"],
                                         {0: ["m", "0"]})
    return series_names(registry)


def proxy_series() -> set[str]:
    return series_names(ProxyMetrics().registry)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not
    functions (followed by "("), keywords, label names or label values."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)               # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)                          # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                         # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[m.end():].lstrip()
        if m.group() not in _KEYWORDS and not rest.startswith("("):
            names.add(m.group())
    return names


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            m = re.fullmatch(r"label_values\(\s*([^,\s]+)\s*,\s*\w+\s*\)", query["query"])
            assert m, f"variable {var['name']}: unexpected query {query['query']!r}"
            exprs.append(m.group(1))
    return exprs


def test_metric_names_reads_promql():
    assert metric_names('histogram_quantile(0.5, sum by (le) (rate(a:b_bucket{x="y(z)"}'
                        '[$__rate_interval]))) / on (engine) c_total > 0') == {"a:b_bucket",
                                                                             "c_total"}


def test_every_query_names_only_exported_metrics():
    exported = connector_series() | proxy_series()
    queries = dashboard_queries()
    assert queries
    for expr in queries:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} reads {sorted(names - exported)}, not exported"


def test_every_exported_metric_has_a_panel():
    shown = set().union(*(metric_names(e) for e in dashboard_queries()))
    families = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in shown}
    for name in connector_series() | proxy_series():
        assert re.sub(r"_(bucket|count|sum|total)$", "", name) in families, \
            f"{name} is exported but on no panel"
