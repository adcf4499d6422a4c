"""The in-memory fakes of mcpgw.testing provide the interfaces the real parts provide."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from mcpgw.audit.sinks import ISink
from mcpgw.auth import Authenticator, AuthResult
from mcpgw.config import BatchConfig, WebhookSinkConfig
from mcpgw.errors import Unauthenticated
from mcpgw.interfaces import IAuditLog, IAuthenticator, IResponseSink, ITracer
from mcpgw.telemetry import Tracer
from mcpgw.testing import (
    MemoryAuditLog,
    MemorySink,
    MemoryTracer,
    RecordingSink,
    StaticAuthenticator,
)


class FakeTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        """Each fake provides its interface, as do the real tracer."""
        sink = MemorySink(WebhookSinkConfig(name="m", url="https://x/", batch=BatchConfig(1, 0)))
        verifyObject(ISink, sink)
        verifyObject(IAuditLog, MemoryAuditLog())
        verifyObject(IResponseSink, RecordingSink())
        verifyObject(ITracer, MemoryTracer())
        verifyObject(IAuthenticator, StaticAuthenticator())
        verifyClass(ITracer, Tracer)
        verifyClass(IAuthenticator, Authenticator)

    def test_staticAuthenticator(self) -> None:
        """It answers its result, or raises its error, and records every call."""
        auth = StaticAuthenticator(AuthResult("ok", "ci-bot"))
        self.assertEqual(auth.authenticate(b"Bearer x", "127.0.0.1", None).keyId, "ci-bot")
        refusing = StaticAuthenticator(Unauthenticated(auth_result="missing"))
        self.assertRaises(Unauthenticated, refusing.authenticate, None, "127.0.0.1", None)
        self.assertEqual(auth.calls, [(b"Bearer x", "127.0.0.1", None)])
