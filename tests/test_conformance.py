"""
The official MCP conformance suite (npm C{@modelcontextprotocol/conformance}) against the
reference server (L{tests.conformance_server}, on the official Python SDK) directly, and through
the gateway (C{python -m mcpgw run}, the default-ish config of
L{tests.sdkutil.write_gateway_config}) in front of a second instance of it.

Three runs of the suite, each against both targets (see L{tests.conformancesupport.SUITES}):
0.1.16's C{active} suite (2025-11-25), and 0.2.0-alpha.12's frozen requirement sets for
2026-07-28 and 2025-11-25. For each:

  - every scored scenario passes directly (the reference server is conformant);
  - through mcpgw, every scenario (scored or not) has the same checks with the same statuses as
    directly: the gateway is transparent to everything the suite can observe.

The suite is installed by C{make conformance-deps} (a prerequisite of C{make test}); without it
these tests are skipped (and fail under CI). docs/conformance.md has the details. The whole file
takes about half a minute.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("mcp", reason="the demo extra (mcp) is not installed")

from tests.conformancesupport import (
    SUITES,
    Run,
    Suite,
    cli_version,
    missing_install,
    run_suite,
    scenario_diff,
)
from tests.sdkutil import HOST, Child, spawn, spawn_gateway, wait_gateway

READY = re.compile(r"conformance MCP server listening on (http://127\.0\.0\.1:\d+/mcp)")
SUITE_IDS = [s.id for s in SUITES]

_missing = missing_install()
if _missing is not None:
    if os.environ.get("CI"):
        pytest.fail(f"conformance suite not installed: {_missing}", pytrace=False)
    pytest.skip(f"conformance suite not installed: {_missing}", allow_module_level=True)


def spawn_reference(workdir: Path, name: str, deadline: float = 30.0) -> tuple[Child, str]:
    """Start the reference server on a free port; its child and its URL once it is ready."""
    child = spawn(
        name,
        [sys.executable, "-m", "tests.conformance_server", "--host", HOST, "--port", "0"],
        workdir,
    )
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        m = READY.search(child.stdout())
        if m:
            return child, m.group(1)
        if child.proc.poll() is not None:
            break
        time.sleep(0.05)
    child.stop()
    raise RuntimeError(f"reference server {name} did not become ready\n{child.output()}")


@dataclass
class Targets:
    """The URLs the suite runs against, and the runs done so far (each is done once)."""

    workdir: Path
    urls: dict[str, str]
    children: list[Child]
    runs: dict[tuple[str, str], Run] = field(default_factory=dict)

    def run(self, suite: Suite, target: str) -> Run:
        key = (suite.id, target)
        if key not in self.runs:
            self.runs[key] = run_suite(suite, target, self.urls[target], self.workdir)
        return self.runs[key]

    def logs(self) -> str:
        return "\n".join(child.output(2000) for child in self.children)


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Targets]:
    """A reference server for direct runs, and another behind a gateway: no shared state."""
    workdir = tmp_path_factory.mktemp("conformance")
    children: list[Child] = []
    try:
        direct, direct_url = spawn_reference(workdir, "reference-direct")
        children.append(direct)
        upstream, upstream_url = spawn_reference(workdir, "reference-upstream")
        children.append(upstream)
        gateway = spawn_gateway(workdir / "gateway", upstream_url)
        children.append(gateway.child)
        wait_gateway(gateway)
        yield Targets(workdir, {"direct": direct_url, "mcpgw": gateway.url}, children)
    finally:
        for child in reversed(children):
            child.stop()


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
def test_pinned_version(suite: Suite) -> None:
    """The installed CLI is the pinned one (tests/conformance/package-lock.json)."""
    assert cli_version(suite) == suite.version


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
def test_scored_scenarios_pass_directly(targets: Targets, suite: Suite) -> None:
    run = targets.run(suite, "direct")
    assert run.ran, f"the CLI ran no scenario: {run.describe()}\n{run.tail()}"
    scored = suite.scored(run.ran)
    assert scored, f"no scored scenario for {suite.id}"
    problems: list[str] = []
    for name in scored:
        scenario = run.scenarios.get(name)
        if scenario is None:
            problems.append(f"{name}: no result (not run, or the run failed)")
        elif not scenario.passed:
            failed = "; ".join(f"{c.id}: {c.message[:300]}" for c in scenario.failures())
            problems.append(f"{name}: {failed}")
    assert not problems, (
        f"{len(problems)} of {len(scored)} scored scenarios failed directly "
        f"({run.describe()}):\n" + "\n".join(problems) + f"\n{targets.logs()}"
    )


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
def test_mcpgw_results_equal_direct(targets: Targets, suite: Suite) -> None:
    direct = targets.run(suite, "direct")
    mcpgw = targets.run(suite, "mcpgw")
    assert mcpgw.ran, f"the CLI ran no scenario: {mcpgw.describe()}\n{mcpgw.tail()}"
    assert sorted(mcpgw.ran) == sorted(direct.ran)
    diffs = [
        d
        for name in direct.ran
        if (d := scenario_diff(name, direct.scenarios.get(name), mcpgw.scenarios.get(name)))
    ]
    assert not diffs, (
        f"{len(diffs)} of {len(direct.ran)} scenarios differ through mcpgw "
        f"(direct: {direct.describe()}; mcpgw: {mcpgw.describe()}):\n"
        + "\n".join(diffs)
        + f"\n{targets.logs()}"
    )
