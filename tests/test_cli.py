"""
The commands as users run them, in real processes: C{mcpgw --version}, C{mcpgw config check},
C{mcpgw run} and C{twistd -n mcpgw} (start, serve, SIGHUP, SIGTERM).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from twisted.trial.unittest import TestCase

import mcpgw
from tests.support import freePort

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def mcpgwCommand(*args: str) -> list[str]:
    return [sys.executable, "-m", "mcpgw", *args]


#: Runs C{mcpgw ARGS...} or C{twistd ARGS...} (argv: MODULES COMMAND ARGS...) with the
#: comma-separated MODULES not installed, as far as the process can tell: C{import} fails and
#: C{importlib.util.find_spec} finds nothing. Nothing else differs from the real commands.
_WITHOUT_MODULES = """\
import sys
modules, command, *args = sys.argv[1:]
for name in modules.split(","):
    sys.modules[name] = None
sys.argv = [command, *args]
if command == "twistd":
    from twisted.scripts.twistd import run
    run()
else:
    from mcpgw.cli import main
    sys.exit(main(args))
"""


def withoutModules(modules: str, command: list[str]) -> list[str]:
    """
    C{command} (from L{mcpgw command<mcpgwCommand>} or the twistd path) run with the
    comma-separated C{modules} missing.
    """
    name = "twistd" if command[0] == TWISTD else "mcpgw"
    args = command[1:] if name == "twistd" else command[3:]
    return [sys.executable, "-c", _WITHOUT_MODULES, modules, name, *args]


def post(port: int, body: bytes) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/mcp",
        data=body,
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class CommandTests(TestCase):
    """One-shot commands."""

    def test_version(self) -> None:
        """C{mcpgw --version} prints the package version."""
        out = subprocess.run(mcpgwCommand("--version"), capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.strip(), f"mcpgw {mcpgw.__version__}")

    def test_configCheckValid(self) -> None:
        """The shipped example configs are valid."""
        for name in ("mcpgw.yaml", "mcpgw.example.yaml"):
            path = os.path.join(ROOT, "etc", name)
            out = subprocess.run(
                mcpgwCommand("config", "check", path), capture_output=True, text=True
            )
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertIn("OK", out.stdout)

    def test_configCheckReportsEveryProblemWithLines(self) -> None:
        """Every problem is printed as C{path.in.yaml: what is wrong (line N)}; exit 1."""
        d = tempfile.mkdtemp()
        path = os.path.join(d, "bad.yaml")
        with open(path, "w") as f:
            f.write(
                "listen:\n"
                "  port: 70000\n"
                "upstreams:\n"
                "  - name: a\n"
                "    url: ftp://x/mcp\n"
                "policy:\n"
                "  rules:\n"
                "    - {id: r, action: deny, match: {regex: '('}}\n"
                "tls: {cert_file: missing.crt, key_file: missing.key}\n"
            )
        out = subprocess.run(mcpgwCommand("config", "check", path), capture_output=True, text=True)
        self.assertEqual(out.returncode, 1)
        lines = out.stderr.splitlines()
        self.assertTrue(any("listen.port:" in x and "(line 2)" in x for x in lines), lines)
        self.assertTrue(any("upstreams[0].url:" in x and "(line 5)" in x for x in lines), lines)
        self.assertTrue(
            any("policy.rules[0].match.regex:" in x and "(line 8)" in x for x in lines), lines
        )
        self.assertTrue(any("tls.cert_file:" in x and "missing.crt" in x for x in lines), lines)
        self.assertTrue(any("tls.key_file:" in x for x in lines), lines)


class RunningTests(TestCase):
    """The long-running commands start, serve, reload and stop cleanly."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="mcpgw-cli-")
        self.port = freePort()
        self.auditPath = os.path.join(self.tmp, "audit.jsonl")
        self.config = os.path.join(self.tmp, "mcpgw.yaml")
        with open(self.config, "w") as f:
            f.write(
                f"listen: {{host: 127.0.0.1, port: {self.port}}}\n"
                "upstreams:\n"
                f"  - {{name: gone, url: 'http://127.0.0.1:{freePort()}/mcp'}}\n"
                "audit: {path: audit.jsonl, fsync: always}\n"
            )

    def start(self, argv: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def stop() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

        self.addCleanup(stop)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.fail(
                    f"exited early ({proc.returncode}): {proc.stdout.read() if proc.stdout else ''}"
                )
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/healthz", timeout=1
                ) as r:
                    if r.status == 200:
                        return proc
            except OSError:
                time.sleep(0.1)
        self.fail("gateway did not become healthy")

    def stopAndCollect(self, proc: subprocess.Popen[str]) -> tuple[int, str]:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        return proc.returncode, out

    def serveOnce(self) -> None:
        status, body = post(self.port, b'{"jsonrpc": "2.0", "id": 5, "method": "ping"}')
        self.assertEqual(status, 502)
        self.assertEqual(body["id"], 5)

    def auditLines(self, path: str | None = None) -> list[dict[str, object]]:
        with open(path or self.auditPath) as f:
            return [json.loads(line) for line in f]

    def test_mcpgwRun(self) -> None:
        """C{mcpgw run} serves, logs JSON lines, and exits 0 on SIGTERM with the audit written."""
        proc = self.start(mcpgwCommand("run", "--config", self.config))
        self.serveOnce()
        rc, out = self.stopAndCollect(proc)
        self.assertEqual(rc, 0, out)
        logs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        self.assertTrue(any("listening on" in e["msg"] for e in logs), out)
        self.assertTrue(any("stopped;" in e["msg"] for e in logs), out)
        self.assertEqual([line["status"] for line in self.auditLines()], [502])

    def test_twistd(self) -> None:
        """C{twistd -n mcpgw --config FILE} serves and stops cleanly on SIGTERM."""
        proc = self.start([TWISTD, "-n", "--pidfile=", "mcpgw", "--config", self.config])
        self.serveOnce()
        rc, out = self.stopAndCollect(proc)
        # twistd re-raises the signal it stopped on: 143 = 128 + SIGTERM (systemd counts it clean)
        self.assertIn(rc, (0, -signal.SIGTERM, 128 + signal.SIGTERM), out)
        self.assertIn("Server Shut Down", out)
        self.assertEqual(len(self.auditLines()), 1)

    def test_sighupReopensAuditFile(self) -> None:
        """SIGHUP after logrotate's rename: the next lines go to a new file at the path."""
        proc = self.start(mcpgwCommand("run", "--config", self.config))
        self.serveOnce()
        os.rename(self.auditPath, self.auditPath + ".1")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.auditPath) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.serveOnce()
        self.serveOnce()
        rc, out = self.stopAndCollect(proc)
        self.assertEqual(rc, 0, out)
        self.assertEqual(len(self.auditLines(self.auditPath + ".1")), 1)
        self.assertEqual(len(self.auditLines()), 2)
        self.assertIn("reloaded", out)

    def test_invalidConfigRefusesToStart(self) -> None:
        """Both commands refuse an invalid config with the config-check messages; exit 1."""
        with open(self.config, "a") as f:
            f.write("limits: {max_body_bytes: -1}\n")
        for argv in (
            mcpgwCommand("run", "--config", self.config),
            [TWISTD, "-n", "--pidfile=", "mcpgw", "--config", self.config],
        ):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            self.assertEqual(out.returncode, 1, out.stdout + out.stderr)
            # twistd prints usage errors on stdout, mcpgw on stderr
            self.assertIn("limits.max_body_bytes:", out.stdout + out.stderr)
            self.assertIn("(line 5)", out.stdout + out.stderr)

    def test_sighupWithMissingSinkLibraryIsRejected(self) -> None:
        """
        A SIGHUP reload to a config with a sink whose library is not installed is rejected like
        any invalid config, with the config-check message: the running generation stays.
        """
        proc = self.start(withoutModules("boto3", mcpgwCommand("run", "--config", self.config)))
        self.serveOnce()
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:  # audit: on line 4
            sink = "{type: s3, name: archive, bucket: corp-mcp-audit}"
            f.write(text.replace("fsync: always}", f"fsync: always, sinks: [{sink}]}}"))
        os.rename(self.auditPath, self.auditPath + ".1")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10  # the reload reopens the audit file first
        while not os.path.exists(self.auditPath) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.serveOnce()
        rc, out = self.stopAndCollect(proc)
        self.assertEqual(rc, 0, out)
        logs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        rejected = [e["msg"] for e in logs if "reload rejected" in e["msg"]]
        self.assertEqual(len(rejected), 1, out)
        self.assertIn("keeping generation 1", rejected[0])
        self.assertIn(
            "audit.sinks[0].type: the s3 sink needs the Python module 'boto3', which is not "
            "installed: pip install 'rivano-mcpgw[sinks]' (line 4)",
            rejected[0],
        )
        self.assertFalse(any("reloaded" in e["msg"] for e in logs), out)
        self.assertFalse(any("sink archive" in e["msg"] for e in logs), out)
        self.assertEqual(len(self.auditLines()), 1)


class SinkLibraryCommandTests(TestCase):
    """
    A configured sink whose library is not installed is a config error for every command, not
    a gateway that starts and ships nothing.
    """

    def setUp(self) -> None:
        d = tempfile.mkdtemp(prefix="mcpgw-cli-")
        self.path = os.path.join(d, "sinks.yaml")
        with open(self.path, "w") as f:
            f.write(
                f"listen: {{port: {freePort()}}}\n"
                "upstreams: [{name: a, url: 'http://127.0.0.1:9/mcp'}]\n"
                f"audit:\n  path: {d}/audit.jsonl\n"
                "  sinks:\n"
                "    - {type: s3, name: archive, bucket: corp-mcp-audit}\n"
                "    - {type: kafka, name: stream, topic: t, bootstrap_servers: ['k:9092']}\n"
            )

    def test_missingLibraryRefusesEveryCommand(self) -> None:
        """
        config check, run and twistd -n: exit 1, one line per sink naming the module and the
        extra, at C{audit.sinks[N].type} with its line; no traceback, nothing started.
        """
        for argv in (
            mcpgwCommand("config", "check", self.path),
            mcpgwCommand("run", "--config", self.path),
            [TWISTD, "-n", "--pidfile=", "mcpgw", "--config", self.path],
        ):
            out = subprocess.run(
                withoutModules("boto3,confluent_kafka", argv),
                capture_output=True,
                text=True,
                timeout=30,
            )
            both = out.stdout + out.stderr
            self.assertEqual(out.returncode, 1, both)
            self.assertIn(
                "audit.sinks[0].type: the s3 sink needs the Python module 'boto3', which is not "
                "installed: pip install 'rivano-mcpgw[sinks]' (line 6)",
                both,
            )
            self.assertIn(
                "audit.sinks[1].type: the kafka sink needs the Python module 'confluent_kafka' "
                "(from confluent-kafka), which is not installed: pip install 'rivano-mcpgw[sinks]' "
                "(line 7)",
                both,
            )
            self.assertNotIn("Traceback", both)
            self.assertNotIn("listening on", both)
            self.assertNotIn("does not ship", both)

    def test_installedLibrariesAreNotImported(self) -> None:
        """C{config check} finds the sink libraries without importing them."""
        script = (
            "import sys\n"
            "from mcpgw.cli import main\n"
            "rc = main(['config', 'check', sys.argv[1]])\n"
            "heavy = ('boto3', 'botocore', 'google.cloud.storage', 'google.auth', "
            "'google.api_core', 'confluent_kafka', 'treq')\n"
            "print('imported:', [m for m in heavy if m in sys.modules])\n"
            "sys.exit(rc)\n"
        )
        with open(self.path, "a") as f:
            f.write(
                "    - {type: gcs, name: gcs, bucket: b}\n"
                "    - {type: webhook, name: siem, url: 'https://siem.example/'}\n"
            )
        out = subprocess.run(
            [sys.executable, "-c", script, self.path], capture_output=True, text=True, timeout=30
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("OK", out.stdout)
        self.assertIn("imported: []", out.stdout)


POLICY_YAML = """\
upstreams:
  - {name: a, url: "http://127.0.0.1:9/mcp"}
policy:
  rules:
    - {id: no-shell, action: deny, match: {exact: shell_exec}}
    - {id: no-admin, action: deny, match: {prefix: admin_}}
    - {id: read-admin, action: allow, match: {exact: admin_read}}
    - {id: slow, action: rate_limit, match: {regex: '^search'}, rate_limit: {rate: 0.5}}
"""


class PolicyCommandTests(TestCase):
    """C{mcpgw policy explain} and the policy warnings of C{mcpgw config check}."""

    def setUp(self) -> None:
        self.path = os.path.join(tempfile.mkdtemp(), "p.yaml")
        with open(self.path, "w") as f:
            f.write(POLICY_YAML)

    def explain(self, *args: str) -> str:
        out = subprocess.run(
            mcpgwCommand("policy", "explain", "--config", self.path, *args),
            capture_output=True,
            text=True,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        return out.stdout

    def test_explainRule(self) -> None:
        """The deciding rule, its action, the matcher and the rules checked before are printed."""
        out = self.explain("admin_read")
        self.assertIn("decision: deny (rule no-admin, action deny)", out)
        self.assertIn("matched: prefix 'admin_'", out)
        self.assertIn("checked before:\n  no-shell (exact 'shell_exec'): 'admin_read' does not", out)
        self.assertIn("tools/list: hidden", out)

    def test_explainDefault(self) -> None:
        """With no matching rule the default decides, and every rule was checked."""
        out = self.explain("echo")
        self.assertIn("decision: allow (default_action; no rule matched)", out)
        self.assertIn("slow (regex '^search')", out)

    def test_explainOtherMethodAndKey(self) -> None:
        """Other methods are not subject to policy; --key-id shows in the bucket description."""
        self.assertIn(
            "policy decides tools/call, resources/read, prompts/get only",
            self.explain("x", "--method", "tools/list"),
        )
        self.assertIn("else key id ci-bot", self.explain("search_web", "--key-id", "ci-bot"))

    def test_configCheckWarnsAboutShadowedRule(self) -> None:
        """A rule an earlier rule always catches is a warning with its line; the config stays valid."""
        out = subprocess.run(
            mcpgwCommand("config", "check", self.path), capture_output=True, text=True
        )
        self.assertEqual(out.returncode, 0)
        self.assertIn(
            "warning: policy.rules[2]: rule 'read-admin' can never match: 'admin_read' is already "
            "matched by rule 'no-admin' (prefix 'admin_') (line 7)",
            out.stderr,
        )


class TLSStartTests(TestCase):
    """A certificate and key that do not belong together is a config error, not a traceback."""

    def test_mismatchedPairIsAConfigError(self) -> None:
        """config check and run both report tls: ... in one line and exit 1."""
        from tests.pki import CA

        d = tempfile.mkdtemp()
        ca = CA()
        cert, _ = ca.server().write(d, "a")
        _, key = ca.server().write(d, "b")
        path = os.path.join(d, "tls.yaml")
        with open(path, "w") as f:
            f.write(
                f"listen: {{port: {freePort()}}}\n"
                "upstreams: [{name: a, url: 'http://127.0.0.1:9/mcp'}]\n"
                f"tls: {{cert_file: {cert}, key_file: {key}}}\n"
                f"audit: {{path: {d}/audit.jsonl}}\n"
            )
        for argv in (
            mcpgwCommand("config", "check", path),
            mcpgwCommand("run", "--config", path),
            [TWISTD, "-n", "--pidfile=", "mcpgw", "--config", path],
        ):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            both = out.stdout + out.stderr
            self.assertEqual(out.returncode, 1, both)
            self.assertIn("tls: ", both)
            self.assertNotIn("Traceback", both)
