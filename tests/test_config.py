"""
Tests for L{mcpgw.config}: the whole schema, every kind of problem with its exact message and
line, environment expansion, path resolution, defaults and immutability.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import textwrap

import attr
from twisted.trial.unittest import SynchronousTestCase

from mcpgw.audit import sinks
from mcpgw.config import (
    BUILTIN_REDACTIONS,
    APIKey,
    AuditConfig,
    AuthConfig,
    BatchConfig,
    Conditions,
    Config,
    ConfigError,
    ExternalAuthConfig,
    GCSSinkConfig,
    InputRateLimit,
    KafkaSinkConfig,
    LicenseConfig,
    LimitsConfig,
    ListenConfig,
    MatchSpec,
    ObjectLockConfig,
    PinningConfig,
    PolicyConfig,
    PolicyRule,
    Problem,
    RateLimitSpec,
    S3SinkConfig,
    TelemetryConfig,
    Timeouts,
    TLSConfig,
    ToolsConfig,
    UpstreamConfig,
    WebhookSinkConfig,
    config_from_string,
    load_config,
)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "config")

#: The smallest valid config.
MINIMAL = """\
upstreams:
  - name: tools
    url: http://127.0.0.1:9000/mcp
"""


def minimalWith(extra: str) -> str:
    """L{MINIMAL} followed by the dedented C{extra}."""
    return MINIMAL + textwrap.dedent(extra)


class ConfigTestCase(SynchronousTestCase):
    """Parses in a temporary base directory, with a fixed environment."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mcpgw-config-test-")
        self.addCleanup(shutil.rmtree, self.dir)
        self.environ: dict[str, str] = {}

    def touch(self, *names: str) -> None:
        """Create empty files C{names} in the base directory."""
        for name in names:
            path = os.path.join(self.dir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w"):
                pass

    def parse(self, text: str) -> Config:
        """Parse C{text} dedented, relative to the base directory."""
        return config_from_string(textwrap.dedent(text), base_dir=self.dir, environ=self.environ)

    def problems(self, text: str) -> list[str]:
        """The problems parsing C{text} reports, as strings."""
        with self.assertRaises(ConfigError) as cm:
            self.parse(text)
        return [str(p) for p in cm.exception.problems]


class DesignExampleTests(ConfigTestCase):
    """The example configuration of DESIGN.md."""

    def setUp(self) -> None:
        super().setUp()
        shutil.copy(os.path.join(DATA, "design-example.yaml"), self.dir)
        self.touch("server.crt", "server.key", "clients-ca.crt", "license.jwt")
        self.path = os.path.join(self.dir, "design-example.yaml")
        self.patch(os, "environ", {"SIEM_TOKEN": "s3cret"})

    def test_parsesCompletely(self) -> None:
        """Every key of the example becomes the corresponding attribute value."""
        d = self.dir
        expected = Config(
            listen=ListenConfig(
                host="127.0.0.1", port=8080, reuse_port=False, allowed_hosts=(), allowed_origins=()
            ),
            tls=TLSConfig(
                cert_file=f"{d}/server.crt",
                key_file=f"{d}/server.key",
                client_ca=f"{d}/clients-ca.crt",
            ),
            upstreams=(
                UpstreamConfig(
                    name="tools",
                    url="http://127.0.0.1:9000/mcp",
                    scheme="http",
                    host="127.0.0.1",
                    port=9000,
                    target=b"/mcp",
                    path="/mcp",
                    headers=(),
                    timeouts=Timeouts(connect=5.0, response=120.0),
                ),
            ),
            auth=AuthConfig(
                enabled=False,
                keys=(APIKey(id="ci-bot", hash="$argon2id$v=19$m=65536,t=3,p=4$..."),),
            ),
            policy=PolicyConfig(
                default_action="allow",
                filter_tools_list=True,
                rules=(
                    PolicyRule(
                        id="no-shell", action="deny", match=MatchSpec("exact", "shell_exec")
                    ),
                    PolicyRule(id="no-admin", action="deny", match=MatchSpec("prefix", "admin_")),
                    PolicyRule(
                        id="scrub-http",
                        action="redact",
                        match=MatchSpec("glob", "http_*"),
                        redact=(
                            "bearer",
                            "openai_key",
                            "aws_access_key",
                            "jwt",
                            r"(?i)password=\S+",
                        ),
                    ),
                    PolicyRule(
                        id="slow-search",
                        action="rate_limit",
                        match=MatchSpec("regex", "^search(_.*)?$"),
                        rate_limit=RateLimitSpec(rate=0.5, burst=2.0),
                    ),
                    PolicyRule(
                        id="read-only",
                        action="allow",
                        match=MatchSpec("list", ("read_file", "list_dir")),
                    ),
                ),
            ),
            audit=AuditConfig(
                path=f"{d}/audit.jsonl",
                fsync="interval",
                state_dir=f"{d}/state",
                sinks=(
                    S3SinkConfig(
                        name="s3-archive",
                        bucket="corp-mcp-audit",
                        prefix="mcpgw/",
                        region="us-east-1",
                        endpoint_url=None,
                        object_lock=ObjectLockConfig(mode="GOVERNANCE", retain_days=365),
                        batch=BatchConfig(max_lines=10000, max_seconds=60.0),
                    ),
                    GCSSinkConfig(
                        name="gcs-archive",
                        bucket="corp-mcp-audit",
                        prefix="mcpgw/",
                        endpoint_url=None,
                        batch=BatchConfig(max_lines=10000, max_seconds=60.0),
                    ),
                    KafkaSinkConfig(
                        name="kafka",
                        bootstrap_servers=("kafka-1:9092",),
                        topic="mcpgw-audit",
                        config=(),
                    ),
                    WebhookSinkConfig(
                        name="siem",
                        url="https://siem.example.com/ingest",
                        headers=(("Authorization", "Bearer s3cret"),),
                        ca_file=None,
                        batch=BatchConfig(max_lines=500, max_seconds=5.0),
                    ),
                ),
            ),
            telemetry=TelemetryConfig(
                otlp_endpoint="http://localhost:4318/v1/traces",
                service_name="mcpgw",
                environment="prod",
            ),
            limits=LimitsConfig(
                max_body_bytes=4194304, input_rate_limit=InputRateLimit(rate=200.0, burst=400.0)
            ),
            license=LicenseConfig(file=f"{d}/license.jwt"),
            tools=ToolsConfig(PinningConfig(lock_file=f"{d}/tools.lock")),
            source=self.path,
        )
        self.assertEqual(load_config(self.path), expected)

    def test_sinkTypes(self) -> None:
        """Each sink class names its C{type}."""
        sinks = load_config(self.path).audit.sinks
        self.assertEqual([s.type for s in sinks], ["s3", "gcs", "kafka", "webhook"])

    def test_missingReferencedFiles(self) -> None:
        """Without the TLS and license files, each one is reported with its absolute path."""
        for name in ("server.crt", "clients-ca.crt", "license.jwt"):
            os.remove(os.path.join(self.dir, name))
        with self.assertRaises(ConfigError) as cm:
            load_config(self.path)
        self.assertEqual(
            [str(p) for p in cm.exception.problems],
            [
                f"tls.cert_file: file not found: {self.dir}/server.crt (line 10)",
                f"tls.client_ca: file not found: {self.dir}/clients-ca.crt (line 12)",
                f"license.file: file not found: {self.dir}/license.jwt (line 85)",
            ],
        )
        self.assertEqual(cm.exception.source, self.path)


class LoadTests(ConfigTestCase):
    """L{load_config} and the error types."""

    def test_missingFile(self) -> None:
        """A file that cannot be read is one problem naming it."""
        path = os.path.join(self.dir, "nope.yaml")
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertEqual(
            cm.exception.problems, (Problem("", f"cannot read {path}: No such file or directory"),)
        )
        self.assertEqual(cm.exception.source, path)

    def test_relativeToConfigFile(self) -> None:
        """Relative paths in a loaded file are relative to the file's directory, not the cwd."""
        os.mkdir(os.path.join(self.dir, "etc"))
        self.touch("etc/lic.jwt")
        path = os.path.join(self.dir, "etc", "mcpgw.yaml")
        with open(path, "w") as f:
            f.write(minimalWith("license: {file: lic.jwt}\naudit: {path: ../log/a.jsonl}\n"))
        config = load_config(path)
        self.assertEqual(config.license.file, f"{self.dir}/etc/lic.jwt")
        self.assertEqual(config.audit.path, f"{self.dir}/log/a.jsonl")
        self.assertEqual(config.source, path)

    def test_problemStr(self) -> None:
        """A problem prints as C{path: message (line N)}, leaving out what it does not have."""
        self.assertEqual(
            str(Problem("upstreams[0].url", "must start with http:// or https://", 7)),
            "upstreams[0].url: must start with http:// or https:// (line 7)",
        )
        self.assertEqual(str(Problem("listen.port", "bad")), "listen.port: bad")
        self.assertEqual(str(Problem("", "config file is empty")), "config file is empty")

    def test_configErrorStr(self) -> None:
        """A L{ConfigError} prints one problem per line."""
        error = ConfigError([Problem("a", "one", 1), Problem("b", "two")], "x.yaml")
        self.assertEqual(str(error), "a: one (line 1)\nb: two")
        self.assertEqual(error.source, "x.yaml")

    def test_sourceDefault(self) -> None:
        """A config parsed from a string has source C{<string>}."""
        self.assertEqual(config_from_string(MINIMAL).source, "<string>")


class DefaultTests(ConfigTestCase):
    """What a minimal config means."""

    def test_minimal(self) -> None:
        """Everything but the upstream takes its default; audit paths are resolved."""
        config = self.parse(MINIMAL)
        self.assertEqual(
            config,
            Config(
                upstreams=(
                    UpstreamConfig(
                        name="tools",
                        url="http://127.0.0.1:9000/mcp",
                        scheme="http",
                        host="127.0.0.1",
                        port=9000,
                        target=b"/mcp",
                    ),
                ),
                audit=AuditConfig(path=f"{self.dir}/audit.jsonl", state_dir=f"{self.dir}/state"),
                tools=ToolsConfig(PinningConfig("off", f"{self.dir}/tools.lock")),
            ),
        )
        self.assertEqual(config.listen, ListenConfig("127.0.0.1", 8080, False, (), ()))
        self.assertIsNone(config.tls)
        self.assertEqual(config.policy, PolicyConfig("allow", True, ()))
        self.assertEqual(config.limits, LimitsConfig(4194304, None))
        self.assertEqual(config.telemetry, TelemetryConfig(None, "mcpgw", None))
        self.assertEqual(config.audit.fsync, "interval")

    def test_nullMeansDefault(self) -> None:
        """C{null} for a section or an optional key is its default."""
        config = self.parse(
            minimalWith(
                """\
                listen: null
                tls: null
                policy: {default_action: null, rules: null}
                audit: {fsync: ~, sinks: null}
                telemetry: {service_name: null}
                """
            )
        )
        self.assertEqual(config.listen, ListenConfig())
        self.assertIsNone(config.tls)
        self.assertEqual(config.policy, PolicyConfig())
        self.assertEqual((config.audit.fsync, config.audit.sinks), ("interval", ()))
        self.assertEqual(config.telemetry.service_name, "mcpgw")

    def test_portZero(self) -> None:
        """Port 0 (pick a free port) is accepted."""
        self.assertEqual(self.parse(minimalWith("listen: {port: 0}")).listen.port, 0)

    def test_upstreamURLFields(self) -> None:
        """Scheme, host, port and target are computed from the URL."""
        config = self.parse(
            """\
            upstreams:
              - {name: a, url: "https://Example.COM", path: /a}
              - {name: b, url: "http://[::1]:81/x y/é?q=1&r=2#frag", path: /b}
              - {name: c, url: "HTTP://h:8443/mcp/", path: /c, timeouts: {connect: 1}}
              - {name: d, url: "http://bücher.example/", path: /d}
            """
        )
        fields = [(u.scheme, u.host, u.port, u.target) for u in config.upstreams]
        self.assertEqual(
            fields,
            [
                ("https", "example.com", 443, b"/"),
                ("http", "::1", 81, b"/x%20y/%C3%A9?q=1&r=2"),
                ("http", "h", 8443, b"/mcp/"),
                ("http", "xn--bcher-kva.example", 80, b"/"),
            ],
        )
        self.assertEqual(config.upstreams[2].timeouts, Timeouts(connect=1.0, response=120.0))
        self.assertIsInstance(config.upstreams[2].timeouts.connect, float)

    def test_upstreamFromURL(self) -> None:
        """L{UpstreamConfig.from_url} computes the URL fields like the parser does."""
        u = UpstreamConfig.from_url("t", "https://h/p?x=1", path="/t")
        self.assertEqual(
            (u.scheme, u.host, u.port, u.target, u.path), ("https", "h", 443, b"/p?x=1", "/t")
        )
        self.assertRaises(ValueError, UpstreamConfig.from_url, "t", "ftp://h/")

    def test_burstDefault(self) -> None:
        """A token bucket's burst defaults to its rate, and to at least 1."""
        config = self.parse(
            minimalWith(
                """\
                policy:
                  rules:
                    - {id: a, action: rate_limit, match: {exact: a}, rate_limit: {rate: 0.5}}
                    - {id: b, action: rate_limit, match: {exact: b}, rate_limit: {rate: 5}}
                limits: {input_rate_limit: {rate: 100}}
                """
            )
        )
        self.assertEqual(
            [r.rate_limit for r in config.policy.rules],
            [RateLimitSpec(0.5, 1.0), RateLimitSpec(5.0, 5.0)],
        )
        self.assertEqual(config.limits.input_rate_limit, InputRateLimit(100.0, 100.0))

    def test_batchDefaults(self) -> None:
        """Each sink type has its own batch defaults; a partial batch keeps the rest."""
        config = self.parse(
            minimalWith(
                """\
                audit:
                  sinks:
                    - {type: s3, name: s, bucket: b}
                    - {type: gcs, name: g, bucket: b, batch: {max_seconds: 1.5}}
                    - {type: webhook, name: w, url: "http://h/in", batch: {max_lines: 7}}
                """
            )
        )
        self.assertEqual(
            [s.batch for s in config.audit.sinks if not isinstance(s, KafkaSinkConfig)],
            [BatchConfig(10000, 60.0), BatchConfig(10000, 1.5), BatchConfig(7, 5.0)],
        )
        self.assertEqual(
            config.audit.sinks[0],
            S3SinkConfig(name="s", bucket="b", prefix="", region=None, endpoint_url=None),
        )

    def test_kafkaConfigStrings(self) -> None:
        """Kafka settings keep their order and become strings (booleans as true/false)."""
        self.environ["PW"] = "pw"
        config = self.parse(
            minimalWith(
                """\
                audit:
                  sinks:
                    - type: kafka
                      name: k
                      bootstrap_servers: [a:9092, b:9092]
                      topic: t
                      config: {linger.ms: 5, enable.idempotence: true, sasl.password: "${PW}",
                               batch.size: 1.5}
                """
            )
        )
        self.assertEqual(
            config.audit.sinks,
            (
                KafkaSinkConfig(
                    name="k",
                    bootstrap_servers=("a:9092", "b:9092"),
                    topic="t",
                    config=(
                        ("linger.ms", "5"),
                        ("enable.idempotence", "true"),
                        ("sasl.password", "pw"),
                        ("batch.size", "1.5"),
                    ),
                ),
            ),
        )

    def test_authWithClientCAOnly(self) -> None:
        """Auth enabled without keys is fine when mTLS authenticates clients."""
        self.touch("c.crt", "c.key", "ca.crt")
        config = self.parse(
            minimalWith(
                """\
                tls: {cert_file: c.crt, key_file: c.key, client_ca: ca.crt}
                auth: {enabled: true}
                """
            )
        )
        self.assertEqual(config.auth, AuthConfig(enabled=True, keys=()))
        self.assertEqual(
            config.tls, TLSConfig(f"{self.dir}/c.crt", f"{self.dir}/c.key", f"{self.dir}/ca.crt")
        )

    def test_absolutePathsKept(self) -> None:
        """An absolute path is used as is; a relative one is joined and normalized."""
        other = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, other)
        config = self.parse(
            minimalWith(f"audit: {{path: {other}/a.jsonl, state_dir: ./s/../st/}}\n")
        )
        self.assertEqual(config.audit.path, f"{other}/a.jsonl")
        self.assertEqual(config.audit.state_dir, f"{self.dir}/st")

    def test_mergeKeys(self) -> None:
        """YAML merge keys work, and a mapping's own keys override merged ones."""
        config = self.parse(
            """\
            upstreams:
              - &base {name: a, url: "http://h:1/mcp", timeouts: {connect: 2}}
              - {<<: *base, name: b, path: /b}
            """
        )
        self.assertEqual(
            [(u.name, u.path, u.port) for u in config.upstreams], [("a", "/mcp", 1), ("b", "/b", 1)]
        )
        self.assertEqual(config.upstreams[1].timeouts.connect, 2.0)

    def test_originsAndHosts(self) -> None:
        """Allowed hosts and origins are kept as given."""
        listen = self.parse(
            minimalWith(
                """\
                listen:
                  allowed_hosts: [gw.example.com, "gw.example.com:8443", "[::1]:8080"]
                  allowed_origins: ["https://app.example.com", "http://localhost:3000/",
                                    "vscode-webview://abc"]
                """
            )
        ).listen
        self.assertEqual(
            listen.allowed_hosts, ("gw.example.com", "gw.example.com:8443", "[::1]:8080")
        )
        self.assertEqual(
            listen.allowed_origins,
            ("https://app.example.com", "http://localhost:3000/", "vscode-webview://abc"),
        )

    def test_builtinRedactions(self) -> None:
        """The built-in redaction names are exported."""
        self.assertEqual(BUILTIN_REDACTIONS, {"bearer", "openai_key", "aws_access_key", "jwt"})


class EnvironmentTests(ConfigTestCase):
    """C{${NAME}} expansion."""

    def test_expanded(self) -> None:
        """Variables are expanded whole, inside strings, several times, in lists and in headers."""
        self.environ.update({"HOST": "up.internal", "PORT": "9000", "TOKEN": "t0k"})
        config = self.parse(
            """\
            upstreams:
              - name: tools
                url: "http://${HOST}:${PORT}/mcp"
                headers: {Authorization: "Bearer ${TOKEN}", X-Both: "${HOST}${HOST}"}
            listen: {allowed_hosts: ["${HOST}"]}
            """
        )
        u = config.upstreams[0]
        self.assertEqual(
            (u.url, u.host, u.port), ("http://up.internal:9000/mcp", "up.internal", 9000)
        )
        self.assertEqual(
            u.headers, (("Authorization", "Bearer t0k"), ("X-Both", "up.internalup.internal"))
        )
        self.assertEqual(config.listen.allowed_hosts, ("up.internal",))

    def test_notExpandedTwice(self) -> None:
        """A value that itself contains C{${...}} is not expanded again; C{$} alone is literal."""
        self.environ.update({"A": "${B}", "B": "no"})
        config = self.parse(
            minimalWith(
                """\
                telemetry: {environment: "${A}", service_name: "$x$y"}
                auth: {keys: [{id: k, hash: "$argon2id$v=19$m=65536,t=3,p=4$abc"}]}
                """
            )
        )
        self.assertEqual(config.telemetry.environment, "${B}")
        self.assertEqual(config.telemetry.service_name, "$x$y")
        self.assertEqual(config.auth.keys[0].hash, "$argon2id$v=19$m=65536,t=3,p=4$abc")

    def test_unset(self) -> None:
        """Each unset variable is a problem naming it."""
        self.assertEqual(
            self.problems(
                """\
                upstreams:
                  - name: "${NAME}"
                    url: "http://${HOST}:${PORT}/"
                """
            ),
            [
                "upstreams[0].name: environment variable 'NAME' is not set (line 2)",
                "upstreams[0].url: environment variable 'HOST' is not set (line 3)",
                "upstreams[0].url: environment variable 'PORT' is not set (line 3)",
            ],
        )

    def test_malformed(self) -> None:
        """A C{${} that is not a valid reference is a problem."""
        self.assertEqual(
            self.problems(minimalWith('telemetry: {environment: "a${1X}b${OPEN"}')),
            [
                "telemetry.environment: malformed variable reference '${1X}': use ${NAME} (line 4)",
                "telemetry.environment: malformed variable reference '${OPEN': use ${NAME} (line 4)",
            ],
        )

    def test_notIntoIntegers(self) -> None:
        """A variable gives a string, so it cannot stand for an integer."""
        self.environ["PORT"] = "80"
        self.assertEqual(
            self.problems(minimalWith('listen: {port: "${PORT}"}')),
            ["listen.port: must be an integer, got string (line 4)"],
        )

    def test_defaultsToProcessEnvironment(self) -> None:
        """Without C{environ}, C{os.environ} is used."""
        self.patch(os, "environ", {"ENVNAME": "staging"})
        config = config_from_string(minimalWith("telemetry: {environment: '${ENVNAME}'}"))
        self.assertEqual(config.telemetry.environment, "staging")


class ProblemTests(ConfigTestCase):
    """Each kind of problem: exact message, path and line."""

    def test_empty(self) -> None:
        """An empty file, or one with only comments, is one problem."""
        for text in ("", "# nothing\n\n", "~\n"):
            self.assertEqual(self.problems(text), ["config file is empty"])

    def test_yamlSyntax(self) -> None:
        """A YAML syntax error is one problem with the line of the error."""
        self.assertEqual(
            self.problems(
                """\
                upstreams:
                  - name: a
                    url: [http://x
                listen: {}
                """
            ),
            [
                "invalid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence) "
                "(line 4)"
            ],
        )

    def test_badCharacter(self) -> None:
        """A character YAML does not accept is one problem with its line."""
        self.assertEqual(
            self.problems(MINIMAL + "listen: {host: \x01}\n"),
            [
                "invalid YAML: unacceptable character #x0001: special characters are not "
                "allowed (line 4)"
            ],
        )

    def test_invalidMerge(self) -> None:
        """A merge key that does not name a mapping is reported."""
        self.assertEqual(
            self.problems("upstreams:\n  - {<<: 5, name: a, url: 'http://h/'}\n"),
            [
                "upstreams[0]: invalid merge: expected a mapping or list of mappings for "
                "merging, but found scalar (line 2)"
            ],
        )

    def test_rootNotMapping(self) -> None:
        """The document must be a mapping."""
        self.assertEqual(self.problems("- a\n- b\n"), ["must be a mapping, got list (line 1)"])

    def test_upstreamsRequired(self) -> None:
        """At least one upstream is required."""
        self.assertEqual(
            self.problems("listen: {port: 1}\n"), ["missing required key 'upstreams' (line 1)"]
        )
        self.assertEqual(
            self.problems("upstreams: []\n"),
            ["upstreams: must list at least one upstream (line 1)"],
        )
        self.assertEqual(
            self.problems("upstreams:\n"), ["upstreams: must be a list, got null (line 1)"]
        )

    def test_urlScheme(self) -> None:
        """A non-HTTP upstream URL is reported on its own line."""
        self.assertEqual(
            self.problems(
                """\
                listen:
                  port: 8080
                upstreams:
                  - name: tools
                    path: /mcp
                    # the server
                    url: ftp://example.com/mcp
                """
            ),
            ["upstreams[0].url: must start with http:// or https:// (line 7)"],
        )

    def test_badURLs(self) -> None:
        """URLs need a host and a valid port, and no credentials."""
        self.assertEqual(
            self.problems(
                """\
                upstreams:
                  - {name: a, url: "http://", path: /a}
                  - {name: b, url: "http://h:99999/", path: /b}
                  - {name: c, url: "https://u:p@h/", path: /c}
                  - {name: d, url: "http://a b/", path: /d}
                  - {name: e, url: "http://[zz::1]/", path: /e}
                telemetry: {otlp_endpoint: "localhost:4318"}
                """
            ),
            [
                "upstreams[0].url: must include a host (line 2)",
                "upstreams[1].url: has an invalid port (line 3)",
                "upstreams[2].url: must not include credentials (use headers) (line 4)",
                "upstreams[3].url: has an invalid host 'a b' (line 5)",
                "upstreams[4].url: is not a valid URL (line 6)",
                "telemetry.otlp_endpoint: must start with http:// or https:// (line 7)",
            ],
        )

    def test_unknownKey(self) -> None:
        """
        Unknown keys are reported at every level under their own path, on their own line, with a
        suggestion when a known key is close.
        """
        self.assertEqual(
            self.problems(
                """\
                listen:
                  prot: 8080
                upstreams:
                  - name: a
                    url: http://h/
                    timeouts: {conect: 1, zzz: 2}
                polcy: {}
                """
            ),
            [
                "listen.prot: unknown key; did you mean 'port'? (line 2)",
                "upstreams[0].timeouts.conect: unknown key; did you mean 'connect'? (line 6)",
                "upstreams[0].timeouts.zzz: unknown key (line 6)",
                "polcy: unknown key; did you mean 'policy'? (line 7)",
            ],
        )

    def test_unknownKeyInLists(self) -> None:
        """
        Inside lists the path names the item and the key (C{upstreams[1].timeouts.conect}), and
        the line is the unknown key's own, not its mapping's.
        """
        self.assertEqual(
            self.problems(
                """\
                upstreams:
                  - {name: a, url: "http://h/"}
                  - name: b
                    url: http://h/
                    path: /b
                    timeouts:
                      connect: 1
                      conect: 2
                    hedaers: {}
                auth:
                  keys:
                    - id: k
                      hash: $argon2id$x
                      hsh: y
                policy:
                  rules:
                    - {id: a, action: allow, match: {exact: a}}
                    - {id: b, action: allow, match: {exact: b}}
                    - id: c
                      action: deny
                      mach: {exact: c}
                      match: {exact: c}
                audit:
                  sinks:
                    - type: s3
                      name: archive
                      bucket: b
                      bukcet: b
                      batch: {max_lines: 1, max_second: 2}
                limits:
                  input_rate_limit: {rate: 1, brust: 2}
                """
            ),
            [
                "upstreams[1].timeouts.conect: unknown key; did you mean 'connect'? (line 8)",
                "upstreams[1].hedaers: unknown key; did you mean 'headers'? (line 9)",
                "auth.keys[0].hsh: unknown key; did you mean 'hash'? (line 14)",
                "policy.rules[2].mach: unknown key; did you mean 'match'? (line 21)",
                "audit.sinks[0].bukcet: unknown key; did you mean 'bucket'? (line 28)",
                "audit.sinks[0].batch.max_second: unknown key; did you mean 'max_seconds'? "
                "(line 29)",
                "limits.input_rate_limit.brust: unknown key; did you mean 'burst'? (line 31)",
            ],
        )

    def test_wrongTypes(self) -> None:
        """Scalars keep their YAML types; a wrong one is reported with what was found."""
        self.assertEqual(
            self.problems(
                """\
                listen:
                  port: "80"
                  reuse_port: 1
                  host: 127
                  allowed_hosts: localhost
                upstreams:
                  - name: a
                    url: http://h/
                    timeouts: {connect: "5", response: true}
                    headers: [a]
                policy: {filter_tools_list: "yes", rules: {}}
                limits: {max_body_bytes: 1.5}
                audit: 3
                """
            ),
            [
                "listen.port: must be an integer, got string (line 2)",
                "listen.reuse_port: must be true or false, got integer (line 3)",
                "listen.host: must be a string, got integer (quote the value) (line 4)",
                "listen.allowed_hosts: must be a list, got string (line 5)",
                "upstreams[0].timeouts.connect: must be a number, got string (line 9)",
                "upstreams[0].timeouts.response: must be a number, got boolean (line 9)",
                "upstreams[0].headers: must be a mapping, got list (line 10)",
                "policy.filter_tools_list: must be true or false, got string (line 11)",
                "policy.rules: must be a list, got mapping (line 11)",
                "limits.max_body_bytes: must be an integer, got number (line 12)",
                "audit: must be a mapping, got integer (line 13)",
            ],
        )

    def test_ranges(self) -> None:
        """Numbers out of range are reported with the bound."""
        self.assertEqual(
            self.problems(
                """\
                listen: {port: 65536}
                upstreams:
                  - {name: a, url: "http://h/", timeouts: {connect: 0, response: .inf}}
                limits: {max_body_bytes: 0, input_rate_limit: {rate: -1, burst: 0.5}}
                """
            ),
            [
                "listen.port: must be between 0 and 65535 (line 1)",
                "upstreams[0].timeouts.connect: must be greater than 0 (line 3)",
                "upstreams[0].timeouts.response: must be a finite number (line 3)",
                "limits.max_body_bytes: must be at least 1 (line 4)",
                "limits.input_rate_limit.rate: must be greater than 0 (line 4)",
                "limits.input_rate_limit.burst: must be at least 1 (line 4)",
            ],
        )

    def test_missingRequired(self) -> None:
        """A missing required key is reported against its parent mapping."""
        self.assertEqual(
            self.problems(
                """\
                upstreams:
                  - name: tools
                    path: /mcp
                auth:
                  keys:
                    - id: k
                """
            ),
            [
                "upstreams[0]: missing required key 'url' (line 2)",
                "auth.keys[0]: missing required key 'hash' (line 6)",
            ],
        )

    def test_duplicateKey(self) -> None:
        """A key given twice in one mapping is reported on the second."""
        self.assertEqual(
            self.problems(
                """\
                upstreams:
                  - name: a
                    url: http://h/
                    name: b
                """
            ),
            ["upstreams[0]: duplicate key 'name' (line 4)"],
        )

    def test_duplicateNames(self) -> None:
        """Upstream names and paths, key ids, rule ids and sink names must be unique."""
        self.assertEqual(
            self.problems(
                """\
                upstreams:
                  - {name: a, url: "http://h/"}
                  - {name: a, url: "http://h/", path: /other}
                  - {name: c, url: "http://h/", path: /mcp}
                auth:
                  keys:
                    - {id: k, hash: "$argon2id$x"}
                    - {id: k, hash: "$argon2id$y"}
                policy:
                  rules:
                    - {id: r, action: deny, match: {exact: a}}
                    - {id: r, action: allow, match: {exact: b}}
                audit:
                  sinks:
                    - {type: gcs, name: s, bucket: b}
                    - {type: s3, name: s, bucket: b}
                """
            ),
            [
                "upstreams[1].name: duplicate upstream name 'a' (line 3)",
                "upstreams[2].path: duplicate upstream path '/mcp' (line 4)",
                "auth.keys[1].id: duplicate key id 'k' (line 8)",
                "policy.rules[1].id: duplicate rule id 'r' (line 12)",
                "audit.sinks[1].name: duplicate sink name 's' (line 16)",
            ],
        )

    def test_upstreamPath(self) -> None:
        """Gateway paths start with /, are plain, and avoid the health endpoints."""
        self.assertEqual(
            self.problems(
                """\
                upstreams:
                  - {name: a, url: "http://h/", path: mcp}
                  - {name: b, url: "http://h/", path: /healthz}
                  - {name: c, url: "http://h/", path: "/m?x=1"}
                """
            ),
            [
                "upstreams[0].path: must start with / (line 2)",
                "upstreams[1].path: /healthz is reserved for health checks (line 3)",
                "upstreams[2].path: must be a plain path (no query, fragment or spaces) (line 4)",
            ],
        )

    def test_headers(self) -> None:
        """Injected headers need token names, clean values, and cannot set framing headers."""
        self.environ["EVIL"] = "a\r\nX-Injected: 1"
        self.assertEqual(
            self.problems(
                """\
                upstreams:
                  - name: a
                    url: http://h/
                    headers:
                      "Bad Name": x
                      Content-Length: "5"
                      X-Evil: "${EVIL}"
                      X-Ok: "1"
                      x-ok: "2"
                      X-Num: 5
                      X-Snow: "☃"
                """
            ),
            [
                "upstreams[0].headers: invalid header name 'Bad Name' (line 5)",
                "upstreams[0].headers: header 'Content-Length' is set by the gateway and cannot "
                "be injected (line 6)",
                "upstreams[0].headers.X-Evil: must not contain CR, LF or NUL (line 7)",
                "upstreams[0].headers: duplicate header 'x-ok' (line 9)",
                "upstreams[0].headers.X-Num: must be a string, got integer (quote the value) "
                "(line 10)",
                "upstreams[0].headers.X-Snow: must be Latin-1 text (line 11)",
            ],
        )

    def test_origins(self) -> None:
        """Origins must be C{scheme://host[:port]}; hosts cannot be URLs."""
        self.assertEqual(
            self.problems(
                minimalWith(
                    """\
                    listen:
                      allowed_hosts: ["http://gw"]
                      allowed_origins:
                        - https://ok.example
                        - ok.example
                        - https://x.example/path
                        - https://x.example:99999
                    """
                )
            ),
            [
                "listen.allowed_hosts[0]: must be a host or host:port, got 'http://gw' (line 5)",
                "listen.allowed_origins[1]: must look like scheme://host[:port], got 'ok.example' "
                "(line 8)",
                "listen.allowed_origins[2]: must look like scheme://host[:port], got "
                "'https://x.example/path' (line 9)",
                "listen.allowed_origins[3]: must look like scheme://host[:port], got "
                "'https://x.example:99999' (line 10)",
            ],
        )

    def test_files(self) -> None:
        """Files that must exist are reported with their absolute path; a directory is no file."""
        os.mkdir(os.path.join(self.dir, "adir"))
        self.assertEqual(
            self.problems(
                minimalWith(
                    """\
                    tls: {cert_file: missing.crt, key_file: adir}
                    audit:
                      path: not/yet/created.jsonl
                      sinks: [{type: webhook, name: w, url: "https://h/", ca_file: ca.pem}]
                    """
                )
            ),
            [
                f"tls.cert_file: file not found: {self.dir}/missing.crt (line 4)",
                f"tls.key_file: not a regular file: {self.dir}/adir (line 4)",
                f"audit.sinks[0].ca_file: file not found: {self.dir}/ca.pem (line 7)",
            ],
        )

    def test_tlsRequiredKeys(self) -> None:
        """A C{tls} section needs both the certificate and the key."""
        self.assertEqual(
            self.problems(minimalWith("tls: {client_ca: null}")),
            [
                "tls: missing required key 'cert_file' (line 4)",
                "tls: missing required key 'key_file' (line 4)",
            ],
        )

    def test_auth(self) -> None:
        """Auth enabled needs keys (or mTLS); hashes must be Argon2id."""
        self.assertEqual(
            self.problems(
                minimalWith(
                    """\
                    auth:
                      enabled: true
                    """
                )
            ),
            ["auth.enabled: true but no keys are configured (line 5)"],
        )
        self.assertEqual(
            self.problems(minimalWith("auth: {keys: [{id: k, hash: 'sha256:abc'}]}")),
            ["auth.keys[0].hash: must be an Argon2id hash ($argon2id$...) (line 4)"],
        )

    def test_enums(self) -> None:
        """Values from a fixed set list the valid ones."""
        self.assertEqual(
            self.problems(
                minimalWith(
                    """\
                    policy:
                      default_action: redact
                      rules: [{id: r, action: block, match: {exact: a}}]
                    audit: {fsync: sometimes}
                    """
                )
            ),
            [
                "policy.default_action: must be one of allow, deny, got 'redact' (line 5)",
                "policy.rules[0].action: must be one of allow, deny, redact, rate_limit, "
                "got 'block' (line 6)",
                "audit.fsync: must be one of none, interval, always, got 'sometimes' (line 7)",
            ],
        )

    def test_match(self) -> None:
        """A match has exactly one kind; regexes compile; lists are non-empty lists of strings."""
        self.assertEqual(
            self.problems(
                minimalWith(
                    """\
                    policy:
                      rules:
                        - {id: a, action: deny, match: {}}
                        - {id: b, action: deny, match: {exact: x, prefix: y}}
                        - {id: c, action: deny, match: {regex: "(unclosed"}}
                        - {id: d, action: deny, match: {list: []}}
                        - {id: e, action: deny, match: {list: [a, 1]}}
                        - {id: f, action: deny, match: {glob: ""}}
                        - {id: g, action: deny, match: {exakt: a}}
                        - {id: h, action: deny}
                    """
                )
            ),
            [
                "policy.rules[0].match: must have exactly one of exact, prefix, glob, regex, list "
                "(line 6)",
                "policy.rules[1].match: must have exactly one of exact, prefix, glob, regex, list, "
                "got exact, prefix (line 7)",
                "policy.rules[2].match.regex: invalid regular expression: missing ), unterminated "
                "subpattern at position 0 (line 8)",
                "policy.rules[3].match.list: must not be empty (line 9)",
                "policy.rules[4].match.list[1]: must be a string, got integer (quote the value) "
                "(line 10)",
                "policy.rules[5].match.glob: must not be empty (line 11)",
                "policy.rules[6].match: must have exactly one of exact, prefix, glob, regex, list "
                "(line 12)",
                "policy.rules[6].match.exakt: unknown key; did you mean 'exact'? (line 12)",
                "policy.rules[7]: missing required key 'match' (line 13)",
            ],
        )

    def test_redact(self) -> None:
        """Redact lists belong to redact rules and hold built-in names or sound regexes."""
        self.assertEqual(
            self.problems(
                minimalWith(
                    """\
                    policy:
                      rules:
                        - {id: a, action: redact, match: {exact: a}}
                        - {id: b, action: deny, match: {exact: b}, redact: [jwt]}
                        - {id: c, action: redact, match: {exact: c}, redact: []}
                        - id: d
                          action: redact
                          match: {exact: d}
                          redact: [berer, "(x", "a*", 'token=\\S+', bearer]
                    """
                )
            ),
            [
                "policy.rules[0]: missing required key 'redact' (line 6)",
                "policy.rules[1].redact: is only allowed with action: redact (line 7)",
                "policy.rules[2].redact: must not be empty (line 8)",
                "policy.rules[3].redact[0]: unknown built-in redaction 'berer'; "
                "did you mean 'bearer'? (line 12)",
                "policy.rules[3].redact[1]: invalid regular expression: missing ), unterminated "
                "subpattern at position 0 (line 12)",
                "policy.rules[3].redact[2]: must not match the empty string (line 12)",
            ],
        )

    def test_rateLimit(self) -> None:
        """Rate limits belong to rate_limit rules and need a positive rate."""
        self.assertEqual(
            self.problems(
                minimalWith(
                    """\
                    policy:
                      rules:
                        - {id: a, action: rate_limit, match: {exact: a}}
                        - {id: b, action: allow, match: {exact: b}, rate_limit: {rate: 1}}
                        - {id: c, action: rate_limit, match: {exact: c}, rate_limit: {burst: 2}}
                        - {id: d, action: rate_limit, match: {exact: d}, rate_limit: {rate: 0}}
                    """
                )
            ),
            [
                "policy.rules[0]: missing required key 'rate_limit' (line 6)",
                "policy.rules[1].rate_limit: is only allowed with action: rate_limit (line 7)",
                "policy.rules[2].rate_limit: missing required key 'rate' (line 8)",
                "policy.rules[3].rate_limit.rate: must be greater than 0 (line 9)",
            ],
        )

    def test_sinks(self) -> None:
        """Sinks need a known type, a file-safe name, and only their own type's keys."""
        self.assertEqual(
            self.problems(
                minimalWith(
                    """\
                    audit:
                      sinks:
                        - {type: s4, name: a}
                        - {name: b, bucket: x}
                        - {type: kafka, name: "c/d", bucket: x, topic: t, bootstrap_servers: []}
                        - {type: s3, name: e, bukcet: x}
                        - {type: s3, name: f, bucket: b, object_lock: {mode: governance}}
                        - {type: webhook, name: g, url: "ftp://x", batch: {max_lines: 0}}
                        - {type: kafka, name: h, topic: t, bootstrap_servers: [k], config: {a: [1]}}
                    """
                )
            ),
            [
                "audit.sinks[0].type: must be one of s3, gcs, kafka, webhook, got 's4' (line 6)",
                "audit.sinks[1]: missing required key 'type' (line 7)",
                "audit.sinks[2].name: may only contain letters, digits, '.', '_' and '-' (line 8)",
                "audit.sinks[2].bucket: unknown key for a kafka sink (line 8)",
                "audit.sinks[2].bootstrap_servers: must not be empty (line 8)",
                "audit.sinks[3]: missing required key 'bucket' (line 9)",
                "audit.sinks[3].bukcet: unknown key; did you mean 'bucket'? (line 9)",
                "audit.sinks[4].object_lock: missing required key 'retain_days' (line 10)",
                "audit.sinks[4].object_lock.mode: must be one of GOVERNANCE, COMPLIANCE, "
                "got 'governance' (line 10)",
                "audit.sinks[5].url: must start with http:// or https:// (line 11)",
                "audit.sinks[5].batch.max_lines: must be at least 1 (line 11)",
                "audit.sinks[6].config.a: must be a string, number or boolean, got list (line 12)",
            ],
        )

    def test_severalAtOnce(self) -> None:
        """All problems are reported together, in line order, in one error."""
        with self.assertRaises(ConfigError) as cm:
            self.parse(
                """\
                listen: {port: -1}
                upstreams:
                  - {name: a, url: "ws://h/"}
                policy: {default_action: maybe}
                license: {file: nope.jwt}
                """
            )
        self.assertEqual(
            str(cm.exception),
            "\n".join(
                [
                    "listen.port: must be between 0 and 65535 (line 1)",
                    "upstreams[0].url: must start with http:// or https:// (line 3)",
                    "policy.default_action: must be one of allow, deny, got 'maybe' (line 4)",
                    f"license.file: file not found: {self.dir}/nope.jwt (line 5)",
                ]
            ),
        )
        self.assertEqual(
            cm.exception.problems[0], Problem("listen.port", "must be between 0 and 65535", 1)
        )
        self.assertEqual(cm.exception.source, "<string>")

    def test_invalidTag(self) -> None:
        """A scalar that YAML cannot construct is reported, not raised."""
        self.assertEqual(
            self.problems(minimalWith("listen: {port: !!int eighty}")),
            [
                "listen.port: invalid value: invalid literal for int() with base 10: 'eighty' "
                "(line 4)"
            ],
        )


def blockModules(test: SynchronousTestCase, *names: str) -> None:
    """
    Make the modules C{names} look not installed until C{test} ends: C{import} fails and
    C{importlib.util.find_spec} finds nothing, even if they were imported already.
    """
    saved = {name: sys.modules[name] for name in names if name in sys.modules}

    def restore() -> None:
        for name in names:
            if name in saved:
                sys.modules[name] = saved[name]
            else:
                sys.modules.pop(name, None)

    test.addCleanup(restore)
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]


#: One sink of each type, each I{type} on the line of its index + 4.
ALL_SINKS = minimalWith(
    """\
    audit:
      sinks:
        - {type: s3, name: a, bucket: b}
        - {type: gcs, name: g, bucket: b}
        - {type: kafka, name: k, topic: t, bootstrap_servers: [k]}
        - {type: webhook, name: w, url: "https://siem.example/"}
    """
)


class SinkLibraryTests(ConfigTestCase):
    """A configured sink whose library (the sinks extra) is not installed is a config error."""

    def test_installed(self) -> None:
        """With the libraries installed (the dev extra has them all), every sink type is valid."""
        self.assertEqual(len(self.parse(ALL_SINKS).audit.sinks), 4)

    def test_missingLibrary(self) -> None:
        """
        Each sink type whose module is missing is reported at C{audit.sinks[N].type}, on the line
        of its type, naming the module (and its distribution) and the extra to install.
        """
        blockModules(self, "boto3", "google.cloud.storage", "confluent_kafka", "treq")
        install = "pip install 'rivano-mcpgw[sinks]'"
        self.assertEqual(
            self.problems(ALL_SINKS),
            [
                "audit.sinks[0].type: the s3 sink needs the Python module 'boto3', which is not "
                f"installed: {install} (line 6)",
                "audit.sinks[1].type: the gcs sink needs the Python module 'google.cloud.storage' "
                f"(from google-cloud-storage), which is not installed: {install} (line 7)",
                "audit.sinks[2].type: the kafka sink needs the Python module 'confluent_kafka' "
                f"(from confluent-kafka), which is not installed: {install} (line 8)",
                "audit.sinks[3].type: the webhook sink needs the Python module 'treq', which is "
                f"not installed: {install} (line 9)",
            ],
        )

    def test_missingLibraryOnlyForConfiguredTypes(self) -> None:
        """Only the libraries of configured sink types are needed; others may be missing."""
        blockModules(self, "boto3", "google.cloud.storage", "confluent_kafka")
        config = self.parse(
            minimalWith("audit: {sinks: [{type: webhook, name: w, url: 'https://x/'}]}")
        )
        self.assertEqual([s.name for s in config.audit.sinks], ["w"])

    def test_missingDependencyLibrary(self) -> None:
        """A missing library the sink imports besides its main one (botocore for s3) counts too."""
        blockModules(self, "botocore")
        self.assertEqual(
            self.problems(minimalWith("audit: {sinks: [{type: s3, name: a, bucket: b}]}")),
            [
                "audit.sinks[0].type: the s3 sink needs the Python module 'botocore', which is "
                "not installed: pip install 'rivano-mcpgw[sinks]' (line 4)"
            ],
        )

    def test_missingParentPackage(self) -> None:
        """A module whose parent package is missing is missing (no ImportError escapes)."""
        self.patch(
            sinks,
            "SINK_LIBRARIES",
            {**sinks.SINK_LIBRARIES, "gcs": (("mcpgw_test_absent.cloud.storage", "absent"),)},
        )
        self.assertEqual(
            self.problems(minimalWith("audit: {sinks: [{type: gcs, name: g, bucket: b}]}")),
            [
                "audit.sinks[0].type: the gcs sink needs the Python module "
                "'mcpgw_test_absent.cloud.storage' (from absent), which is not installed: "
                "pip install 'rivano-mcpgw[sinks]' (line 4)"
            ],
        )

    def test_reportedWithOtherProblems(self) -> None:
        """The missing library is one problem among the others of the same sink, in line order."""
        blockModules(self, "boto3")
        self.assertEqual(
            self.problems(
                minimalWith(
                    """\
                    audit:
                      sinks:
                        - type: s3
                          name: a
                          bukcet: b
                    """
                )
            ),
            [
                "audit.sinks[0]: missing required key 'bucket' (line 6)",
                "audit.sinks[0].type: the s3 sink needs the Python module 'boto3', which is not "
                "installed: pip install 'rivano-mcpgw[sinks]' (line 6)",
                "audit.sinks[0].bukcet: unknown key; did you mean 'bucket'? (line 8)",
            ],
        )


class PolicyConditionTests(ConfigTestCase):
    """Contract part 2: method, when, rate_limit.per, redact_results, default_action maps."""

    def test_designExample(self) -> None:
        """The policy example of the contract parses into rules with conditions."""
        config = self.parse(
            minimalWith(
                """\
                policy:
                  default_action: deny
                  rules:
                    - id: ci-reads
                      action: allow
                      match: {list: [read_file, list_dir]}
                      when:
                        keys: [ci-bot, "deploy-*"]
                    - id: finance-pays
                      action: allow
                      match: {prefix: payments_}
                      when:
                        identities: ["spiffe://corp.example/finance/*"]
                        clients: [10.20.0.0/16]
                    - id: no-sql-writes
                      action: deny
                      match: {exact: execute_sql}
                      when:
                        arguments:
                          query: {regex: '(?i)^\\s*(insert|update|delete|drop|alter|truncate)\\b'}
                    - id: docs-only
                      action: allow
                      method: resources/read
                      match: {prefix: "file:///srv/docs/"}
                    - id: per-key-budget
                      action: rate_limit
                      match: {glob: "*"}
                      rate_limit: {rate: 5, burst: 10, per: key}
                      redact_results: [aws_access_key, '(?i)ssn:\\s*\\d{3}-\\d{2}-\\d{4}']
                """
            )
        )
        rules = config.policy.rules
        self.assertEqual(rules[0].when, Conditions(keys=("ci-bot", "deploy-*")))
        self.assertEqual(rules[0].method, "tools/call")
        self.assertEqual(
            rules[1].when,
            Conditions(identities=("spiffe://corp.example/finance/*",), clients=("10.20.0.0/16",)),
        )
        self.assertEqual(
            rules[2].when,
            Conditions(
                arguments=(
                    (
                        "query",
                        MatchSpec("regex", r"(?i)^\s*(insert|update|delete|drop|alter|truncate)\b"),
                    ),
                )
            ),
        )
        self.assertEqual((rules[3].method, rules[3].when), ("resources/read", None))
        self.assertEqual(rules[4].rate_limit, RateLimitSpec(5.0, 10.0, "key"))
        self.assertEqual(
            rules[4].redact_results, ("aws_access_key", r"(?i)ssn:\s*\d{3}-\d{2}-\d{4}")
        )
        self.assertEqual(config.policy.default_action, "deny")
        self.assertIsNone(config.policy.default_actions)
        self.assertEqual(config.policy.defaultFor("resources/read"), "allow")

    def test_partOneMeaningKept(self) -> None:
        """A part-1 rule has no conditions, method tools/call, per session, no result patterns."""
        config = self.parse(
            minimalWith(
                """\
                policy:
                  rules:
                    - {id: r, action: rate_limit, match: {exact: a}, rate_limit: {rate: 1}}
                """
            )
        )
        (r,) = config.policy.rules
        self.assertEqual(
            r, PolicyRule("r", "rate_limit", MatchSpec("exact", "a"), (), RateLimitSpec(1.0, 1.0))
        )
        self.assertEqual(
            (r.method, r.when, r.redact_results, r.rate_limit.per),
            ("tools/call", None, (), "session"),
        )

    def test_defaultActionMap(self) -> None:
        """default_action as a map decides per method; a method left out is allowed."""
        config = self.parse(
            minimalWith("policy: {default_action: {resources/read: deny, prompts/get: deny}}")
        )
        p = config.policy
        self.assertEqual(
            p.default_actions,
            (("tools/call", "allow"), ("resources/read", "deny"), ("prompts/get", "deny")),
        )
        self.assertEqual(
            [p.defaultFor(m) for m in ("tools/call", "resources/read", "prompts/get")],
            ["allow", "deny", "deny"],
        )
        self.assertEqual(p.default_action, "allow")
        toolsDeny = self.parse(minimalWith("policy: {default_action: {tools/call: deny}}"))
        self.assertEqual(toolsDeny.policy.default_action, "deny")

    def test_clientsNormalised(self) -> None:
        """Addresses become single-address networks; IPv6 is accepted."""
        config = self.parse(
            minimalWith(
                """\
                policy:
                  rules:
                    - id: r
                      action: deny
                      match: {glob: "*"}
                      when: {clients: [127.0.0.1, "2001:db8::/32", "::1"]}
                """
            )
        )
        when = config.policy.rules[0].when
        assert when is not None
        self.assertEqual(when.clients, ("127.0.0.1/32", "2001:db8::/32", "::1/128"))

    def test_problems(self) -> None:
        """Every new key is checked, with a hint where a close valid value exists."""
        self.assertEqual(
            self.problems(
                minimalWith(
                    """\
                    policy:
                      default_action: {tools/cal: deny, prompts/get: maybe}
                      rules:
                        - id: a
                          action: allow
                          method: tool/call
                          match: {glob: '[z-a]'}
                          when: {key: [x], clients: [10.20.0.1/16, nowhere], identities: []}
                        - id: b
                          action: deny
                          match: {exact: execute_sql}
                          when:
                            arguments:
                              a..b: {regex: x}
                              q: {regex: '('}
                              r: {exact: 5}
                              s: {}
                        - id: c
                          action: rate_limit
                          match: {glob: '*'}
                          rate_limit: {rate: 5, per: keys}
                          redact_results: [aws_acess_key, '(', 'a*']
                        - {id: d, action: redact, redact: [jwt], method: resources/read, match: {prefix: f}, when: {}}
                        - {id: e, action: deny, method: resources/read, match: {prefix: x}, when: {arguments: {a: {exact: b}}}}
                        - {id: f, action: deny, match: {prefix: x}, when: {keys: [a], arguments: {}}}
                    """
                )
            ),
            [
                "policy.default_action.tools/cal: unknown key; did you mean 'tools/call'? (line 5)",
                "policy.default_action.prompts/get: must be one of allow, deny, got 'maybe' (line 5)",
                "policy.rules[0].method: must be one of tools/call, resources/read, prompts/get, "
                "got 'tool/call'; did you mean 'tools/call'? (line 9)",
                "policy.rules[0].match.glob: glob '[z-a]' can never match (an empty range) (line 10)",
                "policy.rules[0].when.key: unknown key; did you mean 'keys'? (line 11)",
                "policy.rules[0].when.clients[0]: '10.20.0.1/16' has host bits set; did you mean "
                "'10.20.0.0/16'? (line 11)",
                "policy.rules[0].when.clients[1]: must be an IP address or a network (CIDR, e.g. "
                "10.0.0.0/8), got 'nowhere' (line 11)",
                "policy.rules[0].when.identities: must not be empty (line 11)",
                "policy.rules[1].when.arguments.a..b: invalid argument path 'a..b' (dots separate "
                "keys) (line 17)",
                "policy.rules[1].when.arguments.q.regex: invalid regular expression: missing ), "
                "unterminated subpattern at position 0 (line 18)",
                "policy.rules[1].when.arguments.r.exact: must be a string, got integer (quote the "
                "value) (line 19)",
                "policy.rules[1].when.arguments.s: must have exactly one of exact, prefix, glob, "
                "regex, list (line 20)",
                "policy.rules[2].rate_limit.per: must be one of session, key, identity, client, "
                "global, got 'keys'; did you mean 'key'? (line 24)",
                "policy.rules[2].redact_results[0]: unknown built-in redaction 'aws_acess_key'; "
                "did you mean 'aws_access_key'? (line 25)",
                "policy.rules[2].redact_results[1]: invalid regular expression: missing ), "
                "unterminated subpattern at position 0 (line 25)",
                "policy.rules[2].redact_results[2]: must not match the empty string (line 25)",
                "policy.rules[3].action: redact rewrites arguments: resources/read has none "
                "(line 26)",
                "policy.rules[3].when: must have at least one of keys, identities, clients, "
                "arguments, claims, scopes (line 26)",
                "policy.rules[4].when.arguments: resources/read has no arguments (line 27)",
                "policy.rules[5].when.arguments: must not be empty (line 28)",
            ],
        )


class ExternalAuthTests(ConfigTestCase):
    """C{auth.external}: the identity header of an auth proxy and the peers trusted to set it."""

    def test_parsed(self) -> None:
        """The header name is kept as written; networks are normalised."""
        config = self.parse(
            minimalWith(
                """\
                auth:
                  external:
                    identity_header: X-Forwarded-Email
                    trusted_proxies: [10.0.0.0/8, 127.0.0.1]
                """
            )
        )
        self.assertEqual(
            config.auth,
            AuthConfig(
                external=ExternalAuthConfig("X-Forwarded-Email", ("10.0.0.0/8", "127.0.0.1/32"))
            ),
        )

    def test_problems(self) -> None:
        """Only without API keys; a plain header the gateway does not own; sound networks."""
        self.assertEqual(
            self.problems(
                minimalWith(
                    """\
                    auth:
                      enabled: true
                      keys: [{id: k, hash: $argon2id$x}]
                      external:
                        identity_header: Authorization
                        trusted_proxies: [10.0.0.1/8, proxy.local]
                        trusted: []
                    """
                )
            ),
            [
                "auth.external: is only used with auth.enabled: false (an auth proxy "
                "authenticates the caller) (line 8)",
                "auth.external.identity_header: 'Authorization' cannot name the caller: the "
                "gateway or the protocol owns it (line 8)",
                "auth.external.trusted_proxies[0]: '10.0.0.1/8' has host bits set; did you mean "
                "'10.0.0.0/8'? (line 9)",
                "auth.external.trusted_proxies[1]: must be an IP address or a network (CIDR, "
                "e.g. 10.0.0.0/8), got 'proxy.local' (line 9)",
                "auth.external.trusted: unknown key; did you mean 'trusted_proxies'? (line 10)",
            ],
        )
        self.assertEqual(
            self.problems(
                minimalWith(
                    """\
                    auth:
                      external: {identity_header: "X User", trusted_proxies: []}
                    """
                )
            ),
            [
                "auth.external.identity_header: invalid header name 'X User' (line 5)",
                "auth.external.trusted_proxies: must not be empty (line 5)",
            ],
        )
        for header in ("Mcp-Session-Id", "X-Forwarded-For", "Host", "Cookie"):
            problems = self.problems(
                minimalWith(
                    f"auth: {{external: {{identity_header: {header}, trusted_proxies: ['::1']}}}}"
                )
            )
            self.assertEqual(len(problems), 1, header)
            self.assertIn("cannot name the caller", problems[0])


class ImmutabilityTests(ConfigTestCase):
    """Parsed configs cannot change."""

    def test_frozen(self) -> None:
        """Assigning to any level of a parsed config raises."""
        config = self.parse(
            minimalWith("policy: {rules: [{id: r, action: deny, match: {list: [a]}}]}")
        )
        with self.assertRaises(attr.exceptions.FrozenInstanceError):
            config.listen = ListenConfig()  # type: ignore[misc]
        with self.assertRaises(attr.exceptions.FrozenInstanceError):
            config.upstreams[0].port = 1  # type: ignore[misc]
        with self.assertRaises(attr.exceptions.FrozenInstanceError):
            config.policy.rules[0].match.kind = "exact"  # type: ignore[misc]

    def test_tuplesAndHashable(self) -> None:
        """Collections are tuples, so a whole config is hashable."""
        config = self.parse(
            minimalWith("policy: {rules: [{id: r, action: deny, match: {list: [a]}}]}")
        )
        self.assertIsInstance(config.upstreams, tuple)
        self.assertIsInstance(config.policy.rules[0].match.value, tuple)
        self.assertEqual(
            hash(config),
            hash(
                self.parse(
                    minimalWith("policy: {rules: [{id: r, action: deny, match: {list: [a]}}]}")
                )
            ),
        )
