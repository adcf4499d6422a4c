"""
C{state.backend: redis}: the protocol's pipelining and deadlines (in memory), the Deferred paths
of the policy verdict and the auth throttle (L{mcpgw.testing.HeldState}), and the gateway against
a real C{redis-server}: shared rule buckets, input limit and throttle, two replicas sharing one
limit, Redis stopped or paused mid-run (C{on_error} within C{timeout_ms}) and recovery.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import attr
from argon2 import PasswordHasher
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mcpgw.auth import MISS_BURST, Authenticator
from mcpgw.buckets import MemoryState, TokenBuckets
from mcpgw.cli import stateWarnings
from mcpgw.config import ConfigError, RedisConfig, StateConfig, config_from_string, lease_size
from mcpgw.errors import RateLimited
from mcpgw.interfaces import IBuckets, IStateBackend
from mcpgw.metrics import redisSamples
from mcpgw.policy import Caller, Policy, Verdict
from mcpgw.redisstate import (
    DEAD_AFTER,
    LEASE_SECONDS,
    SWEEP_SECONDS,
    TAKE_SHA,
    RedisBuckets,
    RedisProtocol,
    RedisState,
    RedisStats,
    RedisTimeout,
)
from mcpgw.testing import HeldState
from tests.redisserver import RedisServer, skipReason
from tests.support import GatewayTestCase, freePort, request, rpc

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
KEY = "mcpgw_test_key_for_redis_state"
KEY_HASH = FAST.hash(KEY)


def call(tool: str, id: Any = 1) -> bytes:
    return rpc("tools/call", {"name": tool, "arguments": {}}, id=id)


class SeamTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        """Both backends, the fake and their buckets provide the state seam's interfaces."""
        redis = RedisState(Clock(), RedisConfig())
        for state in (MemoryState(), HeldState(), redis):
            verifyObject(IStateBackend, state)
            verifyObject(IBuckets, state.buckets("rule:r", 1.0, 2.0, 10))
        self.assertIsInstance(redis.buckets("input", 1, 2, 3), RedisBuckets)
        self.assertIsInstance(MemoryState().buckets("input", 1, 2, 3), TokenBuckets)

    def test_redisURLPasswordMasked(self) -> None:
        """A password from the environment is used, but never shown (repr, /readyz detail)."""
        text = (
            "upstreams: [{name: a, url: 'http://127.0.0.1:9/mcp'}]\n"
            "state: {backend: redis, redis: {url: 'rediss://app:${PW}@redis.example:6380/3'}}\n"
        )
        config = config_from_string(text, environ={"PW": "s3cr%40t"})
        self.assertNotIn("s3cr", repr(config))
        state = RedisState(Clock(), config.state.redis)
        self.assertEqual((state._user, state._password, state._db), ("app", "s3cr@t", 3))
        _, _, detail = state.readinessCheck()
        self.assertEqual(detail["url"], "rediss://app:***@redis.example:6380/3")
        self.assertNotIn("s3cr", json.dumps(detail))

    def test_notConnectedAnswersOnError(self) -> None:
        """Without a connection, a rule's take is answered at once by on_error (allow, or deny)."""
        for onError, expected in (("allow", None), ("deny", 1.0)):
            state = RedisState(Clock(), RedisConfig(on_error=onError))
            d = state.buckets("rule:r", 1, 5, 10).take("k", 0.0)
            assert isinstance(d, Deferred)
            self.assertEqual(self.successResultOf(d), expected)
            self.assertEqual((state.stats.unavailable, state.stats.onError), (1, 1))

    def test_notConnectedInputFallsBackToLocalBuckets(self) -> None:
        """Without a connection, the input limit and the throttle use this process's buckets."""
        state = RedisState(Clock(), RedisConfig(on_error="allow"))
        for kind in ("input", "auth"):
            buckets = state.buckets(kind, 0.001, 2, 10)
            answers = [
                self.successResultOf(maybeDeferred(buckets.take, "10.0.0.9", 0.0)) for _ in range(3)
            ]
            self.assertEqual(answers[:2], [None, None])
            self.assertIsNotNone(answers[2])


class WorkersWarningTests(SynchronousTestCase):
    def test_memoryWithWorkersWarns(self) -> None:
        """config check warns that memory limits are per worker when there are several."""
        text = (
            "upstreams: [{name: a, url: 'http://127.0.0.1:9/mcp'}]\n"
            "policy: {rules: [{id: r, action: rate_limit, match: {exact: t},"
            " rate_limit: {rate: 1}}]}\n"
        )
        config = config_from_string(text)
        self.assertEqual(stateWarnings(config), [])  # one worker (the default)
        # listen.workers comes with the workers feature; a stand-in listen section here.
        several = attr.evolve(config, listen=_Listen(workers=2))  # type: ignore[arg-type]
        [warning] = stateWarnings(several)
        self.assertIn("listen.workers 2: rate_limit rules are per worker", warning)
        redis = attr.evolve(several, state=StateConfig(backend="redis"))
        self.assertEqual(stateWarnings(redis), [])


@attr.s(auto_attribs=True)
class _Listen:
    workers: int | str = 1


class HeldPolicyTests(SynchronousTestCase):
    """Policy verdicts when the buckets answer later."""

    RULES = """
upstreams: [{name: a, url: 'http://127.0.0.1:9/mcp'}]
policy:
  rules:
    - {id: no-shell, action: deny, match: {exact: shell}}
    - {id: slow, action: rate_limit, match: {exact: search}, rate_limit: {rate: 0.001, burst: 2, per: key}}
"""

    def setUp(self) -> None:
        self.state = HeldState()
        self.policy = Policy.fromConfig(config_from_string(self.RULES).policy, state=self.state)
        self.caller = Caller(keyId="ci", client="10.0.0.1")

    def verdict(self, *tools: str) -> Deferred[Verdict]:
        msgs = [json.loads(call(t, id=i)) for i, t in enumerate(tools)]
        d = self.policy.verdict(msgs if len(msgs) > 1 else msgs[:1], self.caller, 0.0)
        assert isinstance(d, Deferred)
        return d

    def test_waitsForTheBucket(self) -> None:
        """A rate-limited call's verdict waits for its bucket; the third of burst 2 is refused."""
        ds = [self.verdict("search") for _ in range(3)]
        self.assertNoResult(ds[0])
        self.assertEqual([h[:2] for h in self.state.held], [("rule:slow", "key:ci")] * 3)
        self.assertEqual(self.state.release(), 3)
        verdicts = [self.successResultOf(d) for d in ds]
        self.assertEqual([v.decision for v in verdicts], ["allow", "allow", "rate_limit"])
        refusal = verdicts[2].refusal
        assert isinstance(refusal, RateLimited)
        self.assertEqual((refusal.data, refusal.retryAfter), ({"rule_id": "slow"}, 1000))

    def test_batchOrder(self) -> None:
        """In a batch, a refused rate-limited call before a denied one decides; else the deny."""
        self.verdict("search", "search")
        self.state.release()  # the bucket is empty now
        d = self.verdict("search", "shell")
        self.state.release()
        self.assertEqual(self.successResultOf(d).decision, "rate_limit")
        d = self.verdict("search", "shell")
        self.state.fail(None)  # on_error: allow
        self.assertEqual(self.successResultOf(d).decision, "deny")

    def test_otherCallsStaySynchronous(self) -> None:
        """Calls no rate_limit rule decides are decided at once, without the backend."""
        v = self.policy.verdict([json.loads(call("read"))], self.caller, 0.0)
        self.assertIsInstance(v, Verdict)
        self.assertEqual(self.state.held, [])


class HeldThrottleTests(SynchronousTestCase):
    def test_throttleAnswersLater(self) -> None:
        """The auth throttle's refusal arrives through the Deferred, as a 429 of scope auth."""
        state = HeldState()
        auth = Authenticator(
            Clock(),
            config_from_string(
                "upstreams: [{name: a, url: 'http://127.0.0.1:9/mcp'}]\n"
                f"auth: {{enabled: true, keys: [{{id: k, hash: '{KEY_HASH}'}}]}}\n"
            ).auth,
            None,
            None,
            state.buckets("auth", 1.0, 1.0, 10),
        )
        d = auth.authenticate(b"Bearer wrong-one", "10.0.0.2", None)
        self.assertEqual(state.held[0][:2], ("auth", "10.0.0.2"))
        state.fail(1.0)  # refused (as on_error: deny would)
        failure = self.failureResultOf(d, RateLimited)
        self.assertEqual(failure.value.data, {"scope": "auth"})


class ProtocolTests(SynchronousTestCase):
    """L{RedisProtocol}: pipelined commands, replies in order, one timer for the deadlines."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.stats = RedisStats()
        self.proto = RedisProtocol(self.clock, self.stats, 0.05)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def test_pipelined(self) -> None:
        """Commands go out without waiting; replies (read together) answer them in order."""
        a = self.proto.execute(b"GET", b"a")
        b = self.proto.execute(b"GET", b"b")
        self.assertEqual(self.transport.value().count(b"GET"), 2)
        self.proto.dataReceived(b"$1\r\nA\r\n-ERR nope\r\n")
        self.assertEqual(self.successResultOf(a), b"A")
        self.assertIn("nope", self.failureResultOf(b).getErrorMessage())
        self.assertEqual(self.stats.latencyCount, 2)

    def test_deadlines(self) -> None:
        """Late commands fail with RedisTimeout, their late replies are dropped, later ones work."""
        a = self.proto.execute(b"GET", b"a")
        self.clock.advance(0.03)
        b = self.proto.execute(b"GET", b"b")
        self.clock.advance(0.03)  # a is late, b is not yet
        self.failureResultOf(a, RedisTimeout)
        self.assertNoResult(b)
        self.clock.advance(0.03)
        self.failureResultOf(b, RedisTimeout)
        c = self.proto.execute(b"GET", b"c")
        self.clock.advance(0.06)  # c has its own deadline, though a and b are still unanswered
        self.failureResultOf(c, RedisTimeout)
        d = self.proto.execute(b"GET", b"d")
        self.proto.dataReceived(b":1\r\n:2\r\n:3\r\n:4\r\n")
        self.assertEqual(self.successResultOf(d), 4)
        self.assertEqual(self.stats.lateReplies, 3)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_silentConnectionDropped(self) -> None:
        """A connection whose overdue replies never come is aborted (and then remade)."""
        d = self.proto.execute(b"GET", b"a")
        self.clock.advance(0.06)
        self.failureResultOf(d, RedisTimeout)
        self.clock.advance(max(1.0, DEAD_AFTER * 0.05))
        self.assertTrue(self.transport.disconnecting)

    def test_connectionLostFailsTheRest(self) -> None:
        """A lost connection fails every outstanding command that had not timed out."""
        d = self.proto.execute(b"GET", b"a")
        self.proto.connectionLost(Failure(ConnectionError("gone")))
        self.assertIn("connection lost", self.failureResultOf(d).getErrorMessage())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _RedisMixin:
    """A real redis-server for the test."""

    redis: RedisServer
    tmp: str

    def assertNear(self, first: float, second: float, delta: float) -> None:
        """(trial's assertAlmostEqual has no C{delta})"""
        if abs(first - second) > delta:
            raise AssertionError(f"{first!r} != {second!r} within {delta!r}")

    def startRedis(self) -> None:
        reason = skipReason()
        if reason is not None:
            raise SkipTest(reason)
        import tempfile

        self.redis = RedisServer(tempfile.mkdtemp(prefix="mcpgw-redis-")).start()
        self.addCleanup(self.redis.stop)

    @inlineCallbacks
    def waitFor(self, condition: Any, seconds: float = 15.0) -> Any:
        """Poll C{condition} every 10 ms until it holds; fail after C{seconds}."""
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting")
            yield deferLater(reactor, 0.01, lambda: None)


class _RedisGateway(_RedisMixin, GatewayTestCase):
    """The in-process gateway with its buckets in a real Redis."""

    onError = "allow"
    timeoutMs = 200
    # Both buckets are below lease_tokens: auto's smallest leased burst (128): every call asks
    # Redis (LeaseGatewayTests has the leased ones).
    rules = (
        "    - {id: per-key, action: rate_limit, match: {exact: search},"
        " rate_limit: {rate: 0.001, burst: 5, per: key}}\n"
        "    - {id: roomy, action: rate_limit, match: {exact: roomy},"
        " rate_limit: {rate: 1000, burst: 100, per: global}}\n"
    )
    limits = ""

    def setUp(self) -> Any:
        self.startRedis()
        self.extraConfig = (
            f"auth: {{enabled: true, keys: [{{id: ci, hash: '{KEY_HASH}'}}]}}\n"
            "policy:\n  rules:\n" + self.rules + self.limits + "state:\n  backend: redis\n"
            f"  redis: {{url: '{self.redis.url}', timeout_ms: {self.timeoutMs},"
            f" on_error: {self.onError}, key_prefix: 't1:'}}\n"
        )
        d = super().setUp()
        d.addCallback(lambda _: self.state.whenConnected())
        return d

    @property
    def state(self) -> RedisState:
        return self.service.getServiceNamed("state")

    def callKey(self, tool: str, key: str = KEY) -> Deferred[Any]:
        return self.call(body=call(tool), headers={"Authorization": f"Bearer {key}"})


class RedisGatewayTests(_RedisGateway):
    @inlineCallbacks
    def test_ruleBucketInRedis(self) -> Any:
        """A per-key burst of 5 allows 5 calls, then 429; the bucket is a Redis hash."""
        statuses = []
        for _ in range(6):
            reply = yield self.callKey("search")
            statuses.append(reply.status)
        self.assertEqual(statuses, [200] * 5 + [429])
        self.assertEqual(reply.json()["error"]["data"], {"rule_id": "per-key"})
        self.assertGreaterEqual(int(reply.header("Retry-After")[0]), 1)
        self.assertEqual(
            set(self.redis.command("KEYS", "t1:*")),
            {b"t1:rl:rule:per-key:key:ci", b"t1:rl:auth:127.0.0.1"},  # + the key's verification
        )
        self.assertEqual(self.redis.command("SCRIPT", "EXISTS", TAKE_SHA), [1])
        line = self.auditLines()[-1]
        self.assertEqual(
            (line["decision"], line["rule_id"], line["status"]), ("rate_limit", "per-key", 429)
        )
        self.assertEqual(self.state.stats.commands, 7)

    @inlineCallbacks
    def test_readyzShowsRedis(self) -> Any:
        """/readyz shows the Redis backend's state and counters."""
        reply = yield self.call(method="GET", path="/readyz", body=None)
        state = reply.json()["state"]
        self.assertEqual(
            (state["backend"], state["connected"], state["url"], state["on_error"]),
            ("redis", True, self.redis.url, "allow"),
        )

    @inlineCallbacks
    def test_pausedRedisTimesOut(self) -> Any:
        """
        Redis paused (SIGSTOP): a rate-limited call is answered by on_error (allow) once
        timeout_ms passes; resumed, the late reply is dropped and Redis decides again.
        """
        reply = yield self.callKey("roomy")  # the key verified (and cached) first
        self.assertEqual(reply.status, 200)
        self.redis.pause()
        try:
            started = time.monotonic()
            reply = yield self.callKey("roomy")
            elapsed = time.monotonic() - started
        finally:
            self.redis.resume()
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.state.stats.timeouts, 1)
        self.assertLess(elapsed, 5.0)  # bounded by timeout_ms (0.2 s), not by Redis
        yield self.waitFor(lambda: self.state.stats.lateReplies == 1)
        for _ in range(6):
            reply = yield self.callKey("search")
        self.assertEqual(reply.status, 429)


class RedisOnErrorDenyTests(_RedisGateway):
    onError = "deny"
    limits = "limits: {input_rate_limit: {rate: 0.001, burst: 40}}\n"

    @inlineCallbacks
    def test_redisStoppedThenBack(self) -> Any:
        """
        Redis stopped mid-run: on_error deny refuses rate-limited calls (429) at once, the input
        limit falls back to local buckets (so the call gets that far); Redis back on its port:
        the gateway reconnects and Redis decides again.
        """
        reply = yield self.callKey("roomy")
        self.assertEqual(reply.status, 200)
        self.redis.stop()
        yield self.waitFor(lambda: not self.state.stats.connected)
        reply = yield self.callKey("roomy")
        self.assertEqual(reply.status, 429)
        self.assertEqual(reply.json()["error"]["data"], {"rule_id": "roomy"})
        self.assertEqual(reply.header("Retry-After"), ["1"])
        self.assertGreaterEqual(self.state.stats.onError, 2)  # the input limit's and the rule's
        line = self.auditLines()[-1]
        self.assertEqual((line["decision"], line["status"]), ("rate_limit", 429))
        self.redis.start()
        yield self.waitFor(lambda: self.state.stats.connected)
        reply = yield self.callKey("roomy")
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.state.stats.connects, 2)

    @inlineCallbacks
    def test_inputLimitAndThrottleInRedis(self) -> Any:
        """The input limit and the auth throttle take from Redis buckets too."""
        statuses = []
        misses = int(MISS_BURST)
        for i in range(misses + 1):  # wrong keys: each one is verified, throttled per address
            reply = yield self.callKey("roomy", key=f"wrong-key-{i}")
            statuses.append(reply.status)
        self.assertEqual(statuses, [401] * misses + [429])
        self.assertEqual(reply.json()["error"]["data"]["scope"], "auth")
        keys = set(self.redis.command("KEYS", "t1:*"))
        self.assertEqual(keys, {b"t1:rl:input:127.0.0.1", b"t1:rl:auth:127.0.0.1"})
        tokens = float(self.redis.command("HGET", "t1:rl:input:127.0.0.1", "v"))
        self.assertLess(abs(tokens - (40 - (misses + 1))), 0.5)


class RedisInputLimitTests(_RedisGateway):
    limits = "limits: {input_rate_limit: {rate: 0.001, burst: 2}}\n"

    @inlineCallbacks
    def test_inputLimitRefusesFromRedis(self) -> Any:
        """
        The input limit's answer comes from Redis while the body is read: the third request
        from the address is refused (429, scope input) before it is parsed or authenticated,
        and audited with its method and path.
        """
        statuses = []
        for _ in range(3):
            reply = yield self.callKey("roomy")
            statuses.append(reply.status)
        self.assertEqual(statuses, [200, 200, 429])
        self.assertEqual(reply.json()["error"]["data"], {"scope": "input"})
        self.assertEqual(reply.header("Connection"), ["close"])
        line = self.auditLines()[-1]
        self.assertEqual(
            (line["status"], line["http_method"], line["path"], line["auth_result"]),
            (429, "POST", "/mcp", None),
        )
        self.assertEqual(len(self.upstream.seen), 2)
        tokens = float(self.redis.command("HGET", "t1:rl:input:127.0.0.1", "v"))
        self.assertLess(tokens, 1.0)


class ReplicaTests(_RedisMixin, GatewayTestCase):
    """Two gateway processes (replicas) with one Redis: one limit, not two."""

    def setUp(self) -> Any:
        self.startRedis()
        return super().setUp()

    def startReplica(self, n: int, listen: str = "") -> Deferred[int]:
        port = freePort()
        path = os.path.join(self.tmp, f"replica{n}.yaml")
        up = self.upstreamPort.getHost().port
        with open(path, "w") as f:
            f.write(
                f"listen: {{host: 127.0.0.1, port: {port}{listen}}}\n"
                f"upstreams: [{{name: up, url: 'http://127.0.0.1:{up}/mcp', path: /mcp}}]\n"
                f"audit: {{path: audit{n}.jsonl, fsync: none, state_dir: state{n}}}\n"
                f"auth: {{enabled: true, keys: [{{id: ci, hash: '{KEY_HASH}'}}]}}\n"
                "policy:\n  rules:\n"
                "    - {id: per-key, action: rate_limit, match: {exact: search},"
                " rate_limit: {rate: 0.001, burst: 5, per: key}}\n"
                f"state: {{backend: redis, redis: {{url: '{self.redis.url}'}}}}\n"
            )
        proc = subprocess.Popen(
            [sys.executable, "-m", "mcpgw", "run", "--config", path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def stop() -> None:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

        self.addCleanup(stop)

        def ready() -> int:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise AssertionError(f"replica {n} exited ({proc.returncode})")
                try:
                    state = request(port, "GET", "/readyz", None, {}, timeout=2).json()["state"]
                    if state["connected"]:
                        return port
                except (OSError, KeyError, ValueError):
                    pass
                time.sleep(0.1)
            raise AssertionError(f"replica {n} did not connect to Redis")

        return threads.deferToThread(ready)

    @inlineCallbacks
    def test_twoReplicasShareOneLimit(self) -> Any:
        """A per-key burst of 5 allows 5 calls across two replicas, not 10."""
        ports = yield Deferred.fromCoroutine(self._both())
        statuses = []
        for i in range(10):
            reply = yield self.call(
                body=call("search"), headers={"Authorization": f"Bearer {KEY}"}, port=ports[i % 2]
            )
            statuses.append(reply.status)
        self.assertEqual(sorted(statuses), [200] * 5 + [429] * 5)
        self.assertEqual(statuses[:5], [200] * 5)
        self.assertEqual(len(self.upstream.seen), 5)

    async def _both(self) -> list[int]:
        a, b = self.startReplica(1), self.startReplica(2)
        return [await a, await b]

    @inlineCallbacks
    def test_replicasAndWorkersShareOneLimit(self) -> Any:
        """
        Two replicas and a third gateway with two workers (four serving processes), one Redis:
        a per-key burst of 5 allows 5 calls across all of them, not 20; the workers' host
        reports its Redis connections and round trips on /metrics.
        """
        admin = freePort()
        ports = yield Deferred.fromCoroutine(self._three(admin))

        def bothWorkersUp() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                text = request(admin, "GET", "/metrics", None, {}).body.decode()
                if 'mcpgw_workers{state="alive"} 2.0' in text and "mcpgw_redis_up 2.0" in text:
                    return
                time.sleep(0.1)
            raise AssertionError("the two workers did not both connect to Redis")

        yield threads.deferToThread(bothWorkersUp)
        statuses = []
        for i in range(12):
            reply = yield self.call(
                body=call("search"), headers={"Authorization": f"Bearer {KEY}"}, port=ports[i % 3]
            )
            statuses.append(reply.status)
        self.assertEqual(statuses, [200] * 5 + [429] * 7)
        self.assertEqual(len(self.upstream.seen), 5)
        metrics = yield threads.deferToThread(request, admin, "GET", "/metrics", None, {})
        text = metrics.body.decode()
        self.assertIn("mcpgw_redis_up 2.0", text)  # both workers connected
        count = [
            line
            for line in text.splitlines()
            if line.startswith("mcpgw_redis_latency_seconds_count")
        ]
        self.assertEqual(len(count), 1)
        self.assertGreaterEqual(float(count[0].split()[-1]), 4.0)  # calls 3, 6, 9, 12 at least

    async def _three(self, admin: int) -> list[int]:
        a, b = self.startReplica(1), self.startReplica(2)
        c = self.startReplica(3, f", workers: 2, admin: {{host: 127.0.0.1, port: {admin}}}")
        return [await a, await b, await c]


class ConnectionTests(_RedisMixin, TestCase):
    """Connecting for real: an ACL user with a password from the environment, a wrong
    password, TLS with the operator's CA."""

    def setUp(self) -> None:
        self.startRedis()

    def connect(self, yaml: str, **environ: str) -> RedisState:
        config = config_from_string(
            "upstreams: [{name: a, url: 'http://127.0.0.1:9/mcp'}]\n" + yaml,
            environ=environ,
            base_dir=self.redis.directory,
        )
        state = RedisState(reactor, config.state.redis)
        state.startService()
        self.addCleanup(state.stopService)
        return state

    @inlineCallbacks
    def test_aclUserWithPasswordFromEnvironment(self) -> Any:
        """A least-privilege ACL user (the commands docs/scaling-redis.md lists) is enough."""
        self.assertEqual(
            self.redis.command(
                "ACL", "SETUSER", "mcpgw", "on", ">pw s3cret", "~t2:*", "+evalsha",
                "+script|load", "+time", "+hmget", "+hset", "+pexpire",
            ),
            b"OK",
        )  # fmt: skip
        state = self.connect(
            "state: {backend: redis, redis: {key_prefix: 't2:',"
            f" url: 'redis://mcpgw:${{REDIS_PASSWORD}}@127.0.0.1:{self.redis.port}/0'}}}}\n",
            REDIS_PASSWORD="pw%20s3cret",
        )
        yield state.whenConnected()
        answers = []
        for _ in range(3):
            answers.append((yield state.buckets("rule:r", 0.001, 2, 10).take("k", 0.0)))
        self.assertEqual(answers[:2], [None, None])
        self.assertIsNotNone(answers[2])
        self.assertEqual(self.redis.command("KEYS", "*"), [b"t2:rl:rule:r:k"])
        self.assertEqual(state.stats.errors, 0)

    @inlineCallbacks
    def test_wrongPassword(self) -> Any:
        """A refused AUTH is reported (without the password) and takes are decided locally."""
        self.redis.command("CONFIG", "SET", "requirepass", "right")
        state = self.connect(
            f"state: {{backend: redis, redis: {{url: 'redis://:wrong@127.0.0.1:{self.redis.port}'}}}}\n"
        )
        deadline = time.monotonic() + 10
        while not (state.stats.lastError or "").startswith("WRONGPASS"):
            self.assertLess(time.monotonic(), deadline, state.stats.lastError)
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(state.stats.connected)
        self.assertNotIn("wrong", state.stats.lastError)
        answer = yield state.buckets("rule:r", 1, 1, 10).take("k", 0.0)
        self.assertIsNone(answer)  # on_error: allow
        self.assertEqual(state.stats.unavailable, 1)

    @inlineCallbacks
    def test_tlsWithTheOperatorsCA(self) -> Any:
        """rediss:// verifies the server against state.redis.ca_file."""
        from tests.pki import CA

        ca = CA()
        directory = self.redis.directory
        cert, key = ca.server("localhost").write(directory, "redis")
        caPath = ca.writeCert(directory, "ca")
        tlsPort = freePort()
        server = RedisServer(
            directory, None, "--tls-port", str(tlsPort), "--tls-cert-file", cert,
            "--tls-key-file", key, "--tls-ca-cert-file", caPath, "--tls-auth-clients", "no",
        ).start()  # fmt: skip
        self.addCleanup(server.stop)
        state = self.connect(
            "state: {backend: redis, redis: {ca_file: ca.crt,"
            f" url: 'rediss://localhost:{tlsPort}/0'}}}}\n"
        )
        yield state.whenConnected()
        answer = yield state.buckets("rule:r", 1, 1, 10).take("k", 0.0)
        self.assertIsNone(answer)
        self.assertEqual(server.command("EXISTS", "mcpgw:rl:rule:r:k"), 1)


def evalshaCalls(redis: RedisServer) -> int:
    """How many EVALSHA commands the server ran since its last C{CONFIG RESETSTAT}."""
    for line in redis.command("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


class LeaseConfigTests(SynchronousTestCase):
    def parse(self, value: str) -> Any:
        return config_from_string(
            "upstreams: [{name: a, url: 'http://127.0.0.1:9/mcp'}]\n"
            f"state: {{backend: redis, redis: {{lease_tokens: {value}}}}}\n"
        ).state.redis.lease_tokens

    def test_values(self) -> None:
        """auto (the default) or an integer from 0 to 1000; anything else is refused."""
        self.assertEqual(RedisConfig().lease_tokens, "auto")
        self.assertEqual([self.parse(v) for v in ("auto", "0", "1", "16")], ["auto", 0, 1, 16])
        for bad, message in (
            ("lots", "must be an integer or auto, got 'lots'"),
            ("-1", "must be between 0 and 1000"),
            ("1001", "must be between 0 and 1000"),
            ("2.5", "must be an integer"),
            ("true", "must be an integer"),
        ):
            with self.assertRaises(ConfigError) as cm:
                self.parse(bad)
            [problem] = cm.exception.problems
            self.assertIn("state.redis.lease_tokens", str(problem))
            self.assertIn(message, str(problem))

    def test_leaseSize(self) -> None:
        """auto: min(16, burst // 64), so a burst under 128 is never leased; N: N; 0, 1: none."""
        self.assertEqual(
            [lease_size("auto", b) for b in (5, 127, 128, 200, 1000, 1e9)], [1, 1, 2, 3, 15, 16]
        )
        self.assertEqual([lease_size(n, 5) for n in (0, 1, 16)], [1, 1, 16])

    def test_leasedSamples(self) -> None:
        """The metrics count takes allowed from leases, and failed prefetches and give-backs."""
        stats = RedisStats(leased=7, leaseErrors=2)
        samples = list(redisSamples(stats))
        self.assertIn(("mcpgw_redis_leased_total", (), 7.0), samples)
        self.assertIn(("mcpgw_redis_errors_total", (("kind", "lease"),), 2.0), samples)
        self.assertEqual((stats.asDict()["leased"], stats.asDict()["lease_errors"]), (7, 2))


class LeaseTests(_RedisMixin, TestCase):
    """Leases of tokens (state.redis.lease_tokens), against a real redis-server."""

    def setUp(self) -> None:
        self.startRedis()

    @inlineCallbacks
    def connect(self, leaseTokens: int | str = "auto", clock: Any = None) -> Any:
        state = RedisState(
            reactor,
            RedisConfig(url=self.redis.url, key_prefix="t3:", lease_tokens=leaseTokens),
            clock=clock,
        )
        state.startService()
        self.addCleanup(state.stopService)
        yield state.whenConnected()
        return state

    def level(self, key: str = "t3:rl:rule:r:k") -> float:
        return float(self.redis.command("HGET", key, "v"))

    @inlineCallbacks
    def takes(self, buckets: RedisBuckets, n: int, key: str = "k") -> Any:
        """
        C{n} takes one after the other, each once no lease is being fetched (calls spaced by
        more than a round trip, as a steady stream of requests is); their answers.
        """
        answers: list[float | None] = []
        leases = buckets._state.leases
        for _ in range(n + 1):
            while any(lease.fetching for lease in leases.values()):
                yield deferLater(reactor, 0.001, lambda: None)
            if len(answers) < n:
                answers.append((yield buckets.take(key, 0.0)))
        return answers

    @inlineCallbacks
    def test_oneRoundTripPerLease(self) -> Any:
        """
        With a big bucket (auto: a lease of 16), 160 calls make about one EVALSHA per 8 calls:
        one take, then a prefetch each time half the lease is used; every other call is allowed
        at once from the lease. Redis's level accounts for every token: used or held here.
        """
        state = yield self.connect()
        buckets = state.buckets("rule:r", 0.001, 10000, 10)
        self.assertEqual(buckets.lease, 16)
        self.redis.command("CONFIG", "RESETSTAT")
        answers = yield self.takes(buckets, 160)
        self.assertEqual(answers, [None] * 160)
        calls = evalshaCalls(self.redis)
        self.assertEqual(calls, 160 // 8 + 1)
        self.assertEqual(calls, state.stats.commands + state.stats.leaseFetches)
        self.assertEqual(state.stats.commands, 1)
        self.assertEqual(state.stats.leased, 159)
        yield self.takes(buckets, 0)  # the last prefetch answered
        held = state.leases[b"t3:rl:rule:r:k"].count
        self.assertLessEqual(held, 16)
        self.assertNear(self.level() + 160 + held, 10000, delta=0.5)

    @inlineCallbacks
    def test_leaseTokensZero(self) -> Any:
        """lease_tokens: 0 asks Redis for one token per call, as without leases."""
        state = yield self.connect(0)
        buckets = state.buckets("rule:r", 0.001, 10000, 10)
        self.redis.command("CONFIG", "RESETSTAT")
        answers = yield self.takes(buckets, 20)
        self.assertEqual(answers, [None] * 20)
        self.assertEqual(evalshaCalls(self.redis), 20)
        self.assertEqual((state.stats.commands, state.stats.leased, state.leases), (20, 0, {}))
        self.assertNear(self.level(), 10000 - 20, delta=0.5)

    @inlineCallbacks
    def test_halfBurstRule(self) -> Any:
        """
        The script grants extra tokens only above half the burst: a bucket of 40 asked for 16 at
        a time grants 16, then 4, then one per take down to empty (40 in all), then a wait; a
        prefetch of a bucket at or below half gets nothing; a give-back fills up to the burst.
        Through RedisState, takes of a bucket below half full each go to Redis.
        """
        state = yield self.connect(16)
        run = self.redis.command
        args = ("EVALSHA", TAKE_SHA, "1", "t3:rl:rule:s:k", "0.001", "40", "16")
        grants = [run(*args, "t") for _ in range(23)]
        self.assertEqual([g[0] for g in grants], [16, 4] + [1] * 20 + [0])
        self.assertGreater(grants[-1][1], 0)  # the wait, in microseconds
        self.assertEqual(run(*args, "p"), [0, 0])
        self.assertEqual(run(*args[:-1], "5", "r"), [0, 0])
        self.assertNear(self.level("t3:rl:rule:s:k"), 5, delta=0.1)
        self.assertEqual(run(*args[:-1], "99", "r"), [0, 0])
        self.assertNear(self.level("t3:rl:rule:s:k"), 40, delta=0.1)
        self.assertEqual(run(*args, "p"), [16, 0])  # a prefetch: only tokens above half
        self.assertEqual(run(*args, "p"), [4, 0])
        self.assertEqual(run(*args, "p"), [0, 0])
        # A bucket below half full: one token per call, every call asks Redis.
        for _ in range(21):
            run("EVALSHA", TAKE_SHA, "1", "t3:rl:rule:r:k", "0.001", "40", "1", "t")
        buckets = state.buckets("rule:r", 0.001, 40, 10)
        answers = yield self.takes(buckets, 20)
        self.assertEqual(answers[:19], [None] * 19)
        self.assertIsNotNone(answers[19])
        self.assertEqual((state.stats.commands, state.stats.leased), (20, 0))
        self.assertEqual(state.stats.leaseFetches, 0)

    @inlineCallbacks
    def test_neverOverAdmits(self) -> Any:
        """
        Four processes (RedisState instances) with leases of 16 hammer one bucket of burst 200
        (10 takes at once each, 400 in all): at most 200 are allowed; every token is either
        used, held in a lease or still in Redis; once the leases are given back (stopService)
        and the rest taken, exactly 200 calls were allowed in all.
        """
        states = []
        for _ in range(4):
            states.append((yield self.connect(16)))
        buckets = [s.buckets("rule:r", 0.001, 200, 10) for s in states]
        allowed = 0
        for _ in range(10):
            answers = yield gatherResults(
                [maybeDeferred(b.take, "k", 0.0) for b in buckets for _ in range(10)]
            )
            allowed += answers.count(None)
        self.assertLessEqual(allowed, 200)
        held = sum(lease.count for s in states for lease in s.leases.values())
        self.assertGreater(sum(s.stats.leased for s in states), 0)
        self.assertNear(allowed + held + self.level(), 200, delta=0.5)
        yield gatherResults([s.stopService() for s in states])
        self.assertEqual(sum(s.stats.givenBack for s in states), held)
        self.assertNear(allowed + self.level(), 200, delta=0.5)
        last = yield self.connect(0)
        rest = yield self.takes(last.buckets("rule:r", 0.001, 200, 10), 200 - allowed + 1)
        self.assertEqual(rest, [None] * (200 - allowed) + [rest[-1]])
        self.assertIsNotNone(rest[-1])

    @inlineCallbacks
    def test_expiredLeaseGivenBack(self) -> Any:
        """
        Spare tokens unused for LEASE_SECONDS (the injected clock) are given back by the sweep:
        Redis's level is restored and the lease forgotten; the next call asks Redis again.
        """
        clock = Clock()
        state = yield self.connect(clock=clock)
        buckets = state.buckets("rule:r", 0.001, 10000, 10)
        self.assertEqual((yield buckets.take("k", 0.0)), None)
        self.assertNear(self.level(), 10000 - 16, delta=0.1)
        self.assertEqual(buckets.take("k", 0.0), None)  # leased: at once, no Deferred
        clock.advance(LEASE_SECONDS - SWEEP_SECONDS)
        self.assertEqual(state.stats.givebacks, 0)
        clock.advance(SWEEP_SECONDS)
        self.assertEqual((state.stats.givebacks, state.stats.givenBack, state.leases), (1, 14, {}))
        yield self.waitFor(lambda: self.level() > 10000 - 2.5)
        self.assertNear(self.level(), 10000 - 2, delta=0.1)
        self.assertEqual((yield buckets.take("k", 0.0)), None)
        self.assertEqual(state.stats.commands, 2)

    @inlineCallbacks
    def test_reloadKeepsLeases(self) -> Any:
        """The buckets rebuilt by a reload take from the leases of the state (one per process)."""
        state = yield self.connect()
        yield state.buckets("rule:r", 0.001, 10000, 10).take("k", 0.0)
        again = state.buckets("rule:r", 0.001, 10000, 10)
        self.assertIsNone(again.take("k", 0.0))
        self.assertEqual(state.stats.leased, 1)

    @inlineCallbacks
    def test_backgroundFailureDecidesNoCall(self) -> Any:
        """
        A prefetch that fails (NOSCRIPT: Redis lost the script) is counted, decides no call (the
        lease's spares are used), and the script is loaded again for the next take.
        """
        state = yield self.connect()
        buckets = state.buckets("rule:r", 0.001, 10000, 10)
        yield buckets.take("k", 0.0)  # 15 spares
        self.redis.command("SCRIPT", "FLUSH")
        answers = [buckets.take("k", 0.0) for _ in range(7)]  # the 7th sends a prefetch
        self.assertEqual(answers, [None] * 7)
        yield self.waitFor(lambda: state.stats.leaseErrors == 1)
        yield self.waitFor(lambda: self.redis.command("SCRIPT", "EXISTS", TAKE_SHA) == [1])
        # 8 spares (no prefetch after a failed one), then a take asks Redis for a lease again
        answers = yield self.takes(buckets, 10)
        self.assertEqual(answers, [None] * 10)
        self.assertEqual((state.stats.errors, state.stats.onError), (0, 0))
        self.assertEqual((state.stats.commands, state.stats.leased), (2, 16))


class LeaseGatewayTests(_RedisGateway):
    """Leases through the gateway: a rate-limited call mostly answered without Redis."""

    rules = (
        "    - {id: big, action: rate_limit, match: {exact: search},"
        " rate_limit: {rate: 0.001, burst: 10000, per: key}}\n"
    )

    @inlineCallbacks
    def test_leasedCalls(self) -> Any:
        """
        40 calls of a per-key bucket of 10000 (auto: leases of 16) are all allowed, most of them
        without a Redis round trip (about one EVALSHA per 8 calls; bounds with room for a slow
        machine); /readyz counts the leased takes; Redis's level accounts for every token.
        """
        reply = yield self.callKey("search")  # the key verified (and cached) first
        self.assertEqual(reply.status, 200)
        self.redis.command("CONFIG", "RESETSTAT")
        for _ in range(40):
            reply = yield self.callKey("search")
            self.assertEqual(reply.status, 200)
        self.assertLessEqual(evalshaCalls(self.redis), 20)  # without leases: 40
        self.assertEqual(len(self.upstream.seen), 41)
        stats = self.state.stats
        self.assertGreaterEqual(stats.leased, 20)
        reply = yield self.call(method="GET", path="/readyz", body=None)
        self.assertEqual(reply.json()["state"]["leased"], stats.leased)
        lease = self.state.leases[b"t1:rl:rule:big:key:ci"]
        yield self.waitFor(lambda: not lease.fetching)
        level = float(self.redis.command("HGET", "t1:rl:rule:big:key:ci", "v"))
        self.assertNear(level + 41 + lease.count, 10000, delta=0.5)
