"""
C{make run} (C{python -m mcpgw.demo.run}) with the default config, C{etc/mcpgw.yaml}: the banner's
examples include a call the policy denies and one it redacts, worked out from the config's policy,
and the printed commands do what they say against the real demo server and gateway.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mcpgw.demo.run import PolicyDemo, examples, read_plan, read_policy

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "etc" / "mcpgw.yaml"


def test_default_config_policy() -> None:
    """The default config denies whoami and redacts secrets in echo's arguments."""
    policy = read_policy(str(DEFAULT_CONFIG))
    assert policy is not None
    assert policy.denied == ("whoami", "no-whoami")
    assert policy.redacted == ("scrub-secrets", "an AWS access key", "AKIAIOSFODNN7EXAMPLE")
    assert policy.audit == str(ROOT / "run" / "audit.jsonl")


def test_banner_shows_denied_and_redacted_calls() -> None:
    """The banner has a whoami call answered 403 and an echo call with a secret to redact."""
    plan = read_plan(str(DEFAULT_CONFIG))
    banner = examples(plan, read_policy(str(DEFAULT_CONFIG)))
    assert "# 3. policy: whoami is denied (rule no-whoami): HTTP 403" in banner
    assert '"params":{"name":"whoami","arguments":{}}' in banner
    assert (
        "# 4. policy: an AWS access key in the arguments is redacted (rule scrub-secrets)" in banner
    )
    assert '"arguments":{"text":"deploy with AKIAIOSFODNN7EXAMPLE"}' in banner
    assert "tail -f " + str(ROOT / "run" / "audit.jsonl") in banner


def test_banner_follows_the_config(tmp_path: Path) -> None:
    """Another policy gets its own examples: a default deny, no redaction, or none at all."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "upstreams: [{name: d, url: 'http://127.0.0.1:9000/mcp'}]\n"
        "policy:\n"
        "  default_action: deny\n"
        "  rules: [{id: ok, action: allow, match: {list: [echo, add, countdown]}}]\n"
    )
    policy = read_policy(str(path))
    assert policy is not None and policy.denied == ("whoami", None) and policy.redacted is None
    banner = examples(read_plan(str(path)), policy)
    assert "whoami is denied (default_action: deny)" in banner
    assert "redacted" not in banner
    assert "# 3. policy" not in examples(read_plan(str(path)), PolicyDemo(None, None, None))
    path.write_text(
        "upstreams: [{name: d, url: 'http://127.0.0.1:9000/mcp'}]\npolicy: {rules: 1}\n"
    )
    assert read_policy(str(path)) is None


def _config_copy(workdir: Path, listen: int, upstream: int) -> Path:
    """etc/mcpgw.yaml with other ports and the audit in C{workdir}; its policy as it is."""
    config: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["listen"]["port"] = listen
    config["upstreams"][0]["url"] = f"http://127.0.0.1:{upstream}/mcp"
    config["audit"] = {
        "path": str(workdir / "audit.jsonl"),
        "state_dir": str(workdir / "state"),
        "fsync": "none",
    }
    path = workdir / "mcpgw.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_printed_examples_work(tmp_path: Path) -> None:
    """
    The commands the banner prints, run as they are with bash and curl: the session works, whoami
    is refused with 403 policy_denied, echo answers with the secret redacted; both are audited.
    """
    pytest.importorskip("mcp", reason="the demo extra (mcp) is not installed")
    from tests.sdkutil import free_port, spawn, wait_until

    listen, upstream = free_port(), free_port()
    config = _config_copy(tmp_path, listen, upstream)
    child = spawn(
        "run", [sys.executable, "-m", "mcpgw.demo.run", "--config", str(config)], tmp_path
    )
    try:
        assert wait_until(lambda: "Ctrl-C stops both" in child.stdout(), timeout=30), child.output()
        lines = child.stdout().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("# 1. initialize"))
        end = next(i for i, line in enumerate(lines) if line.startswith("# every request"))
        script = "\n".join(lines[start:end])
        out = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert "liftoff" in out
        assert '"message":"policy_denied"' in out and '"rule_id":"no-whoami"' in out
        assert "\n403\n" in out
        assert "deploy with [REDACTED]" in out
        assert "AKIAIOSFODNN7EXAMPLE" not in out

        def calledTools() -> dict[str, Any]:
            audit = [
                yaml.safe_load(line)
                for line in (tmp_path / "audit.jsonl").read_text().splitlines()
            ]
            return {a["tool"]: a for a in audit if a["method"] == "tools/call"}

        # A request's audit line is written as its exchange ends, which can be just after curl
        # has read the whole answer and exited.
        assert wait_until(lambda: {"whoami", "echo"} <= set(calledTools()), timeout=10)
        calls = calledTools()
        assert (calls["whoami"]["decision"], calls["whoami"]["rule_id"]) == ("deny", "no-whoami")
        assert (calls["echo"]["decision"], calls["echo"]["redacted"]) == ("redact", 1)
        child.proc.send_signal(signal.SIGINT)
        assert child.proc.wait(15) == 0, child.output()
    finally:
        child.stop()  # SIGTERM: the launcher stops the gateway and the demo server first
