"""Outbound delivery that keeps flowing (CONTRACT.md section 7): a slow, silent or hostile destination
delays only its own mail.

The server sends by MX lookup through a loopback DNS responder (support.DNSResponder) to scripted
remotes (support.RemoteSMTPServer) on --mx-port.  Each test has its own server and remotes.
"""

import os
import re
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from support import wait_for  # noqa: E402

import mailserver_smtp  # noqa: E402

SUBJECT = b"Subject: %s\r\n\r\nhello\r\n"


class FlowCase(unittest.TestCase):
    """A server with --local-domains example.org sending by MX through a test DNS to one remote."""

    zone = {}
    server_args = ()

    def setUp(self):
        self.remote = support.RemoteSMTPServer()
        self.addCleanup(self.remote.close)
        zone = {("healthy.test", "MX"): [(10, "mx.healthy.test")], ("mx.healthy.test", "A"): ["127.0.0.1"],
                ("silent.test", "MX"): [(10, "mx.silent.test")], ("mx.silent.test", "A"): ["127.0.0.1"],
                ("dead.test", "MX"): [(10, "mx.dead.test")], ("mx.dead.test", "A"): ["127.0.0.1"]}
        zone.update(self.zone)
        self.dns = support.DNSResponder(zone, drop={"silent.test", "mx.silent.test"})
        self.addCleanup(self.dns.close)
        self.root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, self.root)
        self.server = support.ServerProcess(
            support.SMTP_SCRIPT, self.root, "--domain", "mx.example.org", "--local-domains", "example.org",
            "--dns-server", "%s:%d" % self.dns.address, "--mx-port", str(self.mx_port()),
            "--retry-base", "30", *self.server_args)
        self.addCleanup(self.server.close)

    def mx_port(self):
        return self.remote.port

    def submit(self, recipients, subject):
        """One message from alice (a relay network: loopback) for recipients; its queue id."""
        with support.smtp_session(self.server, ehlo=True) as client:
            code, lines = support.send_message(client, SUBJECT % subject, "alice@example.org", recipients)
        self.assertEqual(code, 250, lines)
        return re.search(r"queued as (\w+)", lines[-1]).group(1)

    def delivered(self, remote, subject):
        """Whether remote has taken a message with this subject."""
        return any(b"Subject: " + subject + b"\r\n" in m["data"] for m in remote.messages)

    def outcome(self, queue_id, address, status):
        """Wait for the log line of queue_id's attempt at address with status; return the line."""
        return self.server.wait_for_output(r"%s: to=<%s> relay=\S+ delay=[\d.]+ status=%s \(([^\n]*)\)"
                                           % (queue_id, re.escape(address), status))


class SilentDNSTest(FlowCase):
    """A domain whose DNS never answers holds up no other: not in another message, not in the same one."""

    def test_a_message_for_a_healthy_and_a_silent_domain_reaches_the_healthy_one_at_once(self):
        """dave@healthy.test is delivered within a second or two; carol@silent.test is deferred after the
        DNS deadline, and the next message for silent.test asks DNS nothing more."""
        started = time.monotonic()
        queued = self.submit(("carol@silent.test", "dave@healthy.test"), b"both")
        wait_for(lambda: self.delivered(self.remote, b"both"), timeout=2.0)
        self.assertLess(time.monotonic() - started, 2.0)
        reply = self.outcome(queued, "carol@silent.test", "deferred").group(1)
        self.assertTrue(reply.startswith("451 4.4.3 "), reply)
        sent = self.server.wait_for_output(r"%s: to=<dave@healthy\.test> relay=\S+ delay=([\d.]+) status=sent" % queued)
        self.assertLess(float(sent.group(1)), 2.0, "the log gives the healthy domain's own delay")
        self.assertGreaterEqual(time.monotonic() - started, mailserver_smtp.DNS_DEADLINE - 0.5)
        asked = len(self.dns.queries)
        second = self.submit(("erin@silent.test",), b"again")
        self.outcome(second, "erin@silent.test", "deferred")
        self.assertEqual(len(self.dns.queries), asked, "a dead destination costs no DNS question")
        self.assertIn("silent.test: next try", support.run_queue_listing(self.root))

    def test_messages_for_healthy_domains_flow_while_a_silent_one_waits(self):
        """While runners wait on silent.test, ten messages for healthy.test are all delivered at once."""
        for i in range(3):
            self.submit(("x%d@silent.test" % i,), b"silent %d" % i)
        started = time.monotonic()
        for i in range(10):
            self.submit(("y%d@healthy.test" % i,), b"healthy %d" % i)
        wait_for(lambda: all(self.delivered(self.remote, b"healthy %d" % i) for i in range(10)), timeout=3.0)
        self.assertLess(time.monotonic() - started, 3.0)


class DeadDestinationTest(FlowCase):
    """A destination that does not answer is dead for a while: its mail is deferred without a connection."""

    def mx_port(self):
        self.silent_remote = support.RemoteSMTPServer()
        self.addCleanup(self.silent_remote.close)
        self.silent_remote.greeting = None          # accepts, and never says a word
        return self.silent_remote.port

    server_args = ("--relay-timeout", "1")

    def test_fifty_messages_to_a_dead_destination_cost_a_few_connections(self):
        """50 messages for dead.test: at most DESTINATION_START connections; each deferred; --queue says when
        dead.test is tried again; --flush clears the mark and tries it at once."""
        ids = [self.submit(("r%d@dead.test" % i,), b"dead %d" % i) for i in range(50)]
        for queued, i in zip(ids, range(50)):
            self.outcome(queued, "r%d@dead.test" % i, "deferred")
        self.assertLessEqual(self.silent_remote.sessions, mailserver_smtp.DESTINATION_START)
        listing = support.run_queue_listing(self.root)
        self.assertRegex(listing, r"dead\.test: next try \d{4}-\d\d-\d\d [\d:]{8} after 1 failure: 451 4\.4\.1 ")
        sessions = self.silent_remote.sessions
        self.assertEqual(support.run_queue_command(self.root, "--flush")[0], 0)
        wait_for(lambda: self.silent_remote.sessions > sessions)


class TarpitTest(FlowCase):
    """A remote that trickles its greeting one byte at a time is cut at the session's ceiling."""

    server_args = ("--relay-timeout", "1")

    def test_a_tarpit_is_cut_by_the_session_ceiling(self):
        """One byte every 0.3 s keeps every wait of 1 s alive; the ceiling (2 x 1 s) cuts the session."""
        self.remote.trickle = 0.3
        started = time.monotonic()
        queued = self.submit(("t@healthy.test",), b"tarpit")
        reply = self.outcome(queued, "t@healthy.test", "deferred").group(1)
        self.assertLess(time.monotonic() - started, mailserver_smtp.SESSION_CEILING * 1 + 2.0, reply)
        self.assertFalse(self.delivered(self.remote, b"tarpit"))


class PerDestinationLimitTest(FlowCase):
    """--relay-per-destination: one destination gets at most that many sessions at once."""

    server_args = ("--relay-per-destination", "3")

    def test_the_remote_never_sees_more_sessions_than_the_limit(self):
        """12 messages for one slow domain: the remote has 3 sessions at once at most, and all 12 arrive."""
        self.remote.data_delay = 0.3
        for i in range(12):
            self.submit(("p%d@healthy.test" % i,), b"limited %d" % i)
        wait_for(lambda: all(self.delivered(self.remote, b"limited %d" % i) for i in range(12)))
        self.assertEqual(self.remote.most_at_once, 3)


class SharedDeadlineTest(unittest.TestCase):
    """One deadline for a whole question: its tries share it, so a silent first server leaves time for the next."""

    def test_a_silent_first_server_leaves_time_for_the_second(self):
        zone = {("healthy.test", "MX"): [(10, "mx.healthy.test")]}
        silent = support.DNSResponder(zone, drop={"healthy.test"})
        self.addCleanup(silent.close)
        answering = support.DNSResponder(zone)
        self.addCleanup(answering.close)
        resolver = mailserver_smtp.Resolver([silent.address, answering.address])
        started = time.monotonic()
        records, _ = resolver.lookup("healthy.test", "MX", started + mailserver_smtp.DNS_DEADLINE)
        self.assertEqual(records, [(10, "mx.healthy.test")])
        self.assertLess(time.monotonic() - started, mailserver_smtp.DNS_DEADLINE)
        self.assertEqual(len(silent.queries), 1, "the silent server had its share of the deadline, once")


class ReplyTimeoutTest(unittest.TestCase):
    """RFC 5321 4.5.3.2: how long the client waits for each reply; --relay-timeout caps every wait."""

    def relay(self, *options):
        args = mailserver_smtp.parse_args(["0", "--local-domains", "example.org"] + list(options))
        return mailserver_smtp.Relay(args, "mx.example.org")

    def test_the_waits_of_rfc_5321_and_the_session_ceiling(self):
        """5 minutes for the greeting and commands, 2 for DATA's 354, 3 per block, 10 after the dot."""
        relay = self.relay()
        self.assertEqual({stage: relay.wait_of(stage) for stage in ("greeting", "command", "data", "block", "end")},
                         {"greeting": 300, "command": 300, "data": 120, "block": 180, "end": 600})
        self.assertEqual(mailserver_smtp.SESSION_CEILING * relay.wait_of("end"), 1200)
        capped = self.relay("--relay-timeout", "4")
        self.assertEqual({capped.wait_of(stage) for stage in ("greeting", "command", "data", "block", "end")}, {4})


if __name__ == "__main__":
    unittest.main()
