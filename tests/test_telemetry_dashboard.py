"""
etc/datadog-dashboard.json stays in step with the spans mcpgw sends: valid JSON in Datadog's
dashboard shape, every facet one mcpgw sets, every trace metric named after its operation name.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mcpgw import otlp, telemetry

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "etc", "datadog-dashboard.json")
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "datadog.md")


def widgets(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every widget definition, groups flattened."""
    out = []
    for w in items:
        d = w["definition"]
        out.append(d)
        if d["type"] == "group":
            out += widgets(d["widgets"])
    return out


def emittedAttributes() -> set[str]:
    """The span attribute keys mcpgw can set."""
    return {v.key for v in vars(telemetry).values() if isinstance(v, otlp.AttributeKey)} | {
        "network.protocol.name",
        "network.transport",
    }


class DashboardTests(SynchronousTestCase):
    """The shipped dashboard."""

    def setUp(self) -> None:
        with open(DASHBOARD) as f:
            self.dashboard = json.load(f)
        self.defs = widgets(self.dashboard["widgets"])
        self.queries = [
            q for d in self.defs for r in d.get("requests", []) for q in r.get("queries", [])
        ]

    def test_shape(self) -> None:
        """A dashboard with a title, an ordered layout, the two template variables and widgets."""
        self.assertTrue(self.dashboard["title"])
        self.assertEqual(self.dashboard["layout_type"], "ordered")
        self.assertEqual(
            [v["name"] for v in self.dashboard["template_variables"]], ["service", "env"]
        )
        kinds = {d["type"] for d in self.defs}
        self.assertLessEqual(
            kinds, {"group", "timeseries", "toplist", "query_value", "query_table"}
        )
        for d in self.defs:
            if d["type"] == "group":
                continue
            for r in d["requests"]:
                names = {q["name"] for q in r["queries"]}
                for f in r["formulas"]:
                    self.assertLessEqual(
                        set(re.findall(r"[a-z_0-9]+", f["formula"])) - {"100"}, names
                    )

    def test_facetsAreEmitted(self) -> None:
        """Every @attribute the dashboard groups or filters by is one mcpgw sets on its spans."""
        used = set()
        for q in self.queries:
            if q["data_source"] == "spans":
                used |= {g["facet"] for g in q.get("group_by", [])}
                used |= set(re.findall(r"@[\w.]+", q["search"]["query"]))
                metric = q["compute"].get("metric")
                if metric:
                    used.add(metric)
        names = {u.lstrip("@") for u in used} - {"duration"}
        self.assertTrue(names)
        self.assertLessEqual(names, emittedAttributes())

    def test_traceMetricsNamedAfterTheOperation(self) -> None:
        """Trace metrics are trace.<operation.name>.*, and span queries pick that operation."""
        for q in self.queries:
            if q["data_source"] == "metrics":
                self.assertIn(f"trace.{telemetry.OPERATION_NAME}", q["query"])
                self.assertIn("{$service,$env", q["query"])
            else:
                self.assertIn(f"operation_name:{telemetry.OPERATION_NAME}", q["search"]["query"])
                self.assertEqual(q["indexes"], ["trace-search"])

    def test_docListsEveryAttribute(self) -> None:
        """docs/datadog.md documents every attribute mcpgw sets."""
        with open(DOC) as f:
            doc = f.read()
        for key in sorted(emittedAttributes()):
            self.assertIn(f"`{key}`", doc)
