"""AsyncClient: the same surface as Client, awaitable."""

from __future__ import annotations

import asyncio
import unittest
import uuid

from harness import Daemon, team

from bursar_client import AsyncClient, BadRequest, BudgetDenied, Conflict, NotFound, Usage


def acme(t: str) -> dict:
    return {"org": "acme", "team": t}


class AsyncClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.daemon = Daemon().start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.cleanup()

    def run_async(self, body) -> None:
        async def main() -> None:
            async with AsyncClient(self.daemon.socket) as c:
                await body(c)

        asyncio.run(main())

    @staticmethod
    async def bucket(c: AsyncClient, t: str):
        s = await c.status(labels={"team": t}, budget="team-daily")
        return s.bucket("team-daily", f"team={t}")

    def test_hello_record_status_verify(self) -> None:
        t = team()

        async def body(c: AsyncClient) -> None:
            self.assertEqual((await c.hello()).protocol, 1)
            a = await c.record(acme(t), "gpt-4o-mini", Usage(1000, 100))
            self.assertEqual((a.cost_micros, a.state, a.duplicate), (210, "ok", False))
            again = await c.record(acme(t), "gpt-4o-mini", Usage(1000, 100), event_id=a.event_id)
            self.assertTrue(again.duplicate)
            with self.assertRaises(Conflict):
                await c.record(acme(t), "gpt-4o-mini", Usage(1000, 1), event_id=a.event_id)
            with self.assertRaises(BadRequest) as cm:
                await c.record(acme(t), "gpt-4o-mini", {"inputs": 1})
            self.assertEqual(cm.exception.field, "usage.inputs")
            self.assertEqual((await self.bucket(c, t)).spent_micros, 210)
            v = await c.verify()
            self.assertEqual(v.events, len([e async for e in c.export()]))

        self.run_async(body)

    def test_reserve_check_extend_commit_release(self) -> None:
        t = team()

        async def body(c: AsyncClient) -> None:
            chk = await c.check(acme(t), "gpt-4o", input_tokens=1000, max_output_tokens=5000)
            self.assertEqual((chk.decision, chk.reason.budget), ("deny", "team-daily"))
            d = await c.reserve(acme(t), "gpt-4o-mini", input_tokens=1000, max_output_tokens=1000)
            self.assertEqual((d.decision, d.hold_micros), ("allow", 750))
            e = await c.extend(d.reservation_id, 900)
            self.assertGreater(e.expires_at, d.expires_at)
            u = await c.commit(d.reservation_id, Usage(1000, 500))
            self.assertEqual(u.cost_micros, 450)
            d2 = await c.reserve(acme(t), "gpt-4o-mini", input_tokens=1, max_output_tokens=1)
            await c.release(d2.reservation_id)
            with self.assertRaises(NotFound):
                await c.extend(d2.reservation_id, 10)
            b = await self.bucket(c, t)
            self.assertEqual((b.spent_micros, b.held_micros, b.live_holds), (450, 0, 0))

        self.run_async(body)

    def test_hold(self) -> None:
        t = team()

        async def body(c: AsyncClient) -> None:
            async with c.hold(acme(t), "gpt-4o-mini", input_tokens=1000, max_output_tokens=1000) as h:
                self.assertEqual((h.model, h.hold_micros), ("gpt-4o-mini", 750))
                await h.commit(Usage(1000, 500))
            with self.assertRaises(ZeroDivisionError):
                async with c.hold(acme(t), "gpt-4o-mini", input_tokens=10, max_output_tokens=10) as h2:
                    1 / 0
            self.assertTrue(h2.released)
            async with c.hold(acme(t), "gpt-4o-mini", input_tokens=10, max_output_tokens=10):
                pass
            with self.assertRaises(BudgetDenied) as cm:
                async with c.hold(acme(t), "gpt-4o", input_tokens=1000, max_output_tokens=5000):
                    self.fail("the body of a denied hold ran")
            self.assertEqual((cm.exception.budget, cm.exception.key), ("team-daily", f"team={t}"))
            self.assertEqual(cm.exception.remaining_micros, 50000 - 450)
            async with c.hold(acme(t), candidates=["gpt-4o", "gpt-4o-mini"], input_tokens=1000,
                              max_output_tokens=5000) as h3:
                self.assertEqual(h3.model, "gpt-4o-mini")
            b = await self.bucket(c, t)
            self.assertEqual((b.spent_micros, b.held_micros, b.live_holds), (450, 0, 0))

        self.run_async(body)

    def test_concurrent_tasks_share_one_client(self) -> None:
        t = team()

        async def one(c: AsyncClient, n: int) -> None:
            async with c.hold(acme(t), "gpt-4o-mini", input_tokens=100, max_output_tokens=100) as h:
                await asyncio.sleep(0)
                await h.commit(Usage(100, 10))

        async def body(c: AsyncClient) -> None:
            await asyncio.gather(*(one(c, n) for n in range(40)),
                                 *(c.record(acme(t), "gpt-4o-mini", Usage(1000, 100)) for _ in range(40)))
            b = await self.bucket(c, t)
            self.assertEqual((b.spent_requests, b.spent_micros, b.live_holds), (80, 40 * 21 + 40 * 210, 0))

        self.run_async(body)

    def test_export_is_an_async_iterator(self) -> None:
        t = team()

        async def body(c: AsyncClient) -> None:
            for n in range(3):
                await c.record(acme(t), "gpt-4o-mini", Usage(10 * (n + 1)), event_id=f"x-{t}-{n}")
            events = [e async for e in c.export(labels={"team": t})]
            self.assertEqual([e.data["event_id"] for e in events], [f"x-{t}-{n}" for n in range(3)])
            self.assertTrue(all(e.type == "usage_recorded" for e in events))

        self.run_async(body)

    def test_one_client_across_event_loops(self) -> None:
        # One AsyncClient object reused by successive asyncio.run calls (each closes it before
        # its loop ends, as it should: a stream cannot outlive its event loop).
        c = AsyncClient(self.daemon.socket)
        t = team()

        async def once() -> None:
            await c.record(acme(t), "gpt-4o-mini", Usage(1000, 100))
            await c.close()

        asyncio.run(once())
        asyncio.run(once())

        async def last() -> None:
            self.assertEqual((await self.bucket(c, t)).spent_micros, 420)
            await c.close()

        asyncio.run(last())

if __name__ == "__main__":
    unittest.main()
