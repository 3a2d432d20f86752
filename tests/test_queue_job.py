"""Queue jobs as types (issue 17): ``upasmail.job``'s Job, its versioned
envelope, the schedule and ``apply_result``, without a reactor; and a
queue written by the previous release (``tests/data/queue-v1/``: no
``version``), delivered and listed after the upgrade.
"""

import io
import json
import os
import shutil
import unittest as stdlib_unittest

from twisted.internet import defer

from test_queue import Case
from upasmail import client, job, queue, tap_runq
from upasmail.job import DELIVERED, FAILED, PENDING, CorruptJob, Job, RecipientState
from upasmail.mxdial import Target

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "queue-v1")
V1_ID = "1700000000.1be447d81017"
V1_CREATED = 1_700_000_000.0


def v1_record():
    with open(os.path.join(FIXTURE, V1_ID + ".env")) as f:
        return json.load(f)


def result(*rcpts, status="", target=None, outcome=None):
    """A ``client.Result``: ``rcpts`` are (address, client status, reply)."""
    return client.Result(status, [client.RecipientResult(a, a, s, r) for a, s, r in rcpts],
                         target=target, outcome=outcome)


class FormatTests(stdlib_unittest.TestCase):
    def test_a_version_1_envelope_is_read_as_it_was_meant(self):
        record = v1_record()
        self.assertNotIn("version", record)  # as the previous release wrote it
        j = job.from_record(record, V1_ID)
        self.assertEqual((j.id, j.sender, j.created, j.peer, j.helo, j.smtputf8),
                         (V1_ID, "gnot.example.org!alice", V1_CREATED, "127.0.0.1", "h", False))
        self.assertEqual(j.recipients, ["a.example!bob", "b.example!carol"])
        self.assertEqual(j.state["a.example!bob"], RecipientState(
            PENDING, error="451 4.3.0 mailbox busy, try later", relay="(mx.a.example:127.0.0.2)"))
        self.assertEqual(j.state["b.example!carol"], RecipientState(
            DELIVERED, relay="(mx.b.example:127.0.0.3)", reply="250 ok"))
        self.assertEqual((j.attempts, j.next), ({"a.example": 1}, {"a.example": 1_700_000_300.0}))
        self.assertEqual(j.last_error, "451 4.3.0 mailbox busy, try later")

    def test_a_version_1_envelope_as_its_server_wrote_it_is_all_pending(self):
        j = job.from_record({"id": "1.0123456789ab", "sender": "a!b", "recipients": ["x!y"],
                             "created": 5, "peer": "127.0.0.1", "helo": "h",
                             "smtputf8": True}, "1.0123456789ab")
        self.assertEqual(j.state, {"x!y": RecipientState()})
        self.assertEqual((j.attempts, j.next, j.last_error, j.smtputf8), ({}, {}, "", True))

    def test_written_as_version_2_with_the_field_names_of_version_1(self):
        record = v1_record()
        written = job.to_record(job.from_record(record, V1_ID))
        self.assertEqual(written.pop("version"), job.VERSION)
        self.assertEqual(job.VERSION, 2)
        # nothing else changed, not even a name; a recipient's empty fields are left out
        del record["state"]["b.example!carol"]["error"]
        self.assertEqual(written, record)
        again = job.from_record(json.loads(json.dumps(dict(written, version=2))), V1_ID)
        self.assertEqual(again, job.from_record(v1_record(), V1_ID))

    def test_to_record_shares_nothing_with_the_job(self):
        j = Job("1.0123456789ab", "a!b", ["x!y"], 0.0)
        record = job.to_record(j)
        record["state"]["x!y"]["status"] = FAILED
        record["next"]["x"] = 9
        record["recipients"].append("z!w")
        self.assertEqual((j.state["x!y"].status, j.next, j.recipients), (PENDING, {}, ["x!y"]))

    def test_the_file_name_is_the_id(self):
        record = dict(v1_record(), id="something else")
        self.assertEqual(job.from_record(record, V1_ID).id, V1_ID)

    def test_bad_envelopes_are_corrupt_jobs(self):
        good = v1_record()
        for bad, why in [
                ([], "not an object"),
                ({}, "bad envelope"),
                (dict(good, recipients=[]), "sender or recipients"),
                (dict(good, sender=7), "sender or recipients"),
                (dict(good, created="soon"), "bad envelope"),
                (dict(good, state=[]), "state"),
                (dict(good, state={"a.example!bob": "sent"}), "state"),
                (dict(good, state={"a.example!bob": {"status": "lost"}}), "status 'lost'"),
                (dict(good, next=[]), "attempts or next"),
                (dict(good, version=3), "unknown version 3"),
                (dict(good, version=True), "unknown version True")]:
            with self.assertRaises(CorruptJob) as e:
                job.from_record(bad, V1_ID)
            self.assertIn(why, str(e.exception))

    def test_queue_keeps_its_names(self):
        self.assertIs(queue.CorruptJob, CorruptJob)
        self.assertEqual((queue.PENDING, queue.DELIVERED, queue.FAILED),
                         (PENDING, DELIVERED, FAILED))
        record = queue.normalize(v1_record(), V1_ID)
        self.assertEqual(record["version"], 2)
        self.assertEqual(queue.due_groups(record, V1_CREATED + 300),
                         job.due_groups(job.from_record(record), V1_CREATED + 300))


class ScheduleTests(stdlib_unittest.TestCase):
    def job(self):
        return job.from_record(v1_record(), V1_ID)

    def test_due_groups_and_next_due(self):
        j = self.job()
        self.assertEqual(job.due_groups(j, V1_CREATED + 299), {})
        self.assertEqual(job.due_groups(j, V1_CREATED + 300), {"a.example": ["a.example!bob"]})
        self.assertEqual(job.due_groups(j, 0, smarthost="tcp!relay!25"),
                         {"smarthost": ["a.example!bob"]})  # never tried there
        self.assertEqual(job.next_due(j), V1_CREATED + 300)
        self.assertIsNone(job.next_due(j, busy={"a.example"}))

    def test_pending_and_unreturned(self):
        j = self.job()
        self.assertFalse(job.nothing_pending(j))
        j.state["a.example!bob"].status = FAILED
        self.assertTrue(job.nothing_pending(j))
        self.assertEqual(job.unreturned(j), ["a.example!bob"])
        job.mark_returned(j, ["a.example!bob"])
        self.assertEqual(job.unreturned(j), [])

    def test_expiry(self):
        j = self.job()
        self.assertFalse(job.expired(j, V1_CREATED + 172800, 172800))
        self.assertTrue(job.expired(j, V1_CREATED + 172801, 172800))
        notes = job.expire(j, 172800)
        self.assertEqual(notes, [job.Note("a.example!bob", "(mx.a.example:127.0.0.2)",
                                          "expired", "451 4.3.0 mailbox busy, try later")])
        bob = j.state["a.example!bob"]
        self.assertEqual((bob.status, bob.dsn), (FAILED, "4.4.7"))
        self.assertEqual(bob.error, "4.4.7 gave up after 2 days: 451 4.3.0 mailbox busy, "
                                    "try later")
        self.assertEqual(j.state["b.example!carol"].status, DELIVERED)  # untouched


class ApplyResultTests(stdlib_unittest.TestCase):
    """What ``QueueRunner._record`` did to the envelope, now a pure function."""

    MX = Target("127.0.0.2", 25, "mx.a.example")

    def job(self, *rcpts):
        return Job("1.0123456789ab", "a!b", list(rcpts), 0.0)

    def test_delivered_failed_and_deferred_recipients(self):
        j = self.job("a.example!bob", "a.example!eve", "a.example!dan")
        notes = job.apply_result(j, "a.example", result(
            ("a.example!bob", client.DELIVERED, "250 2.0.0 queued as X"),
            ("a.example!eve", client.PERMANENT_FAILURE, "550 5.1.1 eve: no such user"),
            ("a.example!dan", client.TEMPORARY, "451 4.3.0 later"),
            status=client.RETRY, target=self.MX), now=100.0, retry_min=300, retry_max=3600)
        relay = "(mx.a.example:127.0.0.2)"
        self.assertEqual(notes, [
            job.Note("a.example!bob", relay, "sent", "250 2.0.0 queued as X"),
            job.Note("a.example!eve", relay, "bounced", "550 5.1.1 eve: no such user"),
            job.Note("a.example!dan", relay, "deferred", "451 4.3.0 later")])
        self.assertEqual(j.state["a.example!bob"], RecipientState(
            DELIVERED, relay=relay, reply="250 2.0.0 queued as X"))
        self.assertEqual(j.state["a.example!eve"], RecipientState(
            FAILED, error="550 5.1.1 eve: no such user", relay=relay, dsn="5.1.1"))
        self.assertEqual(j.state["a.example!dan"], RecipientState(
            PENDING, error="451 4.3.0 later", relay=relay))
        self.assertEqual((j.attempts, j.next), ({"a.example": 1}, {"a.example": 400.0}))
        self.assertEqual(j.last_error, client.RETRY)

    def test_each_deferral_doubles_the_wait_up_to_the_maximum(self):
        j = self.job("a.example!bob")
        waits = []
        for now in (0.0, 1000.0, 2000.0, 3000.0):
            job.apply_result(j, "a.example", result(
                ("a.example!bob", client.TEMPORARY, "451 later"), status=client.RETRY),
                now=now, retry_min=300, retry_max=1000)
            waits.append(j.next["a.example"] - now)
        self.assertEqual(waits, [300, 600, 1000, 1000])
        self.assertEqual(j.attempts, {"a.example": 4})

    def test_a_failure_before_any_reply_gives_every_recipient_the_status(self):
        j = self.job("a.example!bob")
        outcome = client.Outcome.retry().because("smtp: connection refused (net!a.example)")
        notes = job.apply_result(j, "a.example", result(
            ("a.example!bob", client.NOT_SENT, ""), status=client.RETRY, outcome=outcome),
            now=10.0, retry_min=300, retry_max=3600)
        self.assertEqual(notes, [job.Note("a.example!bob", "", "deferred", client.RETRY)])
        self.assertEqual(j.state["a.example!bob"].error, client.RETRY)
        self.assertEqual(j.last_error, "smtp: connection refused (net!a.example)")

    def test_no_penalty_when_our_own_shutdown_cut_it_off(self):
        j = self.job("a.example!bob")
        job.apply_result(j, "a.example", result(
            ("a.example!bob", client.TEMPORARY, "421 shutting down"), status=client.RETRY),
            now=10.0, retry_min=300, retry_max=3600, penalize=False)
        self.assertEqual((j.state["a.example!bob"].status, j.attempts, j.next, j.last_error),
                         (PENDING, {}, {}, ""))

    def test_only_the_results_recipients_change(self):
        j = self.job("a.example!bob", "b.example!carol")
        job.apply_result(j, "a.example", result(("a.example!bob", client.DELIVERED, "250 ok")),
                         now=0.0, retry_min=300, retry_max=3600)
        self.assertEqual(j.state["b.example!carol"], RecipientState())
        self.assertFalse(job.nothing_pending(j))


class UpgradeTests(Case):
    """A queue the previous release wrote is delivered and listed by this one."""

    def setUp(self):
        Case.setUp(self)
        self.clock.advance(V1_CREATED)
        for ext in (".msg", ".env"):
            shutil.copy(os.path.join(FIXTURE, V1_ID + ext), self.root.queue)

    def envelope(self):
        with open(os.path.join(self.root.queue, V1_ID + ".env")) as f:
            return json.load(f)

    @defer.inlineCallbacks
    def test_a_version_1_job_is_delivered_after_the_upgrade(self):
        s = self.sink(replies={"RCPT": "451 4.3.0 still busy"})
        r = self.runner()
        yield self.settle(r)
        self.assertEqual(s.sessions, [])  # its next try (from the old envelope) has not come
        self.clock.advance(300)
        yield s.seen("RCPT")
        yield self.settle(r)
        record = self.envelope()  # rewritten by this release
        self.assertEqual(record["version"], 2)
        self.assertEqual(record["attempts"], {"a.example": 2})
        self.assertEqual(record["next"], {"a.example": V1_CREATED + 300 + 600})
        self.assertEqual(record["state"]["b.example!carol"]["status"], DELIVERED)
        s.replies["RCPT"] = "250 ok"
        self.clock.advance(600)
        yield s.seen(".")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        self.assertEqual([c for sess in s.sessions for c in sess.commands
                          if c.startswith("RCPT")],
                         ["RCPT TO:<bob@a.example>"] * 2)  # carol, delivered before, never
        self.assertIn(b"Subject: queued mail\r\n", s.sessions[-1].data)

    def test_upas_mailq_lists_a_version_1_job(self):
        out = io.StringIO()
        self.assertEqual(tap_runq.mailq(["--root", self.root.root], out,
                                        now=V1_CREATED + 3 * 3600 + 60), 0)
        size = os.path.getsize(os.path.join(FIXTURE, V1_ID + ".msg"))
        self.assertEqual(out.getvalue(), (
            "Queue ID                     Size  Age     Sender/Recipient (last error)\n"
            "%-24s %8d  3h01m   gnot.example.org!alice\n"
            "                                    a.example!bob  (451 4.3.0 mailbox busy, "
            "try later)\n"
            "-- 1 message in the queue\n") % (V1_ID, size))
        self.assertNotIn("version", self.envelope())  # listing writes nothing


class EnqueueTests(Case):
    def test_the_server_writes_version_2(self):
        qid = self.enqueue(["a.example!bob"])
        with open(os.path.join(self.root.queue, qid + ".env")) as f:
            record = json.load(f)
        self.assertEqual(record["version"], 2)
        self.assertEqual(job.from_record(record, qid), Job(
            qid, "gnot.example.org!alice", ["a.example!bob"], self.clock.seconds(),
            peer="127.0.0.1", helo="h", smtputf8=False))
