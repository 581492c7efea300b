"""Dropped connections, daemon restarts and lost answers: retries are duplicates, never double counts."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import unittest
import uuid

from harness import Daemon, FakeDaemon, LossyProxy, team

from bursar_client import (
    AsyncClient,
    BadRequest,
    BursarError,
    Client,
    Conflict,
    Disconnected,
    Forbidden,
    Internal,
    NotFound,
    Overloaded,
    TooLarge,
    Unavailable,
    UnknownOp,
    Usage,
)


def acme(t: str) -> dict:
    return {"org": "acme", "team": t}


def spent(client: Client, t: str):
    b = client.status(labels={"team": t}).bucket("team-daily", f"team={t}")
    return (b.spent_micros, b.spent_requests, b.held_micros, b.live_holds) if b else None


class RestartTest(unittest.TestCase):
    """A real daemon killed and restarted under a live client."""

    def setUp(self) -> None:
        self.daemon = Daemon().start()

    def tearDown(self) -> None:
        self.daemon.cleanup()

    def test_calls_survive_a_graceful_restart(self) -> None:
        t = team()
        with Client(self.daemon.socket) as c:
            c.record(acme(t), "gpt-4o-mini", Usage(1000, 100))
            self.daemon.restart()
            c.record(acme(t), "gpt-4o-mini", Usage(1000, 100))  # same client, new connection
            self.assertEqual(spent(c, t), (420, 2, 0, 0))

    def test_kill9_between_calls_then_resend_is_a_duplicate(self) -> None:
        t = team()
        with Client(self.daemon.socket, retry_timeout=20) as c:
            eid = "e-" + uuid.uuid4().hex
            first = c.record(acme(t), "gpt-4o-mini", Usage(1000, 100), event_id=eid)
            with c.hold(acme(t), "gpt-4o-mini", input_tokens=100, max_output_tokens=100) as h:
                self.daemon.kill9()
                # The daemon is down while the client asks: it keeps retrying until it is back.
                threading.Timer(0.7, self.daemon.start, kwargs={"wait": False}).start()
                t0 = time.monotonic()
                ans = h.commit(Usage(100, 50))
                self.assertGreater(time.monotonic() - t0, 0.5)
            self.assertFalse(ans.duplicate)
            again = c.record(acme(t), "gpt-4o-mini", Usage(1000, 100), event_id=eid)
            self.assertTrue(again.duplicate)
            self.assertEqual(again.seq, first.seq)
            # 210 for the record + 45 for the commit; the hold survived the crash and was committed.
            self.assertEqual(spent(c, t), (255, 2, 0, 0))

    def test_unreachable_daemon_raises_disconnected(self) -> None:
        self.daemon.stop()
        c = Client(self.daemon.socket, retry_timeout=0.3)
        self.addCleanup(c.close)
        t0 = time.monotonic()
        with self.assertRaises(Disconnected) as cm:
            c.hello()
        self.assertLess(time.monotonic() - t0, 3)
        self.assertIsInstance(cm.exception, Unavailable)
        self.assertEqual(cm.exception.code, "unavailable")
        self.assertIn(self.daemon.socket, str(cm.exception))

    def test_a_wrong_socket_path_fails_at_once(self) -> None:
        # No daemon ever answered this client: nothing to wait for across a restart.
        missing = os.path.join(os.path.dirname(self.daemon.socket), "no-such.sock")
        c = Client(missing, retry_timeout=10)
        self.addCleanup(c.close)
        t0 = time.monotonic()
        with self.assertRaises(Disconnected) as cm:
            c.hello()
        self.assertLess(time.monotonic() - t0, 1.0)
        self.assertIn(missing, str(cm.exception))
        self.assertIn("is the daemon running?", str(cm.exception))

        async def main() -> None:
            async with AsyncClient(missing, retry_timeout=10) as a:
                t1 = time.monotonic()
                with self.assertRaises(Disconnected):
                    await a.hello()
                self.assertLess(time.monotonic() - t1, 1.0)

        asyncio.run(main())

    def test_async_client_survives_a_restart(self) -> None:
        t = team()

        async def main() -> None:
            async with AsyncClient(self.daemon.socket, retry_timeout=20) as c:
                await c.record(acme(t), "gpt-4o-mini", Usage(1000, 100))
                self.daemon.kill9()
                threading.Timer(0.5, self.daemon.start, kwargs={"wait": False}).start()
                await c.record(acme(t), "gpt-4o-mini", Usage(1000, 100))
                s = await c.status(labels={"team": t})
                self.assertEqual(s.bucket("team-daily", f"team={t}").spent_micros, 420)

        asyncio.run(main())


class LostAnswerTest(unittest.TestCase):
    """The daemon applies a request but the answer never arrives: the client resends the same
    ids, and the daemon answers the resend as a duplicate."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.daemon = Daemon().start()
        cls.proxy = LossyProxy(cls.daemon.socket, str(cls.daemon.dir / "proxy.sock"))
        cls.direct = Client(cls.daemon.socket)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.proxy.close()
        cls.daemon.cleanup()

    def setUp(self) -> None:
        self.c = Client(self.proxy.path)

    def tearDown(self) -> None:
        self.c.close()

    def resent(self, op: str) -> list:
        return [r for r in self.proxy.requests if r["op"] == op]

    def test_record_resent_after_a_lost_answer_counts_once(self) -> None:
        t = team()
        c = self.c
        self.proxy.drop_answers(1)
        a = c.record(acme(t), "gpt-4o-mini", Usage(1000, 100))
        self.assertTrue(a.duplicate)  # the first send was applied; this answer is the resend's
        sends = [r for r in self.resent("record") if r["labels"]["team"] == t]
        self.assertEqual(len(sends), 2)
        self.assertEqual(sends[0], sends[1])  # the very same request, same event_id
        self.assertEqual(spent(self.direct, t), (210, 1, 0, 0))

    def test_hold_with_lost_answers_holds_and_commits_once(self) -> None:
        t = team()
        c = self.c
        self.proxy.drop_answers(1)
        with c.hold(acme(t), "gpt-4o-mini", input_tokens=1000, max_output_tokens=1000) as h:
            self.assertTrue(h.decision.duplicate)
            self.assertEqual(spent(self.direct, t), (0, 0, 750, 1))
            self.proxy.drop_answers(2)  # lose the commit's answer twice
            ans = h.commit(Usage(1000, 500))
            self.assertTrue(ans.duplicate)
        self.assertEqual(spent(self.direct, t), (450, 1, 0, 0))

    def test_release_with_a_lost_answer(self) -> None:
        t = team()
        c = self.c
        d = c.reserve(acme(t), "gpt-4o-mini", input_tokens=10, max_output_tokens=10)
        self.proxy.drop_answers(1)
        c.release(d.reservation_id)  # resent release of an already released hold: no error
        self.assertEqual(spent(self.direct, t), (0, 0, 0, 0))

    def test_async_record_resent_counts_once(self) -> None:
        t = team()

        async def main() -> None:
            async with AsyncClient(self.proxy.path) as c:
                self.proxy.drop_answers(1)
                a = await c.record(acme(t), "gpt-4o-mini", Usage(1000, 100))
                self.assertTrue(a.duplicate)

        asyncio.run(main())
        self.assertEqual(spent(self.direct, t), (210, 1, 0, 0))


class FakeDaemonTest(unittest.TestCase):
    """Error codes the real daemon rarely produces, from a scripted stand-in."""

    def setUp(self) -> None:
        import tempfile
        self.dir = tempfile.TemporaryDirectory(prefix="bursar-fake-")
        self.path = self.dir.name + "/f.sock"

    def tearDown(self) -> None:
        self.dir.cleanup()

    def test_every_error_code_maps_to_its_exception(self) -> None:
        codes = {
            "bad_request": BadRequest, "unknown_op": UnknownOp, "too_large": TooLarge,
            "conflict": Conflict, "not_found": NotFound, "forbidden": Forbidden,
            "overloaded": Overloaded, "unavailable": Unavailable, "internal": Internal,
        }
        current = {}
        fake = FakeDaemon(self.path, lambda req: {
            "ok": False, "error": {"code": current["code"], "message": "m", "field": "f.g"}})
        try:
            c = Client(self.path, retry_timeout=0)
            self.addCleanup(c.close)
            for code, cls in codes.items():
                current["code"] = code
                with self.assertRaises(cls) as cm:
                    c.status()
                self.assertEqual((cm.exception.code, cm.exception.field), (code, "f.g"))
            current["code"] = "something_new"
            with self.assertRaises(BursarError) as cm:
                c.status()
            self.assertEqual(cm.exception.code, "something_new")
        finally:
            fake.close()

    def test_overloaded_is_retried_with_the_same_request(self) -> None:
        answers = [{"ok": False, "error": {"code": "overloaded", "message": "queue full"}}] * 2

        def respond(req: dict) -> dict:
            if answers:
                return answers.pop()
            return {"ok": True, "seq": 7, "duplicate": False, "cost_micros": 1, "state": "ok",
                    "budgets": []}

        fake = FakeDaemon(self.path, respond)
        try:
            with Client(self.path) as c:
                a = c.record({"team": "x"}, "gpt-4o-mini", Usage(1))
            self.assertEqual(a.seq, 7)
            self.assertEqual(len(fake.requests), 3)
            self.assertEqual(fake.requests[0], fake.requests[2])  # same event_id each time
        finally:
            fake.close()

    def test_overloaded_beyond_the_retry_budget_raises(self) -> None:
        fake = FakeDaemon(self.path, lambda req: {
            "ok": False, "error": {"code": "overloaded", "message": "queue full"}})
        try:
            with Client(self.path, retry_timeout=0.2) as c, self.assertRaises(Overloaded):
                c.record({}, "gpt-4o-mini", Usage(1))
        finally:
            fake.close()

    def test_unknown_answer_fields_are_tolerated(self) -> None:
        fake = FakeDaemon(self.path, lambda req: {
            "ok": True, "server": "bursard 9.9", "protocol": 1, "policy_version": 2,
            "brand_new_field": [1, 2]})
        try:
            with Client(self.path) as c:
                h = c.hello()
            self.assertEqual(h.server, "bursard 9.9")
            self.assertEqual(h.raw["brand_new_field"], [1, 2])
        finally:
            fake.close()

    def slow_first_verify(self) -> FakeDaemon:
        """Answers the first `verify` after 0.5 s, the others at once, each with its number."""
        count = []

        def respond(req: dict) -> dict:
            count.append(1)
            if len(count) == 1:
                time.sleep(0.5)
            return {"ok": True, "events": len(count), "head": f"answer {len(count)}"}

        return FakeDaemon(self.path, respond)

    def test_an_interrupted_call_leaves_no_answer_behind_for_the_next(self) -> None:
        # Ctrl-C while the blocking client waits: the late answer must not become the answer
        # to the next call on the same client.
        import signal

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        fake = self.slow_first_verify()
        old = signal.signal(signal.SIGALRM, interrupt)
        try:
            with Client(self.path) as c:
                signal.setitimer(signal.ITIMER_REAL, 0.1)
                with self.assertRaises(KeyboardInterrupt):
                    c.verify()
                signal.setitimer(signal.ITIMER_REAL, 0)
                time.sleep(0.6)  # the first answer has been sent by now
                self.assertEqual(c.verify().head, "answer 2")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            fake.close()

    def test_a_cancelled_async_call_leaves_no_answer_behind_for_the_next(self) -> None:
        fake = self.slow_first_verify()

        async def main() -> str:
            async with AsyncClient(self.path) as c:
                with self.assertRaises(asyncio.TimeoutError):
                    await asyncio.wait_for(c.verify(), 0.1)
                await asyncio.sleep(0.6)
                return (await c.verify()).head

        try:
            self.assertEqual(asyncio.run(main()), "answer 2")
        finally:
            fake.close()


if __name__ == "__main__":
    unittest.main()
