"""The blocking client against a real bursard."""

from __future__ import annotations

import os
import threading
import time
import unittest
import uuid
from decimal import Decimal
from unittest import mock

from harness import Daemon, team

import bursar_client
from bursar_client import (
    BadRequest,
    BudgetDenied,
    BursarError,
    Client,
    Conflict,
    NotFound,
    Usage,
)

ACME = {"org": "acme"}


def acme(t: str, **more: str) -> dict:
    return {**ACME, "team": t, **more}


class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.daemon = Daemon().start()
        cls.client = Client(cls.daemon.socket)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.client.close()
        cls.daemon.cleanup()

    def bucket(self, t: str):
        b = self.client.status(labels={"team": t}, budget="team-daily").bucket("team-daily", f"team={t}")
        self.assertIsNotNone(b, f"no bucket for team={t}")
        return b

    # --- basics ---------------------------------------------------------------------------

    def test_hello(self) -> None:
        h = self.client.hello()
        self.assertEqual(h.protocol, 1)
        self.assertTrue(h.server.startswith("bursard "), h.server)
        self.assertGreaterEqual(h.policy_version, 1)

    def test_record_prices_and_counts(self) -> None:
        t = team()
        a = self.client.record(acme(t), "gpt-4o-mini", Usage(input_tokens=1000, output_tokens=100))
        # 1000 × 0.15 + 100 × 0.60 USD/Mtok = 210 µUSD
        self.assertEqual(a.cost_micros, 210)
        self.assertEqual(a.cost_usd, Decimal("0.00021"))
        self.assertFalse(a.duplicate)
        self.assertEqual(a.state, "ok")
        uuid.UUID(a.event_id)  # an id was generated
        [b] = [b for b in a.budgets if b.budget == "team-daily"]
        self.assertEqual((b.key, b.spent_micros, b.limit_micros, b.remaining_micros),
                         (f"team={t}", 210, 50000, 49790))
        # A second record without an id is a different event: both count.
        a2 = self.client.record(acme(t), "gpt-4o-mini", {"input_tokens": 1000, "output_tokens": 100})
        self.assertNotEqual(a.event_id, a2.event_id)
        b = self.bucket(t)
        self.assertEqual((b.spent_micros, b.spent_requests, b.spent_tokens), (420, 2, 2200))

    def test_cached_tokens_are_priced_separately(self) -> None:
        t = team()
        a = self.client.record(acme(t), "gpt-4o", Usage(input_tokens=1000, cached_input_tokens=2000,
                                                        output_tokens=100))
        # 1000 × 2.50 + 2000 × 1.25 + 100 × 10.00 = 2500 + 2500 + 1000
        self.assertEqual(a.cost_micros, 6000)

    def test_record_past_the_limit_is_kept_and_exhausts(self) -> None:
        t = team()
        a = self.client.record(acme(t), "gpt-4o", Usage(input_tokens=10000, output_tokens=5000))
        self.assertEqual(a.cost_micros, 75000)
        self.assertEqual(a.state, "exhausted")
        self.assertEqual(self.bucket(t).spent_micros, 75000)
        with self.assertRaises(BudgetDenied):
            with self.client.hold(acme(t), "gpt-4o-mini", input_tokens=10, max_output_tokens=10):
                self.fail("entered a hold on an exhausted budget")

    def test_explicit_ids_are_idempotent_and_conflicts_raise(self) -> None:
        t = team()
        eid = "e-" + uuid.uuid4().hex
        first = self.client.record(acme(t), "gpt-4o-mini", Usage(1000, 100), event_id=eid)
        again = self.client.record(acme(t), "gpt-4o-mini", Usage(1000, 100), event_id=eid)
        self.assertFalse(first.duplicate)
        self.assertTrue(again.duplicate)
        self.assertEqual(again.seq, first.seq)
        self.assertEqual(self.bucket(t).spent_micros, 210)
        with self.assertRaises(Conflict) as cm:
            self.client.record(acme(t), "gpt-4o-mini", Usage(1000, 101), event_id=eid)
        self.assertEqual(cm.exception.code, "conflict")
        self.assertEqual(cm.exception.field, "event_id")
        self.assertIsInstance(cm.exception, BursarError)
        self.assertEqual(self.bucket(t).spent_micros, 210)

    def test_errors_carry_code_and_field(self) -> None:
        t = team()
        with self.assertRaises(BadRequest) as cm:
            self.client.record(acme(t), "gpt-4o", {"input_tokens": 5, "output_token": 7})
        self.assertEqual(cm.exception.code, "bad_request")
        self.assertEqual(cm.exception.field, "usage.output_token")
        self.assertIn("output_token", str(cm.exception))
        with self.assertRaises(BadRequest) as cm:
            self.client.record({"Bad Key": "x"}, "gpt-4o", Usage(1))
        self.assertIn("Bad Key", str(cm.exception))
        with self.assertRaises(NotFound) as cm:
            self.client.release("no-such-hold")
        self.assertEqual((cm.exception.code, cm.exception.field), ("not_found", "reservation_id"))
        with self.assertRaises(NotFound):
            self.client.extend("no-such-hold", 30)
        # Nothing of that reached the bucket, and the connection is still usable.
        self.assertEqual(self.client.status(labels={"team": t}).budgets, [])
        self.assertEqual(self.client.hello().protocol, 1)

    # --- reservations -----------------------------------------------------------------------

    def test_reserve_commit_release_extend(self) -> None:
        t = team()
        d = self.client.reserve(acme(t), "gpt-4o-mini", input_tokens=1000, max_output_tokens=1000,
                                ttl_seconds=120)
        self.assertEqual(d.decision, "allow")
        self.assertTrue(d.allowed)
        self.assertEqual(d.hold_micros, 750)  # 1000 × 0.15 + 1000 × 0.60
        self.assertEqual(d.model, "gpt-4o-mini")
        self.assertIsNotNone(d.expires_at)
        self.assertEqual(self.bucket(t).held_micros, 750)

        e = self.client.extend(d.reservation_id, 600)
        self.assertGreater(e.expires_at, d.expires_at)

        c = self.client.commit(d.reservation_id, Usage(input_tokens=900, output_tokens=200))
        self.assertEqual(c.cost_micros, 255)  # 135 + 120
        b = self.bucket(t)
        self.assertEqual((b.spent_micros, b.held_micros, b.live_holds), (255, 0, 0))

        d2 = self.client.reserve(acme(t), "gpt-4o-mini", input_tokens=10, max_output_tokens=10)
        self.client.release(d2.reservation_id)
        self.assertEqual(self.bucket(t).held_micros, 0)
        with self.assertRaises(NotFound):
            self.client.extend(d2.reservation_id, 60)

    def test_report_sums_a_teams_spend_per_day(self) -> None:
        t = team()
        self.client.record(acme(t), "gpt-4o-mini", Usage(input_tokens=1000, output_tokens=100))
        self.client.record(acme(t), "gpt-4o-mini", Usage(input_tokens=1000, output_tokens=100))
        r = self.client.report(["team", "model"], "day", labels={"team": t})
        self.assertIsInstance(r, bursar_client.ReportAnswer)
        self.assertEqual((r.every, r.timezone), ("day", "UTC"))
        [row] = r.rows
        self.assertEqual(row.group, {"team": t, "model": "gpt-4o-mini"})
        self.assertEqual((row.cost_micros, row.requests, row.input_tokens), (420, 2, 2000))
        with self.assertRaises(BadRequest) as e:
            self.client.report(["session"])
        self.assertEqual(e.exception.field, "group_by")

    def test_what_if_names_the_reservation_a_stricter_policy_would_have_denied(self) -> None:
        t = team()
        d = self.client.reserve(acme(t), "gpt-4o-mini", input_tokens=1000, max_output_tokens=1000)
        self.assertEqual(d.decision, "allow")
        self.client.commit(d.reservation_id, Usage(input_tokens=900, output_tokens=200))
        before = self.bucket(t)
        policy = (
            "[[budget]]\n"
            'id = "strict"\n'
            f'match = {{ team = "{t}" }}\n'
            'group_by = ["team"]\n'
            "max_usd = 0.0005\n"
        )
        w = self.client.what_if(policy)
        self.assertIsInstance(w, bursar_client.WhatIfAnswer)
        [mine] = [x for x in w.denied if x.reservation_id == d.reservation_id]
        self.assertEqual((mine.budget, mine.key, mine.reason), ("strict", f"team={t}", "budget"))
        self.assertEqual((mine.model, mine.hold_micros), ("gpt-4o-mini", 750))
        self.assertEqual(mine.labels["team"], t)
        self.assertGreaterEqual(w.usage_left_out, 1)
        # A what-if changes nothing.
        self.assertEqual(self.bucket(t), before)
        with self.assertRaises(BadRequest) as e:
            self.client.what_if("[[budget]]\nid = 'x'\nmax_usdd = 1\n")
        self.assertEqual(e.exception.field, "policy")

    def test_reserve_with_the_same_id_is_one_hold(self) -> None:
        t = team()
        rid = "r-" + uuid.uuid4().hex
        a = self.client.reserve(acme(t), "gpt-4o-mini", input_tokens=100, max_output_tokens=100,
                                reservation_id=rid)
        b = self.client.reserve(acme(t), "gpt-4o-mini", input_tokens=100, max_output_tokens=100,
                                reservation_id=rid)
        self.assertEqual(a.reservation_id, rid)
        self.assertTrue(b.duplicate)
        bk = self.bucket(t)
        self.assertEqual((bk.live_holds, bk.held_micros), (1, a.hold_micros))
        self.client.release(rid)

    def test_check_decides_without_holding(self) -> None:
        t = team()
        before = self.client.verify().events
        ok = self.client.check(acme(t), "gpt-4o-mini", input_tokens=1000, max_output_tokens=1000)
        no = self.client.check(acme(t), "gpt-4o", input_tokens=1000, max_output_tokens=5000)
        self.assertEqual((ok.decision, ok.hold_micros), ("allow", 750))
        self.assertEqual(no.decision, "deny")
        self.assertEqual((no.reason.code, no.reason.budget, no.reason.key),
                         ("budget", "team-daily", f"team={t}"))
        self.assertIsNone(ok.seq)
        self.assertEqual(self.client.verify().events, before)
        self.assertEqual(self.client.status(labels={"team": t}).budgets, [])

    def test_commit_of_an_unknown_reservation_is_recorded(self) -> None:
        t = team()
        a = self.client.commit("never-reserved-" + uuid.uuid4().hex, Usage(1000, 100),
                               labels=acme(t), model="gpt-4o-mini")
        self.assertEqual(a.reservation, "unknown")
        self.assertEqual(a.cost_micros, 210)
        self.assertEqual(self.bucket(t).spent_micros, 210)

    def test_commit_after_expiry_is_late_but_counted(self) -> None:
        t = team()
        with self.client.hold(acme(t), "gpt-4o-mini", input_tokens=100, max_output_tokens=100,
                              ttl_seconds=1) as h:
            time.sleep(1.3)
            self.assertEqual(self.bucket(t).held_micros, 0)  # reads never show an expired hold
            a = h.commit(Usage(input_tokens=100, output_tokens=100))
        self.assertTrue(a.late)
        self.assertEqual(self.bucket(t).spent_micros, a.cost_micros)

    # --- hold() -----------------------------------------------------------------------------

    def test_hold_commit(self) -> None:
        t = team()
        with self.client.hold(acme(t), "gpt-4o-mini", input_tokens=1000, max_output_tokens=1000) as h:
            self.assertEqual(h.model, "gpt-4o-mini")
            self.assertEqual(h.hold_micros, 750)
            self.assertEqual(self.bucket(t).held_micros, 750)
            ans = h.commit(input_tokens=1000, output_tokens=500)
        self.assertTrue(h.committed)
        self.assertEqual(ans.cost_micros, 450)
        b = self.bucket(t)
        self.assertEqual((b.spent_micros, b.held_micros, b.live_holds), (450, 0, 0))
        with self.assertRaises(RuntimeError):
            h.commit(Usage(1))

    def test_hold_released_without_commit_and_on_exception(self) -> None:
        t = team()
        with self.client.hold(acme(t), "gpt-4o-mini", input_tokens=100, max_output_tokens=100):
            self.assertEqual(self.bucket(t).live_holds, 1)
        b = self.bucket(t)
        self.assertEqual((b.held_micros, b.live_holds, b.spent_micros), (0, 0, 0))

        class ModelCallFailed(Exception):
            pass

        with self.assertRaises(ModelCallFailed):
            with self.client.hold(acme(t), "gpt-4o-mini", input_tokens=100, max_output_tokens=100) as h:
                self.assertEqual(self.bucket(t).live_holds, 1)
                raise ModelCallFailed()
        self.assertTrue(h.released)
        b = self.bucket(t)
        self.assertEqual((b.held_micros, b.live_holds, b.spent_micros), (0, 0, 0))
        kinds = [e.type for e in self.client.export(labels={"team": t})]
        self.assertEqual(kinds.count("reservation_created"), 2)
        released = [e for e in self.client.export() if e.type == "reservation_released"
                    and e.data.get("reservation_id") == h.reservation_id]
        self.assertEqual(len(released), 1)
        # tail by type: only releases, this one among them.
        tailed = list(self.client.tail(from_seq=1, types=["reservation_released"]))
        self.assertEqual({e.type for e in tailed}, {"reservation_released"})
        self.assertIn(h.reservation_id, [e.data.get("reservation_id") for e in tailed])

    def test_hold_denied_names_budget_scope_and_remaining(self) -> None:
        t = team()
        self.client.record(acme(t), "gpt-4o-mini", Usage(1000, 100))  # 210 spent
        with self.assertRaises(BudgetDenied) as cm:
            with self.client.hold(acme(t), "gpt-4o", input_tokens=1000, max_output_tokens=5000):
                self.fail("the body of a denied hold ran")
        e = cm.exception
        self.assertEqual(e.budget, "team-daily")
        self.assertEqual(e.key, f"team={t}")
        self.assertEqual(e.remaining_micros, 49790)
        self.assertEqual(e.code, "budget")
        self.assertEqual(e.reason.code, "budget")
        self.assertEqual(e.decision.hold_micros, 52500)
        self.assertIn("team-daily", str(e))
        self.assertIn("0.049790", str(e))
        self.assertIsInstance(e, BursarError)
        b = self.bucket(t)
        self.assertEqual((b.held_micros, b.live_holds), (0, 0))

    def test_hold_tier_cap_denial(self) -> None:
        # No budget matches (no org label): only the frontier tier's per-call cap applies.
        with self.assertRaises(BudgetDenied) as cm:
            with self.client.hold({"team": team()}, "gpt-4o", input_tokens=20000,
                                  max_output_tokens=16000):
                pass
        self.assertEqual(cm.exception.code, "tier_cap")
        self.assertIsNone(cm.exception.budget)
        self.assertIsNone(cm.exception.remaining_micros)

    def test_hold_falls_back_to_a_cheaper_candidate(self) -> None:
        t = team()
        with self.client.hold(acme(t), candidates=["gpt-4o", "gpt-4o-mini"], input_tokens=1000,
                              max_output_tokens=5000) as h:
            self.assertEqual(h.model, "gpt-4o-mini")
            [s] = h.decision.skipped
            self.assertEqual((s.model, s.reason), ("gpt-4o", "budget"))
            h.commit(Usage(1000, 400))
        [u] = [e for e in self.client.export(labels={"team": t}) if e.type == "usage_recorded"]
        self.assertEqual(u.data["model"], "gpt-4o-mini")

    def test_hold_requires_capabilities(self) -> None:
        t = team()
        with self.client.hold(acme(t), candidates=["gpt-3.5-turbo", "gpt-4o-mini"],
                              require=["vision"], input_tokens=10, max_output_tokens=10) as h:
            self.assertEqual(h.model, "gpt-4o-mini")
            [s] = h.decision.skipped
            self.assertEqual((s.model, s.reason, s.detail),
                             ("gpt-3.5-turbo", "missing_capability", "vision"))
        with self.assertRaises(BudgetDenied) as cm:
            with self.client.hold(acme(t), "gpt-3.5-turbo", require=["vision"], input_tokens=10,
                                  max_output_tokens=10):
                pass
        self.assertEqual(cm.exception.code, "missing_capability")
        self.assertIn("vision", str(cm.exception))

    def test_hold_warns_near_the_limit(self) -> None:
        t = team()
        with self.client.hold(acme(t), "gpt-4o", input_tokens=0, max_output_tokens=4000) as h:
            self.assertEqual(h.hold_micros, 40000)  # exactly warn_at × limit
            self.assertTrue(h.warned)
            self.assertEqual(h.decision.decision, "warn")

    def test_concurrency_limit(self) -> None:
        gpu = {"pool": "gpu", "team": team()}
        with self.client.hold(gpu, "gpt-4o-mini", input_tokens=1, max_output_tokens=1) as first:
            [seats] = [b for b in first.decision.budgets if b.budget == "gpu-seats"]
            self.assertEqual((seats.limit_concurrent, seats.remaining_concurrent), (2, 1))
            self.assertIsNone(seats.remaining_micros, "no spend limit, nothing remains of one")
            with self.client.hold(gpu, "gpt-4o-mini", input_tokens=1, max_output_tokens=1):
                with self.assertRaises(BudgetDenied) as cm:
                    with self.client.hold(gpu, "gpt-4o-mini", input_tokens=1, max_output_tokens=1):
                        pass
                self.assertEqual(cm.exception.budget, "gpu-seats")
                self.assertIn("max_concurrent", str(cm.exception))
            with self.client.hold(gpu, "gpt-4o-mini", input_tokens=1, max_output_tokens=1) as h:
                self.assertTrue(h.decision.allowed)

    # --- export, verify, status ---------------------------------------------------------------

    def test_export_iterates_events_and_can_interleave(self) -> None:
        t = team()
        for n in range(3):
            self.client.record(acme(t), "gpt-4o-mini", Usage(100 * (n + 1), 10))
        it = self.client.export(labels={"team": t})
        first = next(it)
        # Other calls on the same client work while an export is open.
        self.client.record(acme(team()), "gpt-4o-mini", Usage(1))
        events = [first] + list(it)
        self.assertEqual([e.type for e in events], ["usage_recorded"] * 3)
        self.assertEqual([e.data["usage"]["input_tokens"] for e in events], [100, 200, 300])
        self.assertEqual([e.cost_micros for e in events], [21, 36, 51])
        seqs = [e.seq for e in events]
        self.assertEqual(seqs, sorted(seqs))
        self.assertTrue(all(e.price_version for e in events))

    def test_verify_covers_the_whole_log(self) -> None:
        self.client.record(acme(team()), "gpt-4o-mini", Usage(1))
        v = self.client.verify()
        n = sum(1 for _ in self.client.export())
        self.assertEqual(v.events, n)
        self.assertRegex(v.head, r"^[0-9a-f]{64}$")

    def test_status_filters(self) -> None:
        t1, t2 = team(), team()
        self.client.record(acme(t1), "gpt-4o-mini", Usage(1000))
        self.client.record(acme(t2), "gpt-4o-mini", Usage(2000))
        s = self.client.status(labels={"team": t2})
        self.assertEqual([(b.budget, b.key, b.spent_micros) for b in s.budgets],
                         [("team-daily", f"team={t2}", 300)])
        self.assertEqual((s.total, s.truncated), (1, False))
        top = self.client.status(limit=1)
        self.assertEqual(len(top.budgets), 1)
        self.assertGreaterEqual(top.total, 2)
        self.assertTrue(top.truncated)
        # `org` is pinned to acme by team-daily's `match`: both teams' buckets carry it.
        pinned = self.client.status(labels={"org": "acme", "team": t1})
        self.assertEqual([b.key for b in pinned.budgets], [f"team={t1}"])
        with self.assertRaises(NotFound) as cm:
            self.client.status(budget="no-such-budget")
        self.assertEqual((cm.exception.code, cm.exception.field), ("not_found", "budget"))

    def test_status_carries_the_cost_tiers(self) -> None:
        tiers = {t.id: t for t in self.client.status(limit=1).tiers}
        # The built-in tiers, then the harness policy's tiers, named but not defined.
        self.assertEqual(list(tiers)[:4], ["low", "medium", "high", "premium"])
        self.assertEqual(tiers["low"].origin, "builtin")
        self.assertEqual(tiers["low"].display_name, "Low")
        self.assertEqual(tiers["low"].price_range,
                         {"min_input_per_mtok": 0, "max_input_per_mtok": 500000})
        self.assertEqual((tiers["frontier"].origin, tiers["frontier"].display_name),
                         ("implicit", None))

    # --- threads -------------------------------------------------------------------------------

    def test_one_client_shared_by_threads(self) -> None:
        t = team()
        errors = []

        def worker() -> None:
            try:
                for _ in range(20):
                    self.client.record(acme(t), "gpt-4o-mini", Usage(100, 10))
                    with self.client.hold(acme(t), "gpt-4o-mini", input_tokens=10,
                                          max_output_tokens=10) as h:
                        h.commit(Usage(10, 10))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        self.assertEqual(errors, [])
        b = self.bucket(t)
        self.assertEqual(b.spent_requests, 240)
        self.assertEqual(b.spent_micros, 120 * 21 + 120 * 8)  # 21 and 7.5 → 8 per event
        self.assertEqual((b.held_micros, b.live_holds), (0, 0))


    def test_racing_agents_never_overspend(self) -> None:
        # 24 agents (own clients, own connections) race for 3000 µUSD holds on a 50000 budget.
        t = team()
        barrier = threading.Barrier(24)
        outcomes = []
        lock = threading.Lock()

        def agent() -> None:
            with Client(self.daemon.socket) as c:
                barrier.wait()
                try:
                    with c.hold(acme(t), "gpt-4o", input_tokens=0, max_output_tokens=300) as h:
                        with lock:
                            outcomes.append(h.hold_micros)
                        barrier_done.wait()
                        h.commit(Usage(output_tokens=300))
                except BudgetDenied as e:
                    with lock:
                        outcomes.append(e)
                    barrier_done.wait()

        barrier_done = threading.Barrier(24)
        threads = [threading.Thread(target=agent) for _ in range(24)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        granted = [o for o in outcomes if isinstance(o, int)]
        self.assertEqual(granted, [3000] * 16)
        self.assertEqual(len(outcomes), 24)
        b = self.bucket(t)
        self.assertEqual((b.spent_micros, b.held_micros), (48000, 0))


class QuotaObservationTest(unittest.TestCase):
    """``observe`` and the rate-limit headers a commit brings along (SPEC §10), against a real
    bursard with a ``[[quota]]`` for OpenAI's prod account (a daemon of its own: observations
    are per quota, not per team)."""

    def setUp(self) -> None:
        self.daemon = Daemon().start()
        self.addCleanup(self.daemon.cleanup)
        self.client = Client(self.daemon.socket)
        self.addCleanup(self.client.close)

    def test_observed_headers_bind_until_a_commits_headers_say_otherwise(self) -> None:
        t = team()
        labels = acme(t, account="prod")
        a = self.client.observe("openai", {"account": "prod"}, headers={
            "X-RateLimit-Remaining-Requests": "1",
            "x-ratelimit-reset-requests": "1h",
            "x-ratelimit-remaining-tokens": "plenty",
        })
        self.assertEqual(a.quotas, ["openai-prod"])
        self.assertEqual(a.observed["requests"]["remaining"], 1)
        self.assertEqual([i["header"] for i in a.ignored], ["x-ratelimit-remaining-tokens"])
        r1 = self.client.reserve(labels, candidates=["gpt-4o-mini", "gpt-4o"],
                                 input_tokens=100, max_output_tokens=100)
        self.assertEqual(r1.model, "gpt-4o-mini")
        # The one request left is held: the next candidate is tried, gpt-4o is OpenAI's too.
        r2 = self.client.check(labels, candidates=["gpt-4o-mini"], input_tokens=100,
                               max_output_tokens=100)
        self.assertEqual((r2.decision, r2.reason.code), ("deny", "quota"), r2)
        # LiteLLM's `llm_provider-` names are understood; other headers are not sent.
        self.client.commit(r1.reservation_id, Usage(input_tokens=90, output_tokens=40),
                           headers={"llm_provider-x-ratelimit-remaining-requests": "30",
                                    "llm_provider-x-ratelimit-reset-requests": "1h",
                                    "content-type": "application/json"})
        observed = [e for e in self.client.export(labels={"account": "prod"})
                    if e.type == "quota_observed"]
        self.assertEqual(len(observed), 2, observed)
        self.assertEqual(observed[1].data["event_id"], self.client_event_id(observed))
        self.assertEqual(observed[1].data["requests"]["remaining"], 30)
        r3 = self.client.check(labels, "gpt-4o-mini", input_tokens=100, max_output_tokens=100)
        self.assertEqual(r3.decision, "allow", r3)
        q = self.client.status().quotas[0]
        self.assertEqual((q.id, q.provider), ("openai-prod", "openai"))
        self.assertEqual((q.limits[0]["limit"], q.limits[0]["remaining"]), ("requests", 30))

    def client_event_id(self, observed: list) -> str:
        usage = [e for e in self.client.export(labels={"account": "prod"})
                 if e.type == "usage_recorded"]
        self.assertEqual(len(usage), 1)
        return usage[0].data["event_id"]

    def test_observe_mistakes_raise_naming_the_field(self) -> None:
        with self.assertRaises(NotFound) as e:
            self.client.observe("nobody", headers={"x-ratelimit-remaining-requests": "1"})
        self.assertEqual(e.exception.field, "provider")
        with self.assertRaises(BadRequest) as e:
            self.client.observe("openai", {"account": "prod"},
                                quota={"requests": {"remaining": 1, "reset_at": "soon"}})
        self.assertEqual(e.exception.field, "quota.requests.reset_at")
        with self.assertRaises(TypeError):
            self.client.observe("openai")

    def test_only_rate_limit_headers_are_sent(self) -> None:
        from bursar_client import _proto as P
        self.assertEqual(
            P.rate_limit_headers({"llm_provider-Anthropic-RateLimit-Requests-Remaining": 4,
                                  "x-ratelimit-reset-tokens": "1s", "server": "x",
                                  "llm_provider-date": "today"}),
            {"anthropic-ratelimit-requests-remaining": "4", "x-ratelimit-reset-tokens": "1s"})
        self.assertIsNone(P.rate_limit_headers({"server": "x"}))
        self.assertIsNone(P.rate_limit_headers(None))


class WaitingTest(unittest.TestCase):
    """``wait_ms`` (SPEC §10): a reserve waits in line for a GPU slot instead of being denied."""

    def setUp(self) -> None:
        self.daemon = Daemon().start()
        self.addCleanup(self.daemon.cleanup)
        self.client = Client(self.daemon.socket, timeout=2.0)
        self.addCleanup(self.client.close)

    def test_a_reserve_with_wait_ms_waits_for_a_free_slot_past_the_clients_timeout(self) -> None:
        gpu = {"pool": "gpu"}
        holds = [self.client.reserve(gpu, "gpt-4o-mini", input_tokens=1, max_output_tokens=1)
                 for _ in range(2)]
        self.assertTrue(all(h.allowed for h in holds), holds)
        other = Client(self.daemon.socket)
        self.addCleanup(other.close)
        timer = threading.Timer(2.5, lambda: other.release(holds[0].reservation_id))
        timer.start()
        self.addCleanup(timer.cancel)
        # Waits longer than the client's 2 s answer timeout: the wait is added to it.
        with self.client.hold(gpu, "gpt-4o-mini", input_tokens=1, max_output_tokens=1,
                              wait_ms=10_000) as h:
            self.assertGreaterEqual(h.decision.waited_ms, 2000, h.decision)
        d = self.client.check(gpu, "gpt-4o-mini", input_tokens=1, max_output_tokens=1,
                              wait_ms=100)
        self.assertEqual(d.decision, "allow", d)
        # Answered at once, not after waiting in line: `waited_ms` is the time from its arrival
        # to its answer, which a busy machine's scheduling stretches by a few ms (6 ms once in
        # CI), far from the 100 it may wait.
        self.assertIsNotNone(d.waited_ms, d)
        self.assertLess(d.waited_ms, 50, d)


class DefaultSocketTest(unittest.TestCase):
    def test_default_path_order(self) -> None:
        with mock.patch.dict(os.environ, {"BURSAR_SOCKET": "/x/b.sock", "XDG_RUNTIME_DIR": "/run/u"}):
            self.assertEqual(Client().socket_path, "/x/b.sock")
        env = {k: v for k, v in os.environ.items() if k != "BURSAR_SOCKET"}
        with mock.patch.dict(os.environ, {**env, "XDG_RUNTIME_DIR": "/run/u"}, clear=True):
            self.assertEqual(Client().socket_path, "/run/u/bursar.sock")
        env.pop("XDG_RUNTIME_DIR", None)
        with mock.patch.dict(os.environ, env, clear=True):
            self.assertEqual(Client().socket_path, "./bursar.sock")
        self.assertEqual(Client("/explicit.sock").socket_path, "/explicit.sock")

    def test_env_socket_reaches_the_daemon(self) -> None:
        d = Daemon().start()
        try:
            with mock.patch.dict(os.environ, {"BURSAR_SOCKET": d.socket}):
                with Client() as c:
                    self.assertEqual(c.hello().protocol, 1)
        finally:
            d.cleanup()

    def test_package_surface(self) -> None:
        for name in ("Client", "AsyncClient", "Usage", "BursarError", "BudgetDenied", "Conflict",
                     "NotFound", "Unavailable", "Overloaded", "Disconnected"):
            self.assertTrue(hasattr(bursar_client, name), name)
        self.assertTrue(issubclass(bursar_client.Disconnected, bursar_client.Unavailable))


if __name__ == "__main__":
    unittest.main()


class UsdStringTest(unittest.TestCase):
    """reported_cost_usd on the wire: exact decimals, floats through their shortest decimal."""

    def test_float_noise_is_not_rounded_up_to_another_micro(self) -> None:
        from bursar_client._proto import usd_string

        self.assertEqual(90 * 2.5e-6, 0.00022500000000000002)  # 90 tokens at $2.50/Mtok
        self.assertEqual(usd_string(0.00022500000000000002), "0.000225")
        self.assertEqual(usd_string(0.1 + 0.2), "0.3")
        # A real fraction of a micro-USD is still rounded up.
        self.assertEqual(usd_string(0.0002251), "0.000226")
        self.assertEqual(usd_string(Decimal("0.0000001")), "0.000001")
        self.assertEqual(usd_string(3), "3")
        self.assertEqual(usd_string("0.00022500000000000002"), "0.00022500000000000002")
