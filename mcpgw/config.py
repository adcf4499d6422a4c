# -*- test-case-name: tests.test_config -*-
"""
The YAML configuration: parsed and validated into immutable L{attr.frozen} objects.

L{load_config} reads a file, L{config_from_string} parses text; both return a L{Config} or raise
one L{ConfigError} listing I{every} problem found (each a L{Problem} with a dotted path, a message
and the 1-based line in the YAML), so C{mcpgw config check} can print them all at once.

Rules, beyond the schema in C{DESIGN.md}:
  - Every key of every mapping is checked: unknown keys are errors reported at their own path
    and line (C{listen.prot: unknown key; did you mean 'port'?}, with the suggestion when a known
    key is close), duplicate keys are errors, missing required keys are reported against the
    parent mapping. Scalars keep their YAML types: C{port: "80"} is a string
    and is rejected where an integer is expected; integers are accepted where numbers are.
  - C{null} for an optional section or key means its default.
  - C{${NAME}} (C{NAME} matching C{[A-Za-z_][A-Za-z0-9_]*}) is replaced by that environment
    variable in every string value, anywhere in the string and any number of times; the result is
    not expanded again. An unset variable, or a C{${} that does not form such a reference, is an
    error. There is no escape: a literal C{${} cannot be written. Only values the YAML typed as
    strings are expanded, so C{port: ${PORT}} is a string and is rejected.
  - Relative file paths are resolved against the config file's directory (for
    L{config_from_string}, its C{base_dir}, or the current directory). C{tls.cert_file},
    C{tls.key_file}, C{tls.client_ca}, C{license.file} and a webhook sink's C{ca_file} must exist
    when the config is loaded; C{audit.path} and C{audit.state_dir} are only resolved: the audit
    writer and the sinks create them.
  - C{listen.port: 0} asks the operating system for a free port (useful in tests).
  - Upstream paths must not be C{/healthz} or C{/readyz}; injected headers (C{upstreams[].headers},
    webhook C{headers}) must be HTTP tokens with Latin-1 values without CR, LF or NUL, and cannot
    set C{Host}, C{Content-Length}, C{Transfer-Encoding} or C{Connection}.
  - Sink names name files in C{audit.state_dir}, so they are limited to letters, digits, C{.},
    C{_} and C{-} (starting with a letter or digit).
  - A sink's library (the C{sinks} extra: boto3, google-cloud-storage, confluent-kafka, treq)
    must be installed: a missing one is reported at C{audit.sinks[N].type}, naming the module and
    the extra to install. It is looked up without being imported
    (L{mcpgw.audit.sinks.missingLibrary}).
  - C{tools.pinning.mode: off} written bare is YAML's C{false}; it is read as C{off}.
    C{tools.pinning.lock_file} (default C{tools.lock} beside the config) need not exist: a
    missing lock file approves nothing. Its contents are read when a generation is built
    (L{mcpgw.generation.buildGeneration}), not here.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import math
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import ClassVar, TypeAlias, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import attr
import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "BUILTIN_REDACTIONS",
    "PINNING_MODES",
    "POLICY_METHODS",
    "RATE_LIMIT_PER",
    "APIKey",
    "AdminConfig",
    "AuditConfig",
    "AuthConfig",
    "BatchConfig",
    "CheckpointConfig",
    "Conditions",
    "Config",
    "ConfigError",
    "ExternalAuthConfig",
    "GCSSinkConfig",
    "InputRateLimit",
    "IntegrityConfig",
    "IssuerConfig",
    "KafkaSinkConfig",
    "LicenseConfig",
    "LimitsConfig",
    "ListenConfig",
    "MatchSpec",
    "OAuthConfig",
    "ObjectLockConfig",
    "PinningConfig",
    "PolicyConfig",
    "PolicyRule",
    "Problem",
    "RateLimitSpec",
    "S3SinkConfig",
    "SinkConfig",
    "TLSConfig",
    "TelemetryConfig",
    "Timeouts",
    "ToolsConfig",
    "UpstreamConfig",
    "WebhookSinkConfig",
    "config_from_string",
    "load_config",
    "split_url",
]

#: Names usable in a redact rule's C{redact} list instead of a regular expression.
BUILTIN_REDACTIONS: frozenset[str] = frozenset({"bearer", "openai_key", "aws_access_key", "jwt"})

#: Kinds of C{match} in a policy rule.
MATCH_KINDS = ("exact", "prefix", "glob", "regex", "list")
#: Policy rule actions.
ACTIONS = ("allow", "deny", "redact", "rate_limit")
#: The methods policy decides, each by its target: the tool name (C{params.name}), the resource
#: URI (C{params.uri}), the prompt name (C{params.name}). A rule's C{method} is one of them.
POLICY_METHODS = ("tools/call", "resources/read", "prompts/get")
#: Whose token bucket a C{rate_limit} rule takes from (C{rate_limit.per}).
RATE_LIMIT_PER = ("session", "key", "identity", "client", "global")
#: Headers an auth proxy cannot name as C{auth.external.identity_header}: credentials, framing,
#: and the client-address headers the gateway itself rewrites or drops.
RESERVED_IDENTITY_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-real-ip",
    }
)
#: Gateway paths answered by the gateway itself, so no upstream may use them.
RESERVED_PATHS = frozenset({"/healthz", "/readyz"})
#: Headers the gateway owns; configured header injection may not set them.
FORBIDDEN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


# -- Problems ---------------------------------------------------------------------------------


@attr.frozen
class Problem:
    """
    One thing wrong with a configuration.

    @ivar path: where, dotted, with list indices: C{upstreams[0].url}; C{""} for the whole file.
    @ivar message: what is wrong.
    @ivar line: the 1-based line in the YAML text, when known.
    """

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return text if self.line is None else f"{text} (line {self.line})"


class ConfigError(Exception):
    """
    A configuration is invalid; C{str()} gives one problem per line.

    @ivar problems: every problem found, in line order.
    @ivar source: the config file's path, or C{"<string>"}.
    """

    def __init__(self, problems: Sequence[Problem], source: str = "<string>") -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


# -- The data model ---------------------------------------------------------------------------


@attr.frozen
class ListenConfig:
    """
    C{listen}: where the gateway accepts connections, and which C{Host}/C{Origin} it accepts.

    @ivar port: 0 to let the operating system pick a free port.
    @ivar allowed_origins: each C{scheme://host[:port]}.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    reuse_port: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    workers: int | str = 1
    admin: AdminConfig | None = None

    @property
    def workerCount(self) -> int:
        """C{workers} as a number: C{auto} is one per CPU this process may run on."""
        if isinstance(self.workers, int):
            return self.workers
        return max(1, len(os.sched_getaffinity(0)))


@attr.frozen
class AdminConfig:
    """
    C{listen.admin}: the admin listener (C{/metrics}, C{/healthz}, C{/readyz}); never the MCP
    listener's port.
    """

    host: str = "127.0.0.1"
    port: int = 9464


@attr.frozen
class TLSConfig:
    """C{tls}: native TLS; absolute paths of existing files."""

    cert_file: str
    key_file: str
    client_ca: str | None = None


@attr.frozen
class Timeouts:
    """C{upstreams[].timeouts}, in seconds; C{response} is until the first byte."""

    connect: float = 5.0
    response: float = 120.0


@attr.frozen
class UpstreamConfig:
    """
    One upstream MCP server, reached at gateway path C{path}.

    @ivar scheme: C{"http"} or C{"https"}, from C{url}.
    @ivar host: the URL's host, lower-case, without IPv6 brackets; IDNA-encoded (ASCII).
    @ivar port: the URL's port, or 80/443.
    @ivar target: the URL's path and C{?query} as a request target (C{b"/"} when empty),
        non-ASCII characters percent-encoded.
    @ivar headers: C{(name, value)} pairs injected into every upstream request.
    """

    name: str
    url: str
    scheme: str
    host: str
    port: int
    target: bytes
    path: str = "/mcp"
    headers: tuple[tuple[str, str], ...] = ()
    timeouts: Timeouts = Timeouts()

    @classmethod
    def from_url(
        cls,
        name: str,
        url: str,
        path: str = "/mcp",
        headers: tuple[tuple[str, str], ...] = (),
        timeouts: Timeouts = Timeouts(),
    ) -> UpstreamConfig:
        """
        Build an upstream, computing the URL fields (for code and tests that need one directly).

        @raise ValueError: C{url} is not a usable http/https URL.
        """
        scheme, host, port, target = split_url(url)
        return cls(name, url, scheme, host, port, target, path, headers, timeouts)


@attr.frozen
class APIKey:
    """An API key entry: its id, and the Argon2id hash of the key."""

    id: str
    hash: str


@attr.frozen
class ExternalAuthConfig:
    """
    C{auth.external}: the caller's identity as an auth proxy in front of mcpgw names it.

    @ivar identity_header: the proxy's header naming the caller (as written in the config).
    @ivar trusted_proxies: networks (normalised CIDR text) whose peers may set it; from any other
        peer the header is ignored (and removed before forwarding).
    """

    identity_header: str
    trusted_proxies: tuple[str, ...]


@attr.frozen
class IssuerConfig:
    """
    C{auth.oauth.issuers[]}: an authorization server whose access tokens are accepted, with
    exactly one source of its signing keys.

    @ivar issuer: the tokens' C{iss}, exactly.
    @ivar jwks_url: where its JWKS is fetched (http or https), or C{None}.
    @ivar jwks_file: the absolute path of a JWKS file (air-gapped hosts), or C{None}.
    @ivar ca_file: the absolute path of the trust root for C{jwks_url} (default: the system's).
    """

    issuer: str
    jwks_url: str | None = None
    jwks_file: str | None = None
    ca_file: str | None = None


@attr.frozen
class OAuthConfig:
    """
    C{auth.oauth}: mcpgw as the OAuth 2.1 resource server of every upstream (MCP authorization).

    @ivar public_url: how clients reach the gateway, without a trailing slash: an upstream's
        resource identifier (RFC 8707) is C{public_url} + its path.
    @ivar principal_claim: the claim naming the caller (the audit line's C{principal}).
    @ivar scopes_supported: advertised in the protected-resource metadata (RFC 9728).
    @ivar required_scopes: every token must carry all of these (else 403 insufficient_scope).
    """

    public_url: str
    issuers: tuple[IssuerConfig, ...]
    principal_claim: str = "sub"
    scopes_supported: tuple[str, ...] = ()
    required_scopes: tuple[str, ...] = ()

    def resource(self, path: str) -> str:
        """The resource identifier of the upstream at gateway path C{path}."""
        return self.public_url + path


@attr.frozen
class AuthConfig:
    """
    C{auth}: inbound authentication: API keys and/or OAuth access tokens when C{enabled} (off:
    an external proxy authenticates, and C{external} may say how it names the caller).
    """

    enabled: bool = False
    keys: tuple[APIKey, ...] = ()
    external: ExternalAuthConfig | None = None
    oauth: OAuthConfig | None = None


@attr.frozen
class MatchSpec:
    """
    A policy rule's C{match}: which tool names it applies to.

    @ivar kind: one of L{MATCH_KINDS}.
    @ivar value: the pattern; a tuple of names for C{list}.
    """

    kind: str
    value: str | tuple[str, ...]


@attr.frozen
class RateLimitSpec:
    """
    A token bucket: C{rate} tokens a second, holding at most C{burst}, one per C{per} value.

    @ivar per: one of L{RATE_LIMIT_PER}: whose bucket a call takes from.
    """

    rate: float
    burst: float
    per: str = "session"


@attr.frozen
class Conditions:
    """
    A policy rule's C{when}: every condition given must hold for the rule to match; an empty one
    is not a condition.

    @ivar keys: globs on the authenticated API key id.
    @ivar identities: globs on the principal (key id, certificate or external identity).
    @ivar clients: networks (normalised CIDR text) the client address must be in.
    @ivar arguments: C{(path, matcher)}: the argument at the dotted path, as text, must match.
    @ivar claims: C{(claim, globs)}: a value of the OAuth token's claim (any item of a list
        claim) must match one of the globs.
    @ivar scopes: every one of these scopes must be granted to the OAuth token.
    """

    keys: tuple[str, ...] = ()
    identities: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()
    arguments: tuple[tuple[str, MatchSpec], ...] = ()
    claims: tuple[tuple[str, tuple[str, ...]], ...] = ()
    scopes: tuple[str, ...] = ()

    @property
    def onCaller(self) -> bool:
        """Whether a condition is about the caller (who, from where)."""
        return bool(self.keys or self.identities or self.clients or self.claims or self.scopes)


@attr.frozen
class PolicyRule:
    """
    One policy rule.

    @ivar redact: built-in names (L{BUILTIN_REDACTIONS}) or regular expressions; non-empty
        exactly when C{action} is C{redact}.
    @ivar rate_limit: set exactly when C{action} is C{rate_limit}.
    @ivar method: one of L{POLICY_METHODS}: the rule only matches calls of that method.
    @ivar when: conditions on the caller and the arguments, or C{None}.
    @ivar redact_results: built-in names or regular expressions scrubbed from the results of the
        calls this rule decides (any action).
    """

    id: str
    action: str
    match: MatchSpec
    redact: tuple[str, ...] = ()
    rate_limit: RateLimitSpec | None = None
    method: str = "tools/call"
    when: Conditions | None = None
    redact_results: tuple[str, ...] = ()


@attr.frozen
class PolicyConfig:
    """
    C{policy}: rules in order (first match wins), else the default action of the call's method.

    @ivar default_action: the default for C{tools/call}. Written as one action it is that, and
        C{resources/read} and C{prompts/get} default to C{allow} (the part-1 meaning).
    @ivar default_actions: C{(method, action)} for each method of L{POLICY_METHODS} when
        C{default_action} was written as a map (a method left out: C{allow}); C{None} when it
        was one action.
    """

    default_action: str = "allow"
    filter_tools_list: bool = True
    rules: tuple[PolicyRule, ...] = ()
    default_actions: tuple[tuple[str, str], ...] | None = None

    def defaultFor(self, method: str) -> str:
        """
        @return: the action for a call of C{method} (one of L{POLICY_METHODS}) no rule matches.
        """
        if self.default_actions is None:
            return self.default_action if method == "tools/call" else "allow"
        return dict(self.default_actions).get(method, "allow")


@attr.frozen
class BatchConfig:
    """A sink ships a batch when it has C{max_lines} lines or is C{max_seconds} old."""

    max_lines: int
    max_seconds: float


@attr.frozen
class ObjectLockConfig:
    """S3 Object Lock retention for each object written."""

    mode: str
    retain_days: int


@attr.frozen
class S3SinkConfig:
    """An audit sink writing batches to S3 (or an S3-compatible endpoint)."""

    type: ClassVar[str] = "s3"
    name: str
    bucket: str
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    object_lock: ObjectLockConfig | None = None
    batch: BatchConfig = BatchConfig(10000, 60.0)


@attr.frozen
class GCSSinkConfig:
    """An audit sink writing batches to Google Cloud Storage."""

    type: ClassVar[str] = "gcs"
    name: str
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    batch: BatchConfig = BatchConfig(10000, 60.0)
    #: The bucket's retention policy must keep objects at least this many days (checked at start).
    min_retention_days: int | None = None


@attr.frozen
class KafkaSinkConfig:
    """
    An audit sink producing each line to a Kafka topic.

    @ivar config: extra librdkafka settings; values are strings (YAML booleans become
        C{"true"}/C{"false"}).
    """

    type: ClassVar[str] = "kafka"
    name: str
    bootstrap_servers: tuple[str, ...]
    topic: str
    config: tuple[tuple[str, str], ...] = ()


@attr.frozen
class WebhookSinkConfig:
    """An audit sink POSTing batches to an HTTP(S) endpoint."""

    type: ClassVar[str] = "webhook"
    name: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    ca_file: str | None = None
    batch: BatchConfig = BatchConfig(500, 5.0)


SinkConfig: TypeAlias = S3SinkConfig | GCSSinkConfig | KafkaSinkConfig | WebhookSinkConfig


@attr.frozen
class CheckpointConfig:
    """C{audit.integrity.checkpoint}: a checkpoint line every C{lines} lines or C{seconds}."""

    lines: int = 10000
    seconds: float = 60.0


@attr.frozen
class IntegrityConfig:
    """
    C{audit.integrity}: the hash chain (C{chain}) and signed checkpoints (C{signing_key}, an
    Ed25519 private key in PEM, read when the config is loaded).
    """

    chain: bool = False
    signing_key: str | None = None
    checkpoint: CheckpointConfig = CheckpointConfig()


@attr.frozen
class AuditConfig:
    """C{audit}: the canonical file (absolute C{path}, C{state_dir}) and its sinks."""

    path: str = "audit.jsonl"
    fsync: str = "interval"
    state_dir: str = "state"
    sinks: tuple[SinkConfig, ...] = ()
    integrity: IntegrityConfig = IntegrityConfig()
    on_write_failure: str = "serve"


#: The samplers of C{OTEL_TRACES_SAMPLER} (and C{telemetry.sampler}) that mcpgw implements.
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


@attr.frozen
class SamplerConfig:
    """
    C{telemetry.sampler} (or C{OTEL_TRACES_SAMPLER} / C{OTEL_TRACES_SAMPLER_ARG}).

    @ivar type: one of L{SAMPLERS}.
    @ivar ratio: the share of traces kept by the C{traceidratio} samplers, 0 to 1.
    """

    type: str = "parentbased_always_on"
    ratio: float = 1.0


@attr.frozen
class TelemetryConfig:
    """
    C{telemetry}: OTLP/HTTP trace export (none without C{otlp_endpoint}).

    Each value is the YAML's when set there, else the OpenTelemetry environment variable's
    (C{OTEL_EXPORTER_OTLP_TRACES_ENDPOINT}, C{OTEL_EXPORTER_OTLP_ENDPOINT} + C{/v1/traces},
    C{OTEL_SERVICE_NAME}, C{OTEL_EXPORTER_OTLP_[TRACES_]HEADERS}, C{OTEL_RESOURCE_ATTRIBUTES},
    C{OTEL_TRACES_SAMPLER} and C{_ARG}), else the default.

    @ivar headers: added to every export request (e.g. a vendor's API key); kept out of
        C{repr}.
    @ivar resource_attributes: extra attributes of the exported resource (C{service.name} and
        the gateway's own attributes are set from the other keys).
    """

    otlp_endpoint: str | None = None
    service_name: str = "mcpgw"
    environment: str | None = None
    headers: tuple[tuple[str, str], ...] = attr.field(default=(), repr=False)
    resource_attributes: tuple[tuple[str, str], ...] = ()
    sampler: SamplerConfig = SamplerConfig()


@attr.frozen
class InputRateLimit:
    """The per-client-address token bucket applied before parsing or auth."""

    rate: float
    burst: float


@attr.frozen
class LimitsConfig:
    """C{limits}."""

    max_body_bytes: int = 4194304
    input_rate_limit: InputRateLimit | None = None
    max_header_bytes: int = 16384
    header_timeout: float = 10.0
    body_timeout: float = 60.0


def _masked(url: str) -> str:
    """A Redis URL with its password (if any) replaced by C{***}, for logs and C{/readyz}."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@attr.frozen
class RedisConfig:
    """
    C{state.redis}: the Redis (or Valkey) server that holds the shared token buckets.

    @ivar url: C{redis://[user:password@]host[:port][/db]} or C{rediss://...} (TLS), with
        C{${ENV}} already expanded; kept out of C{repr} (it may carry a password): use
        L{display}.
    @ivar timeout_ms: how long a decision waits for Redis before L{on_error} applies.
    @ivar on_error: C{allow} or C{deny}: the decision when Redis does not answer in time (or is
        not connected).
    @ivar ca_file: with C{rediss://}, the only trust root for the server's certificate
        (default: the system's trust store).
    @ivar lease_tokens: how many tokens a process may take from a bucket at once and keep for
        its next calls (L{mcpgw.redisstate}): C{auto} (L{lease_size}), or an integer (0 and 1:
        one token per call).
    """

    url: str = attr.field(default="redis://127.0.0.1:6379/0", repr=False)
    key_prefix: str = "mcpgw:"
    timeout_ms: float = 50.0
    on_error: str = "allow"
    ca_file: str | None = None
    lease_tokens: int | str = "auto"

    @property
    def display(self) -> str:
        """The URL with its password masked."""
        return _masked(self.url)


#: The most tokens C{state.redis.lease_tokens} may ask for, and C{auto}'s most.
MAX_LEASE_TOKENS = 1000
AUTO_LEASE_MAX = 16
#: C{auto}: one token of lease per this many of the bucket's burst.
AUTO_LEASE_PER_BURST = 64


def lease_size(lease_tokens: int | str, burst: float) -> int:
    """
    The tokens one take asks Redis for (1: no lease) for a bucket of C{burst}: C{auto} is
    C{min(16, floor(burst / 64))} (a bucket of burst < 128 is never leased), an integer N is N.
    """
    if lease_tokens == "auto":
        n = min(AUTO_LEASE_MAX, int(burst // AUTO_LEASE_PER_BURST))
    else:
        assert isinstance(lease_tokens, int)
        n = lease_tokens
    return max(1, n)


@attr.frozen
class StateConfig:
    """
    C{state}: where rate-limit buckets, the input limit and the auth brute-force throttle live
    (C{memory}: in each process; C{redis}: shared by every worker and replica).
    """

    backend: str = "memory"
    redis: RedisConfig = RedisConfig()


@attr.frozen
class LicenseConfig:
    """C{license}: the absolute path of the license file, if any."""

    file: str | None = None


#: C{tools.pinning.mode} values.
PINNING_MODES = ("off", "warn", "enforce")


@attr.frozen
class PinningConfig:
    """
    C{tools.pinning}: hold back tool definitions that changed since approval
    (L{mcpgw.pinning}).

    @ivar lock_file: the absolute path of the lock file (it may not exist yet: nothing is
        approved then).
    """

    mode: str = "off"
    lock_file: str = "tools.lock"


@attr.frozen
class ToolsConfig:
    """C{tools}."""

    pinning: PinningConfig = PinningConfig()


@attr.frozen
class Config:
    """
    A whole, valid configuration.

    @ivar source: the config file's path, or C{"<string>"}.
    """

    upstreams: tuple[UpstreamConfig, ...]
    listen: ListenConfig = ListenConfig()
    tls: TLSConfig | None = None
    auth: AuthConfig = AuthConfig()
    policy: PolicyConfig = PolicyConfig()
    audit: AuditConfig = AuditConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    limits: LimitsConfig = LimitsConfig()
    license: LicenseConfig = LicenseConfig()
    tools: ToolsConfig = ToolsConfig()
    state: StateConfig = StateConfig()
    source: str = "<string>"


# -- Entry points -----------------------------------------------------------------------------


def load_config(path: str) -> Config:
    """
    Read and validate the config file at C{path}.

    @raise ConfigError: the file cannot be read, or the configuration is invalid.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError([Problem("", f"cannot read {path}: {reason}")], path) from None
    return config_from_string(text, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


def config_from_string(
    text: str,
    source: str = "<string>",
    base_dir: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """
    Parse and validate a configuration.

    @param text: the YAML.
    @param source: where it came from (kept as L{Config.source} and L{ConfigError.source}).
    @param base_dir: the directory relative paths are resolved against (default: the current
        directory).
    @param environ: the variables C{${NAME}} expands from (default: C{os.environ}).
    @raise ConfigError: listing every problem found.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        message = f"{e.problem} ({e.context})" if e.context else str(e.problem)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError([Problem("", f"invalid YAML: {message}", line)], source) from None
    except yaml.reader.ReaderError as e:
        message = f"invalid YAML: unacceptable character #x{e.character:04x}: {e.reason}"
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError([Problem("", message, line)], source) from None
    if root is None or (isinstance(root, ScalarNode) and root.tag == "tag:yaml.org,2002:null"):
        raise ConfigError([Problem("", "config file is empty")], source)
    w = _Walker(os.environ if environ is None else environ, os.path.abspath(base_dir or "."))
    config = _parse_config(w, root, source)
    if w.problems:
        raise ConfigError([problem for _, problem in sorted(w.problems)], source)
    return config


# -- The walker -------------------------------------------------------------------------------

T = TypeVar("T")

_NULL_TAG = "tag:yaml.org,2002:null"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_REF = re.compile(r"\$\{(?P<name>[^}]*)(?P<close>\}?)")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SINK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOST = re.compile(r"[A-Za-z0-9._:-]+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_TYPE_NAMES = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
    list: "list",
    dict: "mapping",
}


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL_TAG


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def split_url(url: str) -> tuple[str, str, int, bytes]:
    """
    Split an upstream URL.

    @return: C{(scheme, host, port, target)}, as in L{UpstreamConfig}.
    @raise ValueError: C{url} is not an http/https URL with a host and a valid port, or has
        credentials in it.
    """
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. a bad IPv6 literal
        raise ValueError("is not a valid URL") from None
    if not parts.hostname:
        raise ValueError("must include a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not include credentials (use headers)")
    host = parts.hostname
    try:
        if ":" in host:
            ipaddress.IPv6Address(host)
        else:
            host = host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        raise ValueError(f"has an invalid host {parts.hostname!r}") from None
    if not _HOST.fullmatch(host):
        raise ValueError(f"has an invalid host {parts.hostname!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    scheme = parts.scheme.lower()
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    encoded = quote(target, safe="/?:@!$&'()*+,;=-._~%").encode("ascii")
    return scheme, host, port or (443 if scheme == "https" else 80), encoded


class _Walker:
    """
    Converts YAML nodes into values, collecting every problem instead of stopping at the first.

    Each converter takes a node and its dotted path and returns the value, or C{None} after
    recording a L{Problem}.
    """

    def __init__(self, environ: Mapping[str, str], base_dir: str) -> None:
        self.environ = environ
        self.base_dir = base_dir
        #: C{((line, column, sequence), problem)}: sorted, the problems in document order.
        self.problems: list[tuple[tuple[int, int, int], Problem]] = []
        self._constructor = SafeConstructor()

    def report(self, path: str, message: str, node: Node | None) -> None:
        """Record a problem at C{path}, on C{node}'s line."""
        mark = node.start_mark if node is not None else None
        where = (mark.line, mark.column) if mark is not None else (1 << 30, 0)
        problem = Problem(path, message, _line(node) if node is not None else None)
        self.problems.append(((*where, len(self.problems)), problem))

    def scalar(self, node: Node, path: str) -> object:
        """The Python value of a scalar, or of a collection: C{[]} / C{{}} (for type names)."""
        if isinstance(node, SequenceNode):
            return []
        if isinstance(node, MappingNode):
            return {}
        try:
            return self._constructor.construct_object(node, deep=True)
        except ConstructorError as e:
            self.report(path, f"invalid value: {e.problem}", node)
        except (ValueError, TypeError, OverflowError) as e:  # e.g. "!!int eighty"
            self.report(path, f"invalid value: {e}", node)
        self._constructor.recursive_objects.clear()  # left behind by the failed construction
        return _INVALID

    def wrong_type(self, path: str, expected: str, node: Node, value: object) -> None:
        """Report that C{value} (from L{scalar}) is not what was C{expected}."""
        if value is _INVALID:
            return
        got = _TYPE_NAMES.get(type(value), type(value).__name__)
        quotable = expected == "a string" and isinstance(node, ScalarNode) and value is not None
        hint = " (quote the value)" if quotable else ""
        self.report(path, f"must be {expected}, got {got}{hint}", node)

    def string(self, node: Node, path: str, *, nonempty: bool = True) -> str | None:
        """A string, with C{${NAME}} expanded."""
        value = self.scalar(node, path)
        if value is _INVALID:
            return None
        if not isinstance(value, str):
            self.wrong_type(path, "a string", node, value)
            return None
        value = self._expand(value, path, node)
        if value is not None and nonempty and not value:
            self.report(path, "must not be empty", node)
            return None
        return value

    def _expand(self, value: str, path: str, node: Node) -> str | None:
        ok = True

        def substitute(m: re.Match[str]) -> str:
            nonlocal ok
            name = m["name"]
            if not m["close"] or not _ENV_NAME.fullmatch(name):
                self.report(path, f"malformed variable reference {m[0]!r}: use ${{NAME}}", node)
            elif name not in self.environ:
                self.report(path, f"environment variable {name!r} is not set", node)
            else:
                return self.environ[name]
            ok = False
            return m[0]

        expanded = _ENV_REF.sub(substitute, value)
        return expanded if ok else None

    def integer(
        self, node: Node, path: str, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        """An integer within C{[minimum, maximum]}."""
        value = self.scalar(node, path)
        if value is _INVALID:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            self.wrong_type(path, "an integer", node, value)
            return None
        if minimum is not None and maximum is not None and not minimum <= value <= maximum:
            self.report(path, f"must be between {minimum} and {maximum}", node)
        elif minimum is not None and value < minimum:
            self.report(path, f"must be at least {minimum}", node)
        else:
            return value
        return None

    def number(
        self, node: Node, path: str, *, above: float | None = None, minimum: float | None = None
    ) -> float | None:
        """A finite number (integers accepted), C{> above} and C{>= minimum}."""
        value = self.scalar(node, path)
        if value is _INVALID:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.wrong_type(path, "a number", node, value)
            return None
        number = float(value)
        if not math.isfinite(number):
            self.report(path, "must be a finite number", node)
        elif above is not None and number <= above:
            self.report(path, f"must be greater than {above:g}", node)
        elif minimum is not None and number < minimum:
            self.report(path, f"must be at least {minimum:g}", node)
        else:
            return number
        return None

    def boolean(self, node: Node, path: str) -> bool | None:
        """C{true} or C{false}."""
        value = self.scalar(node, path)
        if value is _INVALID:
            return None
        if not isinstance(value, bool):
            self.wrong_type(path, "true or false", node, value)
            return None
        return value

    def choice(self, node: Node, path: str, choices: Sequence[str]) -> str | None:
        """One of C{choices} (a close one is suggested)."""
        value = self.string(node, path, nonempty=False)
        if value is not None and value not in choices:
            self.report(
                path,
                f"must be one of {', '.join(choices)}, got {value!r}{_hint(value, choices)}",
                node,
            )
            return None
        return value

    def url(self, node: Node, path: str) -> str | None:
        """An http or https URL with a host."""
        value = self.string(node, path)
        if value is not None:
            try:
                split_url(value)
            except ValueError as e:
                self.report(path, str(e), node)
                return None
        return value

    def file(self, node: Node, path: str, *, must_exist: bool) -> str | None:
        """A path, made absolute against the base directory; optionally an existing file."""
        value = self.string(node, path)
        if value is None:
            return None
        resolved = os.path.normpath(os.path.join(self.base_dir, value))
        if must_exist and not os.path.exists(resolved):
            self.report(path, f"file not found: {resolved}", node)
        elif must_exist and not os.path.isfile(resolved):
            self.report(path, f"not a regular file: {resolved}", node)
        else:
            return resolved
        return None

    def sequence(self, node: Node, path: str) -> list[tuple[str, Node]] | None:
        """A list: its items, each with its path C{path[i]}."""
        if not isinstance(node, SequenceNode):
            self.wrong_type(path, "a list", node, self.scalar(node, path))
            return None
        return [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]

    def strings(
        self,
        node: Node,
        path: str,
        *,
        nonempty: bool = False,
        check: Callable[[str], str | None] | None = None,
    ) -> tuple[str, ...] | None:
        """
        A list of non-empty strings; with C{nonempty}, at least one.

        @param check: returns a problem's message for an invalid item, else C{None}.
        """
        items = self.sequence(node, path)
        if items is None:
            return None
        if nonempty and not items:
            self.report(path, "must not be empty", node)
            return None
        values = []
        for p, item in items:
            value = self.string(item, p)
            if value is not None and check is not None and (problem := check(value)):
                self.report(p, problem, item)
                value = None
            values.append(value)
        return tuple(v for v in values if v is not None) if None not in values else None

    def pairs(self, node: Node, path: str) -> list[tuple[str, str, Node, Node]] | None:
        """
        A free-form mapping: C{(key, path, key node, value node)} for each entry. YAML merge
        keys (C{<<: *anchor}) are applied; the mapping's own keys override merged ones.
        """
        if not isinstance(node, MappingNode):
            self.wrong_type(path, "a mapping", node, self.scalar(node, path))
            return None
        own = {id(key_node) for key_node, _ in node.value}
        flat = MappingNode(node.tag, list(node.value), node.start_mark, node.end_mark)
        try:
            self._constructor.flatten_mapping(flat)
        except ConstructorError as e:
            self.report(path, f"invalid merge: {e.problem}", node)
            return None
        result: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in flat.value:
            key = self.scalar(key_node, path)
            if key is _INVALID:
                continue
            if not isinstance(key, str):
                got = _TYPE_NAMES.get(type(key), type(key).__name__)
                self.report(path, f"keys must be strings, got {got}", key_node)
            elif key in result and id(result[key][0]) in own:
                self.report(path, f"duplicate key {key!r}", key_node)
            else:
                result[key] = (key_node, value_node)
        return [(key, _join(path, key), k, v) for key, (k, v) in result.items()]

    def mapping(self, node: Node, path: str, keys: Collection[str]) -> _Map | None:
        """A mapping whose keys must be among C{keys} (others are reported and ignored)."""
        entries = self.pairs(node, path)
        if entries is None:
            return None
        m = _Map(self, node, path, {key: (k, v) for key, _, k, v in entries})
        m.restrict(keys)
        return m

    def headers(self, node: Node, path: str) -> tuple[tuple[str, str], ...] | None:
        """Injected HTTP headers: C{{name: value}}."""
        entries = self.pairs(node, path)
        if entries is None:
            return None
        result = []
        seen: set[str] = set()
        ok = True
        for name, p, key_node, value_node in entries:
            value = self.string(value_node, p, nonempty=False)
            if not _TOKEN.fullmatch(name):
                self.report(path, f"invalid header name {name!r}", key_node)
            elif name.lower() in FORBIDDEN_HEADERS:
                self.report(
                    path, f"header {name!r} is set by the gateway and cannot be injected", key_node
                )
            elif name.lower() in seen:
                self.report(path, f"duplicate header {name!r}", key_node)
            elif value is not None and any(c in value for c in "\r\n\0"):
                self.report(p, "must not contain CR, LF or NUL", value_node)
            elif value is not None and not _latin1(value):
                self.report(p, "must be Latin-1 text", value_node)
            elif value is not None:
                seen.add(name.lower())
                result.append((name, value))
                continue
            ok = False
        return tuple(result) if ok else None


def _hint(value: str, known: Iterable[str]) -> str:
    """C{"; did you mean 'x'?"} when a known value is close to C{value}, else C{""}."""
    close = difflib.get_close_matches(value, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _latin1(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


class _Invalid:
    """The value of a scalar that could not be constructed (already reported)."""


_INVALID = _Invalid()


class _Map:
    """
    A mapping being read: typed accessors by key, each returning the default when the key is
    absent or C{null} (or, after reporting a problem, when the value is wrong).
    """

    def __init__(
        self, walker: _Walker, node: Node, path: str, entries: dict[str, tuple[Node, Node]]
    ) -> None:
        self.w = walker
        self.node = node
        self.path = path
        self.entries = entries

    def restrict(self, keys: Collection[str], what: str = "") -> None:
        """
        Report and drop every key not in C{keys}, suggesting a close known key. The problem is
        reported at the unknown key's own path (C{listen.prot}), on its line.

        @param what: appended to the message, e.g. C{" for a kafka sink"}.
        """
        for key, (key_node, _) in list(self.entries.items()):
            if key not in keys:
                self.w.report(self.at(key), f"unknown key{what}{_hint(key, keys)}", key_node)
                del self.entries[key]

    def at(self, key: str) -> str:
        """The path of C{key}."""
        return _join(self.path, key)

    def get(self, key: str, *, required: bool = False) -> Node | None:
        """
        The value node of C{key}; C{None} if absent or C{null} (or absent and C{required},
        reported). A required key given as C{null} is returned, for its converter to reject.
        """
        entry = self.entries.get(key)
        if entry is None:
            if required:
                self.w.report(self.path, f"missing required key {key!r}", self.node)
            return None
        node = entry[1]
        if _is_null(node) and not required:
            return None
        return node

    def value(
        self, key: str, convert: Callable[[Node, str], T | None], default: T, *, required: bool
    ) -> T:
        """C{convert} applied to C{key}'s value, or C{default}."""
        node = self.get(key, required=required)
        if node is None:
            return default
        result = convert(node, self.at(key))
        return default if result is None else result

    def require_str(self, key: str) -> str:
        """A required non-empty string."""
        return self.value(key, self.w.string, "", required=True)

    def optional_str(self, key: str, default: str | None = None) -> str | None:
        """An optional non-empty string."""
        return self.value(key, self.w.string, default, required=False)

    def str_or(self, key: str, default: str, *, nonempty: bool = True) -> str:
        """An optional string with a default."""
        return self.value(
            key, lambda n, p: self.w.string(n, p, nonempty=nonempty), default, required=False
        )

    def bool_or(self, key: str, default: bool) -> bool:
        """An optional boolean."""
        return self.value(key, self.w.boolean, default, required=False)

    def int_or(self, key: str, default: int, minimum: int, maximum: int | None = None) -> int:
        """An optional integer within bounds."""
        return self.value(
            key, lambda n, p: self.w.integer(n, p, minimum, maximum), default, required=False
        )

    def number(
        self,
        key: str,
        default: float,
        *,
        required: bool = False,
        above: float | None = None,
        minimum: float | None = None,
    ) -> float:
        """A number, C{> above} and C{>= minimum}."""
        return self.value(
            key,
            lambda n, p: self.w.number(n, p, above=above, minimum=minimum),
            default,
            required=required,
        )

    def choice(
        self, key: str, choices: Sequence[str], default: str, *, required: bool = False
    ) -> str:
        """One of C{choices}."""
        return self.value(
            key, lambda n, p: self.w.choice(n, p, choices), default, required=required
        )

    def url_or(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        """An http or https URL."""
        return self.value(key, self.w.url, default, required=required)

    def file(self, key: str, *, must_exist: bool, required: bool = False) -> str | None:
        """A path resolved against the base directory."""
        return self.value(
            key, lambda n, p: self.w.file(n, p, must_exist=must_exist), None, required=required
        )

    def strings(
        self,
        key: str,
        *,
        required: bool = False,
        nonempty: bool = False,
        check: Callable[[str], str | None] | None = None,
    ) -> tuple[str, ...]:
        """A list of strings, each passing C{check} (see L{_Walker.strings})."""
        return self.value(
            key,
            lambda n, p: self.w.strings(n, p, nonempty=nonempty, check=check),
            (),
            required=required,
        )

    def section(self, key: str, keys: Collection[str], *, required: bool = False) -> _Map | None:
        """A nested mapping with known C{keys}, or C{None} if absent, C{null} or invalid."""
        node = self.get(key, required=required)
        if node is None:
            return None
        return self.w.mapping(node, self.at(key), keys)

    def items(self, key: str, *, required: bool = False) -> list[tuple[str, Node]]:
        """The items of a list, each with its path."""
        node = self.get(key, required=required)
        if node is None:
            return []
        return self.w.sequence(node, self.at(key)) or []


def _check_unique(w: _Walker, items: Sequence[tuple[str, str, Node]], what: str) -> None:
    """Report each C{(value, path, node)} whose value was already seen."""
    seen: set[str] = set()
    for value, path, node in items:
        if value in seen:
            w.report(path, f"duplicate {what} {value!r}", node)
        seen.add(value)


# -- Sections ---------------------------------------------------------------------------------

_TOP_KEYS = tuple(key for key in attr.fields_dict(Config) if key != "source")
_POLICY_KEYS = ("default_action", "filter_tools_list", "rules")
_AUTH_KEYS = ("enabled", "keys", "external", "oauth")
_OAUTH_KEYS = tuple(attr.fields_dict(OAuthConfig))
_ISSUER_KEYS = tuple(attr.fields_dict(IssuerConfig))
_RULE_KEYS = tuple(attr.fields_dict(PolicyRule))
_CONDITION_KEYS = tuple(attr.fields_dict(Conditions))


def _parse_config(w: _Walker, root: Node, source: str) -> Config:
    m = w.mapping(root, "", _TOP_KEYS)
    if m is None:
        return Config(upstreams=(), source=source)
    tls = _parse_tls(m.section("tls", ("cert_file", "key_file", "client_ca")))
    auth = _parse_auth(w, m, tls)
    listen = _parse_listen(w, m.section("listen", attr.fields_dict(ListenConfig)))
    audit = _parse_audit(w, m.section("audit", attr.fields_dict(AuditConfig)))
    return Config(
        listen=listen,
        tls=tls,
        upstreams=_parse_upstreams(w, m),
        auth=auth,
        policy=_parse_policy(w, m.section("policy", _POLICY_KEYS)),
        audit=audit,
        telemetry=_parse_telemetry(w, m.section("telemetry", attr.fields_dict(TelemetryConfig))),
        limits=_parse_limits(w, m.section("limits", attr.fields_dict(LimitsConfig))),
        license=_parse_license(m.section("license", ("file",))),
        tools=_parse_tools(w, m.section("tools", ("pinning",))),
        state=_parse_state(w, m.section("state", attr.fields_dict(StateConfig))),
        source=source,
    )


def _parse_listen(w: _Walker, m: _Map | None) -> ListenConfig:
    if m is None:
        return ListenConfig()
    return ListenConfig(
        host=m.str_or("host", "127.0.0.1"),
        port=m.int_or("port", 8080, 0, 65535),
        reuse_port=m.bool_or("reuse_port", False),
        allowed_hosts=m.strings("allowed_hosts", check=_check_host),
        allowed_origins=m.strings("allowed_origins", check=_check_origin),
        workers=_workers(w, m),
        admin=_parse_admin(w, m),
    )


#: Most worker processes C{listen.workers} may ask for.
MAX_WORKERS = 256


def _workers(w: _Walker, m: _Map) -> int | str:
    """C{listen.workers}: an integer from 1 to L{MAX_WORKERS}, or C{auto}."""
    node = m.get("workers")
    if node is None:
        return 1
    if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str":
        if node.value == "auto":
            return "auto"
        w.report(m.at("workers"), f"must be an integer or auto, got {node.value!r}", node)
        return 1
    return m.int_or("workers", 1, 1, MAX_WORKERS)


def _parse_admin(w: _Walker, listen: _Map) -> AdminConfig | None:
    m = listen.section("admin", attr.fields_dict(AdminConfig))
    if m is None:
        return None
    admin = AdminConfig(host=m.str_or("host", "127.0.0.1"), port=m.int_or("port", 9464, 0, 65535))
    host = listen.entries.get("host")
    port = listen.entries.get("port")
    mcpHost = host[1].value if host is not None else "127.0.0.1"
    mcpPort = port[1].value if port is not None else "8080"
    if admin.port != 0 and (admin.host, str(admin.port)) == (mcpHost, str(mcpPort)):
        w.report(m.at("port"), "must differ from listen.port (the MCP listener's)", m.node)
    return admin


def _check_host(host: str) -> str | None:
    if "/" in host or any(c.isspace() for c in host):
        return f"must be a host or host:port, got {host!r}"
    return None


def _check_origin(origin: str) -> str | None:
    problem = f"must look like scheme://host[:port], got {origin!r}"
    scheme, sep, _ = origin.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return problem
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        return problem
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        return problem
    return problem if "@" in parts.netloc else None


def _parse_tls(m: _Map | None) -> TLSConfig | None:
    if m is None:
        return None
    return TLSConfig(
        cert_file=m.file("cert_file", must_exist=True, required=True) or "",
        key_file=m.file("key_file", must_exist=True, required=True) or "",
        client_ca=m.file("client_ca", must_exist=True),
    )


def _parse_upstreams(w: _Walker, root: _Map) -> tuple[UpstreamConfig, ...]:
    items = root.items("upstreams", required=True)
    node = root.get("upstreams")
    if node is not None and isinstance(node, SequenceNode) and not items:
        w.report("upstreams", "must list at least one upstream", node)
    keys = ("name", "url", "path", "headers", "timeouts")
    upstreams = []
    names: list[tuple[str, str, Node]] = []
    paths: list[tuple[str, str, Node]] = []
    for path, item in items:
        m = w.mapping(item, path, keys)
        if m is None:
            continue
        name = m.require_str("name")
        url = m.value("url", w.url, "", required=True)
        route_node = m.get("path")
        route = _route(w, route_node, m.at("path")) if route_node else "/mcp"
        timeouts = Timeouts()
        t = m.section("timeouts", ("connect", "response"))
        if t is not None:
            timeouts = Timeouts(
                connect=t.number("connect", 5.0, above=0),
                response=t.number("response", 120.0, above=0),
            )
        try:
            scheme, host, port, target = split_url(url)
        except ValueError:  # reported by w.url, or url missing
            scheme, host, port, target = "http", "", 80, b"/"
        upstreams.append(
            UpstreamConfig(
                name=name,
                url=url,
                scheme=scheme,
                host=host,
                port=port,
                target=target,
                path=route or "/mcp",
                headers=m.value("headers", w.headers, (), required=False),
                timeouts=timeouts,
            )
        )
        if (n := m.get("name")) is not None and name:
            names.append((name, m.at("name"), n))
        if route is not None:
            paths.append((route, *((m.at("path"), route_node) if route_node else (path, item))))
    _check_unique(w, names, "upstream name")
    _check_unique(w, paths, "upstream path")
    return tuple(upstreams)


def _route(w: _Walker, node: Node, path: str) -> str | None:
    """An upstream's gateway C{path}."""
    route = w.string(node, path)
    if route is None:
        return None
    if not route.startswith("/"):
        w.report(path, "must start with /", node)
    elif route in RESERVED_PATHS:
        w.report(path, f"{route} is reserved for health checks", node)
    elif route.startswith("/.well-known/"):
        w.report(path, "/.well-known/ paths are reserved (OAuth protected-resource metadata)", node)
    elif any(c in route for c in "?#") or any(c.isspace() for c in route):
        w.report(path, "must be a plain path (no query, fragment or spaces)", node)
    else:
        return route
    return None


def _parse_auth(w: _Walker, root: _Map, tls: TLSConfig | None) -> AuthConfig:
    m = root.section("auth", _AUTH_KEYS)
    if m is None:
        return AuthConfig()
    keys = []
    ids: list[tuple[str, str, Node]] = []
    for path, item in m.items("keys"):
        k = w.mapping(item, path, ("id", "hash"))
        if k is None:
            continue
        key_id = k.require_str("id")
        digest = k.require_str("hash")
        if digest and not digest.startswith("$argon2id$"):
            w.report(k.at("hash"), "must be an Argon2id hash ($argon2id$...)", k.get("hash"))
        if (n := k.get("id")) is not None and key_id:
            ids.append((key_id, k.at("id"), n))
        keys.append(APIKey(id=key_id, hash=digest))
    _check_unique(w, ids, "key id")
    enabled = m.bool_or("enabled", False)
    oauth = _parse_oauth(w, m.section("oauth", _OAUTH_KEYS))
    oauthNode = m.get("oauth")
    if enabled and not keys and oauthNode is None and (tls is None or tls.client_ca is None):
        w.report(m.at("enabled"), "true but no keys are configured", m.get("enabled"))
    if oauthNode is not None and not enabled:
        w.report(
            m.at("oauth"),
            "is only used with auth.enabled: true (set it to validate access tokens)",
            oauthNode,
        )
    external = _parse_external(w, m.section("external", ("identity_header", "trusted_proxies")))
    if external is not None and enabled:
        w.report(
            m.at("external"),
            "is only used with auth.enabled: false (an auth proxy authenticates the caller)",
            m.get("external"),
        )
    return AuthConfig(enabled=enabled, keys=tuple(keys), external=external, oauth=oauth)


def _parse_oauth(w: _Walker, m: _Map | None) -> OAuthConfig | None:
    """C{auth.oauth}: public_url without a fragment or query; each issuer one key source."""
    if m is None:
        return None
    public = m.url_or("public_url", required=True) or ""
    if public:
        parts = urlsplit(public)
        if parts.fragment or "#" in public:
            w.report(m.at("public_url"), "must not have a fragment (RFC 8707)", m.get("public_url"))
        elif parts.query:
            w.report(m.at("public_url"), "must not have a query", m.get("public_url"))
    issuers = []
    names: list[tuple[str, str, Node]] = []
    node = m.get("issuers", required=True)
    items = m.items("issuers")
    if node is not None and isinstance(node, SequenceNode) and not items:
        w.report(m.at("issuers"), "must list at least one issuer", node)
    for path, item in items:
        i = w.mapping(item, path, _ISSUER_KEYS)
        if i is None:
            continue
        issuer = i.value("issuer", _issuer_url(w), "", required=True)
        url = i.url_or("jwks_url")
        jwks = i.value("jwks_file", _jwks_file(w), None, required=False)
        ca = i.file("ca_file", must_exist=True)
        given = [k for k in ("jwks_url", "jwks_file") if i.get(k) is not None]
        if len(given) != 1:
            w.report(
                path,
                "needs exactly one key source: jwks_url or jwks_file"
                + (" (both are set)" if given else ""),
                item,
            )
        if i.get("ca_file") is not None and i.get("jwks_url") is None:
            w.report(i.at("ca_file"), "is only used with jwks_url", i.get("ca_file"))
        if (n := i.get("issuer")) is not None and issuer:
            names.append((issuer, i.at("issuer"), n))
        issuers.append(IssuerConfig(issuer=issuer, jwks_url=url, jwks_file=jwks, ca_file=ca))
    _check_unique(w, names, "issuer")
    scopes = m.strings("scopes_supported", check=_check_scope)
    return OAuthConfig(
        public_url=public.rstrip("/"),
        issuers=tuple(issuers),
        principal_claim=m.str_or("principal_claim", "sub"),
        scopes_supported=scopes,
        required_scopes=m.strings("required_scopes", check=_check_scope),
    )


def _check_scope(scope: str) -> str | None:
    """A scope token (RFC 6749 section 3.3: no spaces, quotes or backslashes)."""
    if any(c.isspace() or c in '"\\' for c in scope):
        return f"{scope!r} is not a scope (no spaces, quotes or backslashes)"
    return None


def _issuer_url(w: _Walker) -> Callable[[Node, str], str | None]:
    def convert(node: Node, path: str) -> str | None:
        value = w.url(node, path)
        if value is not None and (urlsplit(value).fragment or "#" in value):
            w.report(path, "must not have a fragment", node)
            return None
        return value

    return convert


def _jwks_file(w: _Walker) -> Callable[[Node, str], str | None]:
    """An existing file holding a JWKS with at least one usable signing key."""

    def convert(node: Node, path: str) -> str | None:
        value = w.file(node, path, must_exist=True)
        if value is None:
            return None
        from mcpgw.oauth import jwksFileProblem

        problem = jwksFileProblem(value)
        if problem is not None:
            w.report(path, problem, node)
            return None
        return value

    return convert


def _parse_external(w: _Walker, m: _Map | None) -> ExternalAuthConfig | None:
    if m is None:
        return None
    header = m.require_str("identity_header")
    node = m.get("identity_header")
    if header and not _TOKEN.fullmatch(header):
        w.report(m.at("identity_header"), f"invalid header name {header!r}", node)
    elif header and (
        header.lower() in RESERVED_IDENTITY_HEADERS
        or header.lower() in FORBIDDEN_HEADERS
        or header.lower().startswith("mcp-")
    ):
        w.report(
            m.at("identity_header"),
            f"{header!r} cannot name the caller: the gateway or the protocol owns it",
            node,
        )
    proxies = m.strings("trusted_proxies", required=True, nonempty=True, check=_check_network)
    return ExternalAuthConfig(header, tuple(_network_text(p) for p in proxies))


def _check_network(text: str) -> str | None:
    """An IP address or a network in CIDR notation (without host bits)."""
    try:
        ipaddress.ip_network(text)
    except ValueError:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            return f"must be an IP address or a network (CIDR, e.g. 10.0.0.0/8), got {text!r}"
        return f"{text!r} has host bits set; did you mean '{network}'?"
    return None


def _network_text(text: str) -> str:
    """The normalised text of a network L{_check_network} accepted (C{10.0.0.1} -> C{/32})."""
    return str(ipaddress.ip_network(text))


def _parse_policy(w: _Walker, m: _Map | None) -> PolicyConfig:
    if m is None:
        return PolicyConfig()
    rules = []
    ids: list[tuple[str, str, Node]] = []
    for path, item in m.items("rules"):
        r = w.mapping(item, path, _RULE_KEYS)
        if r is None:
            continue
        rule = _parse_rule(w, r)
        if (n := r.get("id")) is not None and rule.id:
            ids.append((rule.id, r.at("id"), n))
        rules.append(rule)
    _check_unique(w, ids, "rule id")
    default, defaults = _parse_default_action(w, m)
    return PolicyConfig(
        default_action=default,
        filter_tools_list=m.bool_or("filter_tools_list", True),
        rules=tuple(rules),
        default_actions=defaults,
    )


def _parse_default_action(w: _Walker, m: _Map) -> tuple[str, tuple[tuple[str, str], ...] | None]:
    """
    C{default_action}: one action (the part-1 meaning: it decides C{tools/call}), or a map from
    method to action (a method left out: C{allow}).
    """
    node = m.get("default_action")
    if node is None or not isinstance(node, MappingNode):
        return m.choice("default_action", ("allow", "deny"), "allow"), None
    d = w.mapping(node, m.at("default_action"), POLICY_METHODS)
    if d is None:
        return "allow", None
    defaults = tuple(
        (method, d.choice(method, ("allow", "deny"), "allow")) for method in POLICY_METHODS
    )
    return dict(defaults)["tools/call"], defaults


def _parse_rule(w: _Walker, r: _Map) -> PolicyRule:
    rule_id = r.require_str("id")
    action = r.choice("action", ACTIONS, "", required=True)
    method = r.choice("method", POLICY_METHODS, "tools/call")
    match = _parse_match(w, r)
    redact: tuple[str, ...] = ()
    if r.get("redact") is not None:
        if action and action != "redact":
            w.report(r.at("redact"), "is only allowed with action: redact", r.get("redact"))
        redact = r.strings("redact", nonempty=True, check=_check_redaction)
    elif action == "redact":
        r.get("redact", required=True)
    if action == "redact" and method == "resources/read":
        w.report(
            r.at("action"), "redact rewrites arguments: resources/read has none", r.get("action")
        )
    rate_limit = None
    if r.get("rate_limit") is not None:
        if action and action != "rate_limit":
            w.report(
                r.at("rate_limit"), "is only allowed with action: rate_limit", r.get("rate_limit")
            )
        section = r.section("rate_limit", ("rate", "burst", "per"))
        bucket = _parse_bucket(section)
        per = section.choice("per", RATE_LIMIT_PER, "session") if section is not None else ""
        rate_limit = RateLimitSpec(*bucket, per) if bucket else None
    elif action == "rate_limit":
        r.get("rate_limit", required=True)
    when = _parse_conditions(w, r.section("when", _CONDITION_KEYS))
    if when is not None and when.arguments and method == "resources/read":
        w.report(r.at("when.arguments"), "resources/read has no arguments", r.get("when"))
    return PolicyRule(
        id=rule_id,
        action=action,
        match=match,
        redact=redact,
        rate_limit=rate_limit,
        method=method,
        when=when,
        redact_results=r.strings("redact_results", nonempty=True, check=_check_redaction),
    )


def _parse_conditions(w: _Walker, m: _Map | None) -> Conditions | None:
    """C{when}: at least one condition; globs, networks and argument matchers checked."""
    if m is None:
        return None
    if not m.entries:
        w.report(m.path, f"must have at least one of {', '.join(_CONDITION_KEYS)}", m.node)
        return None
    arguments = []
    a = m.get("arguments")
    if a is not None:
        entries = w.pairs(a, m.at("arguments"))
        if entries is not None and not entries:
            w.report(m.at("arguments"), "must not be empty", a)
        for name, path, key_node, value_node in entries or ():
            if not all(name.split(".")):
                w.report(path, f"invalid argument path {name!r} (dots separate keys)", key_node)
                continue
            matcher = w.mapping(value_node, path, MATCH_KINDS)
            if matcher is not None:
                spec = _parse_matcher(w, matcher)
                if spec is not None:
                    arguments.append((name, spec))
    claims = []
    c = m.get("claims")
    if c is not None:
        entries = w.pairs(c, m.at("claims"))
        if entries is not None and not entries:
            w.report(m.at("claims"), "must not be empty", c)
        for name, path, key_node, value_node in entries or ():
            if not name:
                w.report(path, "claim names must not be empty", key_node)
                continue
            globs = w.strings(value_node, path, nonempty=True, check=_check_glob)
            if globs is not None:
                claims.append((name, globs))
    return Conditions(
        claims=tuple(claims),
        scopes=m.strings("scopes", nonempty=True, check=_check_scope),
        keys=m.strings("keys", nonempty=True, check=_check_glob),
        identities=m.strings("identities", nonempty=True, check=_check_glob),
        clients=tuple(
            _network_text(c) for c in m.strings("clients", nonempty=True, check=_check_network)
        ),
        arguments=tuple(arguments),
    )


def _check_glob(pattern: str) -> str | None:
    """A glob that can match something (C{[z-a]} cannot)."""
    if "(?!)" in fnmatch.translate(pattern):
        return f"glob {pattern!r} can never match (an empty range)"
    return None


def _parse_match(w: _Walker, r: _Map) -> MatchSpec:
    m = r.section("match", MATCH_KINDS, required=True)
    spec = _parse_matcher(w, m) if m is not None else None
    return MatchSpec("exact", "") if spec is None else spec


def _parse_matcher(w: _Walker, m: _Map) -> MatchSpec | None:
    """Exactly one of L{MATCH_KINDS}: regexes compile, globs can match, lists are not empty."""
    if len(m.entries) != 1:
        got = f", got {', '.join(m.entries)}" if m.entries else ""
        w.report(m.path, f"must have exactly one of {', '.join(MATCH_KINDS)}{got}", m.node)
        return None
    (kind,) = m.entries
    if kind == "list":
        names = m.strings("list", required=True, nonempty=True)
        return MatchSpec("list", names) if names else None
    pattern = m.require_str(kind)
    if kind == "regex" and pattern:
        try:
            re.compile(pattern)
        except re.error as e:
            w.report(m.at(kind), f"invalid regular expression: {e}", m.get(kind))
            return None
    if kind == "glob" and pattern and (problem := _check_glob(pattern)):
        w.report(m.at(kind), problem, m.get(kind))
        return None
    return MatchSpec(kind, pattern) if pattern else None


def _check_redaction(entry: str) -> str | None:
    """A built-in name, or a regular expression that cannot match nothing."""
    if entry in BUILTIN_REDACTIONS:
        return None
    if re.fullmatch(r"[a-z_]+", entry):
        close = difflib.get_close_matches(entry, sorted(BUILTIN_REDACTIONS), n=1)
        if close:
            return f"unknown built-in redaction {entry!r}; did you mean {close[0]!r}?"
    try:
        pattern = re.compile(entry)
    except re.error as e:
        return f"invalid regular expression: {e}"
    return "must not match the empty string" if pattern.search("") is not None else None


def _parse_bucket(m: _Map | None) -> tuple[float, float] | None:
    """C{{rate, burst}}: C{burst} defaults to C{max(1, rate)}."""
    if m is None:
        return None
    rate = m.number("rate", 0.0, required=True, above=0)
    burst = m.number("burst", max(1.0, rate), minimum=1)
    return (rate, burst) if rate else None


# -- Audit ------------------------------------------------------------------------------------

_BATCH_DEFAULTS = {
    "s3": BatchConfig(10000, 60.0),
    "gcs": BatchConfig(10000, 60.0),
    "webhook": BatchConfig(500, 5.0),
}
_SINK_KEYS = {
    "s3": ("type", *attr.fields_dict(S3SinkConfig)),
    "gcs": ("type", *attr.fields_dict(GCSSinkConfig)),
    "kafka": ("type", *attr.fields_dict(KafkaSinkConfig)),
    "webhook": ("type", *attr.fields_dict(WebhookSinkConfig)),
}


def _parse_audit(w: _Walker, m: _Map | None) -> AuditConfig:
    if m is None:
        return _default_audit(w)
    sinks = []
    names: list[tuple[str, str, Node]] = []
    for path, item in m.items("sinks"):
        sink = _parse_sink(w, path, item)
        if sink is not None:
            sinks.append(sink[0])
            names.append((sink[0].name, _join(path, "name"), sink[1]))
    _check_unique(w, names, "sink name")
    default = _default_audit(w)
    return AuditConfig(
        path=m.file("path", must_exist=False) or default.path,
        fsync=m.choice("fsync", ("none", "interval", "always"), "interval"),
        state_dir=m.file("state_dir", must_exist=False) or default.state_dir,
        sinks=tuple(sinks),
        integrity=_parse_integrity(w, m.section("integrity", attr.fields_dict(IntegrityConfig))),
        on_write_failure=m.choice("on_write_failure", ("serve", "refuse"), "serve"),
    )


def _parse_integrity(w: _Walker, m: _Map | None) -> IntegrityConfig:
    if m is None:
        return IntegrityConfig()
    chain = m.bool_or("chain", False)
    key = m.file("signing_key", must_exist=True)
    if key is not None:
        from mcpgw.audit.chain import loadSigningKey

        try:
            loadSigningKey(key)
        except (OSError, ValueError) as e:
            w.report(m.at("signing_key"), str(e), m.get("signing_key"))
        if not chain:
            w.report(m.at("signing_key"), "needs audit.integrity.chain: true", m.get("signing_key"))
    cp = m.section("checkpoint", attr.fields_dict(CheckpointConfig))
    checkpoint = CheckpointConfig()
    if cp is not None:
        checkpoint = CheckpointConfig(
            lines=cp.int_or("lines", checkpoint.lines, 1),
            seconds=cp.number("seconds", checkpoint.seconds, above=0),
        )
    return IntegrityConfig(chain=chain, signing_key=key, checkpoint=checkpoint)


def _default_audit(w: _Walker) -> AuditConfig:
    return AuditConfig(
        path=os.path.join(w.base_dir, "audit.jsonl"), state_dir=os.path.join(w.base_dir, "state")
    )


def _parse_sink(w: _Walker, path: str, item: Node) -> tuple[SinkConfig, Node] | None:
    """A sink and the node of its name, or C{None} if its type is unknown or it has no name."""
    m = w.mapping(item, path, {key for keys in _SINK_KEYS.values() for key in keys})
    if m is None:
        return None
    kind = m.choice("type", tuple(_SINK_KEYS), "", required=True)
    if not kind:
        return None
    if missing := _missing_library(kind):
        w.report(m.at("type"), missing, m.get("type"))
    m.restrict(_SINK_KEYS[kind], f" for a {kind} sink")
    name = m.require_str("name")
    name_node = m.get("name")
    if name and not _SINK_NAME.fullmatch(name):
        w.report(m.at("name"), "may only contain letters, digits, '.', '_' and '-'", name_node)
    sink: SinkConfig
    if kind == "kafka":
        sink = KafkaSinkConfig(
            name=name,
            bootstrap_servers=m.strings("bootstrap_servers", required=True, nonempty=True),
            topic=m.require_str("topic"),
            config=m.value("config", _kafka_config(w), (), required=False),
        )
    elif kind == "webhook":
        sink = WebhookSinkConfig(
            name=name,
            url=m.url_or("url", "", required=True) or "",
            headers=m.value("headers", w.headers, (), required=False),
            ca_file=m.file("ca_file", must_exist=True),
            batch=_parse_batch(m, kind),
        )
    elif kind == "gcs":
        sink = GCSSinkConfig(
            name=name,
            bucket=m.require_str("bucket"),
            prefix=m.str_or("prefix", "", nonempty=False),
            endpoint_url=m.url_or("endpoint_url"),
            batch=_parse_batch(m, kind),
            min_retention_days=m.value(
                "min_retention_days", lambda n, p: w.integer(n, p, 1), None, required=False
            ),
        )
    else:
        lock = m.section("object_lock", ("mode", "retain_days"))
        sink = S3SinkConfig(
            name=name,
            bucket=m.require_str("bucket"),
            prefix=m.str_or("prefix", "", nonempty=False),
            region=m.optional_str("region"),
            endpoint_url=m.url_or("endpoint_url"),
            object_lock=None
            if lock is None
            else ObjectLockConfig(
                mode=lock.choice("mode", ("GOVERNANCE", "COMPLIANCE"), "", required=True),
                retain_days=lock.value(
                    "retain_days", lambda n, p: w.integer(n, p, 1), 0, required=True
                ),
            ),
            batch=_parse_batch(m, kind),
        )
    return (sink, name_node) if name_node is not None and name else None


def _missing_library(kind: str) -> str | None:
    """Why the library of a C{kind} sink cannot be used (not installed), or C{None}."""
    from mcpgw.audit.sinks import missingLibrary

    return missingLibrary(kind)


def _parse_batch(m: _Map, kind: str) -> BatchConfig:
    default = _BATCH_DEFAULTS[kind]
    b = m.section("batch", ("max_lines", "max_seconds"))
    if b is None:
        return default
    return BatchConfig(
        max_lines=b.int_or("max_lines", default.max_lines, 1),
        max_seconds=b.number("max_seconds", default.max_seconds, above=0),
    )


def _kafka_config(w: _Walker) -> Callable[[Node, str], tuple[tuple[str, str], ...] | None]:
    """A converter for a Kafka sink's C{config}: strings, numbers and booleans, as strings."""

    def convert(node: Node, path: str) -> tuple[tuple[str, str], ...] | None:
        entries = w.pairs(node, path)
        if entries is None:
            return None
        result = []
        for key, p, _, value_node in entries:
            value = w.scalar(value_node, p)
            if isinstance(value, bool):
                result.append((key, "true" if value else "false"))
            elif isinstance(value, int | float):
                result.append((key, str(value)))
            elif isinstance(value, str):
                text = w.string(value_node, p, nonempty=False)
                if text is not None:
                    result.append((key, text))
            elif value is not _INVALID:
                w.wrong_type(p, "a string, number or boolean", value_node, value)
        return tuple(result)

    return convert


# -- The rest ---------------------------------------------------------------------------------


def _parse_telemetry(w: _Walker, m: _Map | None) -> TelemetryConfig:
    env = w.environ
    default = TelemetryConfig()
    endpoint = m.url_or("otlp_endpoint") if m is not None else None
    if endpoint is None:
        endpoint = _env_endpoint(w)
    none: tuple[tuple[str, str], ...] = ()
    resource = dict(_env_pairs(w, "OTEL_RESOURCE_ATTRIBUTES"))
    if m is not None and m.get("resource_attributes") is not None:
        resource.update(m.value("resource_attributes", _string_map(w), none, required=False))
    service = m.optional_str("service_name") if m is not None else None
    if service is None:
        service = env.get("OTEL_SERVICE_NAME") or resource.get("service.name") or "mcpgw"
    resource.pop("service.name", None)
    headers: tuple[tuple[str, str], ...] | None = None
    if m is not None and m.get("headers") is not None:
        headers = m.value("headers", w.headers, none, required=False)
    if headers is None:
        names = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
        name = next((n for n in names if n in env), None)
        headers = _env_pairs(w, name) if name is not None else ()
    sampler = None
    if m is not None and m.get("sampler") is not None:
        sampler = m.value("sampler", _sampler(w), None, required=False)
    if sampler is None:
        sampler = _env_sampler(w) or default.sampler
    return TelemetryConfig(
        otlp_endpoint=endpoint,
        service_name=service,
        environment=m.optional_str("environment") if m is not None else None,
        headers=headers,
        resource_attributes=tuple(sorted(resource.items())),
        sampler=sampler,
    )


def _env_endpoint(w: _Walker) -> str | None:
    """The traces URL from C{OTEL_EXPORTER_OTLP_TRACES_ENDPOINT} or C{..._OTLP_ENDPOINT}."""
    env = w.environ
    url, name = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    if not url:
        base, name = env.get("OTEL_EXPORTER_OTLP_ENDPOINT"), "OTEL_EXPORTER_OTLP_ENDPOINT"
        if not base:
            return None
        url = base.rstrip("/") + "/v1/traces"  # a base URL: the signal's path is appended
    try:
        split_url(url)
    except ValueError as e:
        w.report(f"telemetry.otlp_endpoint ({name})", str(e), None)
        return None
    return url


def _env_pairs(w: _Walker, name: str) -> tuple[tuple[str, str], ...]:
    """C{key1=value1,key2=value2} (values percent-decoded), the W3C Baggage form OTel uses."""
    text = w.environ.get(name, "")
    result = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), unquote(value.strip())
        if not sep or not key:
            w.report(f"telemetry ({name})", f"{item.strip()!r} is not key=value", None)
            continue
        if any(c in value for c in "\r\n\0"):
            w.report(f"telemetry ({name})", f"the value of {key!r} has CR, LF or NUL", None)
            continue
        result.append((key, value))
    return tuple(result)


def _string_map(w: _Walker) -> Callable[[Node, str], tuple[tuple[str, str], ...] | None]:
    def convert(node: Node, path: str) -> tuple[tuple[str, str], ...] | None:
        entries = w.pairs(node, path)
        if entries is None:
            return None
        result = []
        for key, p, _, value_node in entries:
            value = w.string(value_node, p, nonempty=False)
            if value is not None:
                result.append((key, value))
        return tuple(result)

    return convert


def _check_sampler(
    w: _Walker, kind: str, ratio: float | None, path: str, node: Node | None
) -> bool:
    if kind not in SAMPLERS:
        known = ", ".join(SAMPLERS)
        w.report(path, f"must be one of {known}, got {kind!r}{_hint(kind, SAMPLERS)}", node)
        return False
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        w.report(path, f"the ratio must be between 0 and 1, got {ratio:g}", node)
        return False
    return True


def _sampler(w: _Walker) -> Callable[[Node, str], SamplerConfig | None]:
    """C{sampler: NAME} or C{sampler: {type: NAME, ratio: R}}."""

    def convert(node: Node, path: str) -> SamplerConfig | None:
        if isinstance(node, MappingNode):
            m = w.mapping(node, path, ("type", "ratio"))
            if m is None:
                return None
            kind = m.require_str("type")
            ratio = m.number("ratio", 1.0)
        else:
            kind, ratio = w.string(node, path) or "", 1.0
            if not kind:
                return None
        if not _check_sampler(w, kind, ratio, path, node):
            return None
        return SamplerConfig(kind, ratio)

    return convert


def _env_sampler(w: _Walker) -> SamplerConfig | None:
    env = w.environ
    kind = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not kind:
        return None
    path = "telemetry.sampler (OTEL_TRACES_SAMPLER)"
    ratio = 1.0
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if arg and kind.endswith("traceidratio"):
        try:
            ratio = float(arg)
        except ValueError:
            w.report(path, f"OTEL_TRACES_SAMPLER_ARG must be a number, got {arg!r}", None)
            return None
    if not _check_sampler(w, kind, ratio, path, None):
        return None
    return SamplerConfig(kind, ratio)


def _parse_limits(w: _Walker, m: _Map | None) -> LimitsConfig:
    if m is None:
        return LimitsConfig()
    bucket = _parse_bucket(m.section("input_rate_limit", ("rate", "burst")))
    return LimitsConfig(
        max_body_bytes=m.int_or("max_body_bytes", 4194304, 1),
        input_rate_limit=InputRateLimit(*bucket) if bucket else None,
        max_header_bytes=m.int_or("max_header_bytes", 16384, 1024),
        header_timeout=m.number("header_timeout", 10.0, above=0),
        body_timeout=m.number("body_timeout", 60.0, above=0),
    )


def redis_address(url: str) -> tuple[bool, str, int, int, str | None, str | None]:
    """
    Split a C{redis://} or C{rediss://} URL.

    @return: C{(tls, host, port, db, username, password)} (user and password percent-decoded).
    @raise ValueError: it is not a usable Redis URL (the message never repeats the password).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("must be a redis:// or rediss:// URL")
    try:
        host, port = parts.hostname, parts.port or 6379
    except ValueError:
        raise ValueError("has an invalid port") from None
    if not host:
        raise ValueError("has no host")
    path = parts.path.strip("/") or "0"
    if not path.isdigit():
        raise ValueError(f"database must be a number, got {path!r}")
    if parts.query or parts.fragment:
        raise ValueError("takes no query or fragment")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.scheme == "rediss", host, port, int(path), user, password


def _parse_state(w: _Walker, m: _Map | None) -> StateConfig:
    if m is None:
        return StateConfig()
    backend = m.choice("backend", ("memory", "redis"), "memory")
    r = m.section("redis", attr.fields_dict(RedisConfig))
    redis = RedisConfig()
    if r is not None:
        url = r.str_or("url", redis.url)
        node = r.get("url")
        try:
            redis_address(url)
        except ValueError as e:
            w.report(r.at("url"), f"{e} (got {_masked(url)!r})", node)
        redis = RedisConfig(
            url=url,
            key_prefix=r.str_or("key_prefix", redis.key_prefix, nonempty=False),
            timeout_ms=r.number("timeout_ms", redis.timeout_ms, above=0),
            on_error=r.choice("on_error", ("allow", "deny"), redis.on_error),
            ca_file=r.file("ca_file", must_exist=True),
            lease_tokens=_leaseTokens(w, r),
        )
    return StateConfig(backend=backend, redis=redis)


def _leaseTokens(w: _Walker, m: _Map) -> int | str:
    """C{state.redis.lease_tokens}: C{auto}, or an integer from 0 to L{MAX_LEASE_TOKENS}."""
    node = m.get("lease_tokens")
    if node is None:
        return "auto"
    if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str":
        if node.value == "auto":
            return "auto"
        w.report(m.at("lease_tokens"), f"must be an integer or auto, got {node.value!r}", node)
        return "auto"
    return m.int_or("lease_tokens", 0, 0, MAX_LEASE_TOKENS)


def _parse_license(m: _Map | None) -> LicenseConfig:
    if m is None:
        return LicenseConfig()
    return LicenseConfig(file=m.file("file", must_exist=True))


def _parse_tools(w: _Walker, m: _Map | None) -> ToolsConfig:
    default_lock = os.path.join(w.base_dir, "tools.lock")
    if m is None:
        return ToolsConfig(PinningConfig(lock_file=default_lock))
    p = m.section("pinning", ("mode", "lock_file"))
    if p is None:
        return ToolsConfig(PinningConfig(lock_file=default_lock))
    mode = "off"
    node = p.get("mode")
    if node is not None:
        # YAML 1.1 reads a bare off as false: that is what the user meant.
        value = w.scalar(node, p.at("mode"))
        mode = "off" if value is False else p.choice("mode", PINNING_MODES, "off")
    return ToolsConfig(
        PinningConfig(mode=mode, lock_file=p.file("lock_file", must_exist=False) or default_lock)
    )
