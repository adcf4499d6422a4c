# -*- test-case-name: tests.test_license -*-
"""
The offline license: a JWT signed with Ed25519 (C{alg: EdDSA}), verified against public keys
built into the package (L{mcpgw._license_keys}), never against anything fetched.

Nothing here opens a socket: the token is a local file, the keys are constants, and the clock is
the only other input. The vendor signs licenses with C{packaging/license-tool}, which is not part
of the installed package.

A license carries these claims (all required)::

    iss           the vendor; must equal the issuer of the key named by the header's kid
    sub           the licensee's stable id          name      the licensee's display name
    iat, nbf, exp issued at, valid from, expires (seconds since the epoch, integers)
    product       "mcpgw"                           entitlements  a map of name -> JSON value

Verification (L{verifyToken}) separates what is wrong with the I{token} (L{LicenseError}: bad
signature, unknown key, wrong product or issuer, malformed) from where the license stands in
I{time} (L{License.status}: valid, expired, not yet valid). The gateway treats the two apart:

  - no C{license.file}: evaluation mode, with a notice at start;
  - a L{LicenseError}: an invalid configuration (C{license.file: ... (line N)}), so C{twistd
    mcpgw} and C{mcpgw run} refuse to start and a SIGHUP reload is rejected;
  - expired or not yet valid: the gateway keeps serving (it must never drop production traffic
    over paperwork) and logs a warning at start and once a day (L{LicenseService}).

Entitlements are shown and logged; this release enforces none of them.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import attr
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mcpgw.config import Config, ConfigError, Problem

__all__ = [
    "ALGORITHM",
    "CHECK_INTERVAL",
    "NBF_LEEWAY",
    "PRODUCT",
    "License",
    "LicenseError",
    "LicenseKey",
    "LicenseService",
    "LicenseState",
    "builtinKeys",
    "licenseState",
    "loadLicense",
    "verifyToken",
]

log = Logger()

#: The C{product} claim a license for this software carries.
PRODUCT = "mcpgw"
#: The only accepted JWS algorithm (Ed25519 signatures).
ALGORITHM = "EdDSA"
#: Claims every license must carry.
REQUIRED_CLAIMS = ("iss", "sub", "name", "iat", "nbf", "exp", "product", "entitlements")
#: Seconds of clock skew tolerated on C{nbf} (a license issued minutes ago on a host whose clock
#: is a little behind is valid). C{exp} is exact.
NBF_LEEWAY = 300
#: Seconds between two checks of the license by the running gateway (the daily warning).
CHECK_INTERVAL = 86400.0
#: Within this many days of C{exp}, the daily check warns that the license is about to expire.
RENEWAL_WARNING_DAYS = 30
#: A license file larger than this is not a license.
MAX_LICENSE_BYTES = 64 * 1024

Reason = Literal[
    "unreadable", "malformed", "unknown_key", "bad_signature", "wrong_product", "wrong_issuer"
]
Status = Literal["valid", "expired", "not_yet_valid"]


class LicenseError(Exception):
    """
    A license that cannot be trusted or cannot be read.

    @ivar reason: C{unreadable}, C{malformed}, C{unknown_key}, C{bad_signature},
        C{wrong_product} or C{wrong_issuer}.
    @ivar message: what is wrong, for people.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        self.reason: Reason = reason
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


@attr.frozen
class LicenseKey:
    """
    One vendor public key licenses can be signed with.

    @ivar kid: the key id, carried in the license's JWS header.
    @ivar issuer: the C{iss} a license signed with this key must carry.
    @ivar publicKey: the Ed25519 public key.
    """

    kid: str
    issuer: str
    publicKey: Ed25519PublicKey = attr.field(eq=False, repr=False)

    @classmethod
    def fromBase64(cls, kid: str, issuer: str, public: str) -> LicenseKey:
        """A key from the base64 (standard or URL-safe, padding optional) of its 32 raw bytes."""
        text = public.strip().replace("-", "+").replace("_", "/")
        try:
            raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"license key {kid}: not base64: {e}") from None
        if len(raw) != 32:
            raise ValueError(f"license key {kid}: Ed25519 public keys are 32 bytes, not {len(raw)}")
        return cls(kid, issuer, Ed25519PublicKey.from_public_bytes(raw))


def builtinKeys() -> tuple[LicenseKey, ...]:
    """@return: the public keys built into this package (read at call time)."""
    from mcpgw import _license_keys

    return tuple(LicenseKey.fromBase64(*entry) for entry in _license_keys.BUILTIN_KEYS)


def _utc(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attr.frozen
class License:
    """
    A license whose signature, key, issuer and product were verified.

    @ivar claims: every claim of the token, as signed.
    """

    kid: str
    issuer: str
    subject: str
    name: str
    issuedAt: int
    notBefore: int
    expires: int
    product: str
    entitlements: Mapping[str, Any]
    claims: Mapping[str, Any] = attr.field(repr=False)

    def status(self, now: float) -> Status:
        """C{valid}, C{expired} (at or after C{exp}) or C{not_yet_valid} (before C{nbf})."""
        if now >= self.expires:
            return "expired"
        if now + NBF_LEEWAY < self.notBefore:
            return "not_yet_valid"
        return "valid"

    def daysLeft(self, now: float) -> int:
        """
        Days until C{exp}, rounded up: 365 right after a 365-day license is issued, 1 on its
        last day, 0 or less once expired.
        """
        return math.ceil((self.expires - now) / 86400)

    def describeStatus(self, now: float) -> str:
        """One phrase: C{valid (N days left)}, C{EXPIRED ...}, C{NOT YET VALID ...}."""
        status = self.status(now)
        if status == "expired":
            ago = math.floor((now - self.expires) / 86400)
            when = "today" if ago == 0 else f"{ago} day{'s' if ago != 1 else ''} ago"
            return f"EXPIRED on {_utc(self.expires)} ({when})"
        if status == "not_yet_valid":
            days = math.ceil((self.notBefore - now) / 86400)
            return f"NOT YET VALID: valid from {_utc(self.notBefore)} (in {days} day(s))"
        days = self.daysLeft(now)
        return f"valid ({days} day{'s' if days != 1 else ''} left)"

    def render(self, now: float) -> str:
        """The license as C{mcpgw license show} prints it."""
        lines = [
            f"status: {self.describeStatus(now)}",
            f"licensee: {self.name} ({self.subject})",
            f"issuer: {self.issuer} (key {self.kid})",
            f"product: {self.product}",
            f"issued: {_utc(self.issuedAt)}",
            f"valid from: {_utc(self.notBefore)}",
            f"expires: {_utc(self.expires)}",
            f"days left: {max(self.daysLeft(now), 0)}",
        ]
        if self.entitlements:
            lines.append("entitlements:")
            lines.extend(f"  {k}: {_jsonish(v)}" for k, v in sorted(self.entitlements.items()))
        else:
            lines.append("entitlements: none")
        extra = sorted(set(self.claims) - set(REQUIRED_CLAIMS))
        lines.extend(f"{k}: {_jsonish(self.claims[k])}" for k in extra)
        return "\n".join(lines)


def _jsonish(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def verifyToken(token: str | bytes, keys: Sequence[LicenseKey] | None = None) -> License:
    """
    Verify a license token offline.

    @param keys: the trusted public keys; the built-in ones (L{builtinKeys}) when C{None}.
    @return: the verified license, whatever its dates (see L{License.status}).
    @raise LicenseError: the token is malformed, names an unknown key, fails its signature, or
        is for another product or issuer.
    """
    if keys is None:
        keys = builtinKeys()
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise LicenseError("malformed", "malformed: not a JWT (not ASCII text)") from None
    token = token.strip()
    if not token:
        raise LicenseError("malformed", "malformed: the file is empty")
    if token.count(".") != 2:
        raise LicenseError("malformed", "malformed: not a JWT (expected three dot-separated parts)")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as e:
        raise LicenseError("malformed", f"malformed: not a JWT ({e})") from None
    alg = header.get("alg")
    if alg != ALGORITHM:
        raise LicenseError(
            "malformed", f"malformed: algorithm {alg!r} (licenses are signed with {ALGORITHM})"
        )
    kid = header.get("kid")
    known = ", ".join(k.kid for k in keys) or "none"
    if not isinstance(kid, str) or not kid:
        raise LicenseError(
            "unknown_key", f"unknown key: the license names no signing key (kid); known: {known}"
        )
    key = next((k for k in keys if k.kid == kid), None)
    if key is None:
        raise LicenseError(
            "unknown_key",
            f"unknown key: signed with key {kid!r}, which this mcpgw does not trust (known: "
            f"{known}); a newer mcpgw may know it",
        )
    try:
        claims = jwt.decode(
            token,
            key.publicKey,
            algorithms=[ALGORITHM],
            options={
                # dates are judged by License.status, which keeps an expired license readable
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_iss": False,
                "verify_aud": False,
                "verify_sub": False,
                "verify_jti": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise LicenseError(
            "bad_signature",
            f"bad signature: the license was altered, or was not signed with key {kid!r}",
        ) from None
    except jwt.PyJWTError as e:
        raise LicenseError("malformed", f"malformed: {e}") from None
    return _checkClaims(claims, key)


def _checkClaims(claims: dict[str, Any], key: LicenseKey) -> License:
    missing = [c for c in REQUIRED_CLAIMS if c not in claims]
    if missing:
        raise LicenseError("malformed", f"malformed: missing claim(s) {', '.join(missing)}")
    for name in ("iss", "sub", "name", "product"):
        if not isinstance(claims[name], str) or not claims[name]:
            raise LicenseError("malformed", f"malformed: claim {name!r} must be a non-empty string")
    for name in ("iat", "nbf", "exp"):
        value = claims[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise LicenseError(
                "malformed", f"malformed: claim {name!r} must be an integer (seconds since epoch)"
            )
    if claims["exp"] <= claims["nbf"]:
        raise LicenseError("malformed", "malformed: 'exp' is not after 'nbf'")
    entitlements = claims["entitlements"]
    if not isinstance(entitlements, dict):
        raise LicenseError("malformed", "malformed: claim 'entitlements' must be a map")
    if claims["product"] != PRODUCT:
        raise LicenseError(
            "wrong_product",
            f"wrong product: this license is for {claims['product']!r}, not {PRODUCT!r}",
        )
    if claims["iss"] != key.issuer:
        raise LicenseError(
            "wrong_issuer",
            f"wrong issuer: {claims['iss']!r}; key {key.kid!r} signs for {key.issuer!r}",
        )
    return License(
        kid=key.kid,
        issuer=claims["iss"],
        subject=claims["sub"],
        name=claims["name"],
        issuedAt=claims["iat"],
        notBefore=claims["nbf"],
        expires=claims["exp"],
        product=claims["product"],
        entitlements=dict(entitlements),
        claims=dict(claims),
    )


def loadLicense(path: str, keys: Sequence[LicenseKey] | None = None) -> License:
    """
    Read and verify the license file at C{path}.

    @raise LicenseError: unreadable (C{reason="unreadable"}) or invalid (see L{verifyToken}).
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LICENSE_BYTES + 1)
    except OSError as e:
        raise LicenseError("unreadable", f"cannot read: {e.strerror or e}") from None
    if len(data) > MAX_LICENSE_BYTES:
        raise LicenseError("malformed", f"malformed: larger than {MAX_LICENSE_BYTES} bytes")
    return verifyToken(data, keys)


# -- In the gateway -----------------------------------------------------------------------------


Mode = Literal["evaluation", "licensed", "expired", "not_yet_valid"]


@attr.frozen
class LicenseState:
    """
    The license a gateway runs under: C{license} is C{None} in evaluation mode.

    @ivar path: the configured C{license.file}, if any.
    """

    path: str | None
    license: License | None

    def mode(self, now: float) -> Mode:
        if self.license is None:
            return "evaluation"
        status = self.license.status(now)
        return "licensed" if status == "valid" else status

    def messages(self, now: float) -> list[tuple[str, str]]:
        """C{(level, text)} lines to log about this license now: C{info} or C{warn}."""
        lic = self.license
        if lic is None:
            return [
                (
                    "info",
                    "evaluation mode: no license.file is configured; mcpgw serves normally. "
                    "Configure license.file to run licensed.",
                )
            ]
        who = f"{lic.name} ({lic.subject})"
        mode = self.mode(now)
        if mode == "expired":
            return [
                (
                    "warn",
                    f"license {self.path} for {who} {lic.describeStatus(now)}; mcpgw keeps "
                    "serving. Renew the license and reload (systemctl reload mcpgw).",
                )
            ]
        if mode == "not_yet_valid":
            return [
                (
                    "warn",
                    f"license {self.path} for {who} is {lic.describeStatus(now)}; mcpgw keeps "
                    "serving. Check the host clock, or install the current license.",
                )
            ]
        out = [
            (
                "info",
                f"licensed to {who} by {lic.issuer}; expires {_utc(lic.expires)} "
                f"({lic.daysLeft(now)} days left)",
            )
        ]
        if lic.daysLeft(now) < RENEWAL_WARNING_DAYS:
            out.append(
                ("warn", f"license {self.path} expires in {lic.daysLeft(now)} day(s); renew it")
            )
        return out


def _fileLine(source: str, keys: Sequence[str]) -> int | None:
    """The 1-based line of the value at C{keys} (a mapping path) in the YAML file C{source}."""
    import yaml

    try:
        with open(source, encoding="utf-8") as f:
            node: Any = yaml.compose(f, Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        node = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
    return None if node is None else node.start_mark.line + 1


def licenseState(config: Config, keys: Sequence[LicenseKey] | None = None) -> LicenseState:
    """
    Verify the license a configuration names.

    @return: the state to run under (evaluation mode when C{license.file} is unset); an expired
        or not-yet-valid license is a state, not an error.
    @raise ConfigError: the license file is unreadable or invalid, as the problem
        C{license.file: PATH: what is wrong (line N)}.
    """
    path = config.license.file
    if path is None:
        return LicenseState(None, None)
    try:
        return LicenseState(path, loadLicense(path, keys))
    except LicenseError as e:
        line = _fileLine(config.source, ("license", "file"))
        raise ConfigError([Problem("license.file", f"{path}: {e}", line)], config.source) from None


class LicenseService(Service):
    """
    Logs the license state when the gateway starts and once a day (L{CHECK_INTERVAL}), and
    follows reloads. Never stops the gateway and never rejects a reload: a policy change must
    not wait for license paperwork (C{mcpgw config check} reports a bad license before a reload;
    a restart refuses it).

      - Daily, the configured file is read again, so a renewed license dropped in place is
        picked up; a file that no longer verifies is logged as an error and the last good
        state kept.
      - After a reload, the reloader hands the new config to L{configChanged}: its license is
        verified and logged if it changed.
    """

    name = "license"

    def __init__(
        self,
        reactor: Any,
        state: LicenseState,
        keys: Sequence[LicenseKey] | None = None,
        logger: Logger = log,
    ) -> None:
        self.reactor = reactor
        self.state = state
        self._keys = keys
        self._log = logger
        self._loops: list[LoopingCall] = []

    def _now(self) -> float:
        seconds: Callable[[], float] | None = getattr(self.reactor, "seconds", None)
        return seconds() if seconds is not None else time.time()

    def announce(self) -> None:
        """Log the current state (info, or warnings for expired / not yet valid / expiring)."""
        for level, text in self.state.messages(self._now()):
            getattr(self._log, level)("{text}", text=text)

    def startService(self) -> None:
        super().startService()
        self.announce()
        loop = LoopingCall(self.check)
        loop.clock = self.reactor
        loop.start(CHECK_INTERVAL, now=False).addErrback(
            lambda f: self._log.failure("license check failed", f)
        )
        self._loops.append(loop)

    def stopService(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        super().stopService()

    def _reverify(self, path: str, why: str) -> None:
        try:
            self.state = LicenseState(path, loadLicense(path, self._keys))
        except LicenseError as e:
            self._log.error(
                "license {path} {why} does not verify: {error}. mcpgw keeps serving under the "
                "license verified earlier ({earlier}), but will refuse to start with this file",
                path=path,
                why=why,
                error=str(e),
                earlier=self.state.path or "evaluation mode",
            )

    def check(self) -> None:
        """The daily check: re-read the file, then log the state."""
        if self.state.path is not None:
            self._reverify(self.state.path, "(daily check)")
        self.announce()

    def configChanged(self, config: Config) -> None:
        """A reload published C{config}: verify its license; log it if it changed."""
        previous = self.state
        path = config.license.file
        if path is None:
            self.state = LicenseState(None, None)
        else:
            self._reverify(path, "(after reload)")
        if self.state != previous:
            self.announce()
