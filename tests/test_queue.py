"""Mail for other domains (CONTRACT.md section 7, issue 16): who may relay, the queue, delivery, retries, bounces.

The remote servers are scripted stand-ins (support.RemoteSMTPServer) on
loopback; mail reaches them as <user@[127.0.0.1]> with --mx-port, or through
--relay-host, so no test needs DNS (the MX tests are in the DNS part below).
"""

import base64
import email
import email.policy
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import support
from support import SMTP_SCRIPT, read_mailbox, wait_for

import mailserver_smtp as dns  # noqa: E402  (support puts the repository on the path)

QUEUED = re.compile(r"^250 (?:2\.0\.0 )?OK Message accepted for delivery, queued as ([0-9A-F]{21})$")
SUBJECT = b"Subject: %s\r\n\r\nhello\r\n"


def plain(login, password):
    """An AUTH PLAIN initial response."""
    return base64.b64encode(("\0%s\0%s" % (login, password)).encode()).decode()


def queue_id(reply):
    """The queue id a 250 reply to the end of data names (AssertionError if it names none)."""
    found = QUEUED.match(reply[1][-1])
    support.expect(found, "no queue id in %r" % reply[1])
    return found.group(1)


def unstuffed(stored):
    """A stored message (LF lines, dot-stuffed) as a parsed email message."""
    lines = [line[1:] if line.startswith(b".") else line for line in stored.split(b"\n")]
    return email.message_from_bytes(b"\n".join(lines), policy=email.policy.compat32)


def envelope_of(root, queued):
    """The envelope of a queue file, as text ('' once it is gone)."""
    try:
        with open(os.path.join(support.queue_folder(root), queued), "rb") as f:
            return f.read().partition(b"\n\n")[0].decode("utf-8")
    except FileNotFoundError:
        return ""


class QueueCase(support.OneServerTestCase):
    """A server with --local-domains example.org whose other domains are scripted remotes on one port.

    [127.0.0.1] is a remote with every extension; [127.0.0.2] one without
    SMTPUTF8.  Retries are quick (--retry-base 0.3) and the lifetime short.
    """

    lifetime = "30"
    remote_kwargs = {}

    @classmethod
    def setUpClass(cls):
        cls.remote = support.RemoteSMTPServer(**cls.remote_kwargs)
        cls.old_remote = support.RemoteSMTPServer("127.0.0.2", cls.remote.port, extensions=("8BITMIME",))
        cls.server_args = ("--local-domains", "example.org", "--domain", "mx.example.org",
                           "--mx-port", str(cls.remote.port), "--retry-base", "0.3",
                           "--queue-lifetime", cls.lifetime, "--relay-timeout", "2") + cls.extra_args()
        try:
            super().setUpClass()
        except BaseException:
            cls.remote.close()
            cls.old_remote.close()
            raise

    @classmethod
    def extra_args(cls):
        return ()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.remote.release.set()
        cls.remote.close()
        cls.old_remote.close()

    def submit(self, recipients, body=SUBJECT % b"test", sender="alice@example.org", login=None):
        """One EHLO session (with AUTH PLAIN as login if given) sending body; the reply to its end."""
        with support.smtp_session(self.server, ehlo=True) as client:
            if login:
                client.cmd_expecting("AUTH PLAIN " + plain(login, support.DEFAULT_USERS[login]), 235)
            return support.send_message(client, body, sender, recipients)

    def received_by(self, remote, queue_id):
        """The message a remote got whose trace names queue_id (waits for it)."""
        def found():
            return [m for m in remote.messages if (" id %s;" % queue_id).encode() in m["data"]]
        return wait_for(found)[0]

    def outcome(self, queue_id, address, status):
        """Wait for the log line of queue_id's attempt at address with status; return the line."""
        return self.server.wait_for_output(r"%s: to=<%s> relay=\S+ delay=\S+ status=%s \((.*)\)"
                                           % (queue_id, re.escape(address), status)).group(0)

    def bounces(self, login="alice"):
        """The bounces in a user's mailbox, parsed."""
        messages = [unstuffed(m) for m in support.stored_messages(self.root, login)]
        return [m for m in messages if m.get_content_type() == "multipart/report"]


class RelayPermissionTest(support.OneServerTestCase):
    """Who may send to other domains: a server trusting only 127.0.0.2, so that 127.0.0.1 is a stranger."""

    server_args = ("--local-domains", "example.org,Lab.Example.", "--relay-networks", "127.0.0.2/32",
                   "--mx-port", str(support.closed_port()))

    def rcpt_reply(self, address, source=None, login=None):
        """The reply to RCPT TO:<address> in a fresh EHLO transaction (from source, logged in as login)."""
        with self.server.connect(source=source) as client:
            client.reply()
            client.cmd_expecting("EHLO client.test", 250)
            if login:
                client.cmd_expecting("AUTH PLAIN " + plain(login, support.DEFAULT_USERS[login]), 235)
            client.cmd_expecting("MAIL FROM:<%s>" % ("alice@example.org" if login else "sender@example.net"), 250)
            return client.cmd("RCPT TO:%s" % address)[1][-1]

    REMOTE_SPELLINGS = ("<u@other.example>", "<u@OTHER.Example>", "<u@other.example.>", "<u@sub.example.org>",
                        "<u@[127.0.0.1]>", "<u@[IPv6:::1]>", "<@example.org:u@other.example>",
                        "<@example.org,@lab.example:u@other.example>", "<postmaster@other.example>")

    def test_a_stranger_gets_550_for_every_spelling_of_another_domain(self):
        """Not logged in and not in --relay-networks: each spelling of a remote address gets 550 5.7.1."""
        for address in self.REMOTE_SPELLINGS:
            self.assertEqual(self.rcpt_reply(address), "550 5.7.1 relaying denied", address)

    def test_a_percent_hack_is_a_local_part_not_a_route(self):
        """<u%other.example@example.org> is an unknown local user (550 5.1.1), never relayed."""
        self.assertEqual(self.rcpt_reply("<alice%other.example@example.org>"), "550 5.1.1 No such user")

    def test_a_quoted_local_part_is_refused(self):
        """<"u@other.example"@example.org> is not taken: 501 (no quoted local parts)."""
        self.assertEqual(self.rcpt_reply('<"u@other.example"@example.org>')[:3], "501")

    def test_local_spellings_stay_local_for_a_stranger(self):
        """Upper case, a trailing dot and a source route ending in a local address are local users."""
        for address in ("<ALICE@EXAMPLE.ORG>", "<alice@example.org.>", "<bob@lab.example>",
                        "<@other.example:alice@example.org>"):
            self.assertRegex(self.rcpt_reply(address), r"^250 2\.1\.5 (alice|ALICE|bob)\.\.\. Recipient ok$",
                             address)

    def test_a_client_in_relay_networks_may_send_out(self):
        """From 127.0.0.2 (in --relay-networks), every spelling of a remote address is taken: 250 2.1.5."""
        for address in self.REMOTE_SPELLINGS:
            self.assertRegex(self.rcpt_reply(address, source="127.0.0.2"), r"^250 2\.1\.5 ", address)

    @support.skip_unless_ipv6
    def test_the_default_relay_networks_take_ipv6_loopback(self):
        """Without --relay-networks, a client on ::1 may send out (the default is 127.0.0.0/8 and ::1/128)."""
        root = support.make_mail_root()      # its own: a second server on a root shares its relay settings
        self.addCleanup(support.remove_mail_root, root)
        server = support.ServerProcess(SMTP_SCRIPT, root, "--local-domains", "example.org",
                                       "--mx-port", str(support.closed_port()), host="::1")
        self.addCleanup(server.close)
        with support.smtp_session(server) as client:
            client.cmd_expecting("MAIL FROM:<sender@example.net>", 250)
            self.assertEqual(client.cmd("RCPT TO:<u@other.example>")[1], ["250 u... Recipient ok"])

    def test_a_logged_in_client_may_send_out(self):
        """A stranger's address, logged in with AUTH: a remote recipient gets 250 2.1.5."""
        self.assertEqual(self.rcpt_reply("<u@other.example>", login="alice"), "250 2.1.5 u... Recipient ok")


class CourseModeTest(support.OneServerTestCase):
    """Without --local-domains nothing goes out: every domain is local, no queue exists."""

    def test_course_mode_keeps_its_reply_and_makes_no_queue(self):
        """The course dialogue's 250 stays byte for byte, for any domain, and no ROOT/.queue is made."""
        with support.smtp_session(self.server, helo="kuleuven.be") as client:
            client.cmd_expecting("MAIL_FROM: <cnlab@kuleuven.be>", 250)
            self.assertEqual(client.cmd("RCPT_TO: <alice@elsewhere.example>")[1], ["250 alice... Recipient ok"])
            client.cmd_expecting("DATA", 354)
            client.send(b"Subject: course\r\n\r\nhi\r\n.\r\n")
            self.assertEqual(client.reply()[1], ["250 OK Message accepted for delivery"])
        self.assertFalse(os.path.exists(support.queue_folder(self.root)))


class DeliveryTest(QueueCase):
    """Messages for local and remote recipients, what goes out, retries and bounces."""

    def test_local_and_remote_recipients_at_once(self):
        """One message to bob (local) and two remotes: 250 names the queue id; bob's copy and the remote's."""
        reply = self.submit(("bob@example.org", "carol@[127.0.0.1]", "dave@[127.0.0.1]"),
                            SUBJECT % b"for both")
        queued = queue_id(reply)
        self.assertIn(b"Subject: for both\n", read_mailbox(self.root, "bob"))
        got = self.received_by(self.remote, queued)
        self.assertEqual(got["recipients"], ["carol@[127.0.0.1]", "dave@[127.0.0.1]"])   # one connection
        self.assertTrue(got["data"].endswith(b"Subject: for both\r\n\r\nhello\r\n"))
        wait_for(lambda: queued not in support.queue_files(self.root))

    def test_bcc_only_mail_shows_no_recipient_list_locally_and_gets_no_to_remotely(self):
        """Section 1: a message with no To: for bob, alice and a remote: each local copy's To: names its recipient alone;
        'Mail for other domains gets no To: added.'"""
        body = b"From: alice@example.org\r\nSubject: bcc only\r\n\r\nsecret list\r\n"
        queued = queue_id(self.submit(("bob@example.org", "alice@example.org", "carol@[127.0.0.1]"), body))
        for login in ("bob", "alice"):
            [copy] = [m for m in support.stored_messages(self.root, login) if b"Subject: bcc only\n" in m]
            trace, _, rest = copy.partition(b"\nTo: ")       # the trace fields (section 8) name this copy's own
            self.assertTrue(trace.startswith(b"Return-Path: <alice@example.org>\nReceived: "), copy)
            self.assertIn(b"\tfor <%s@example.org>;" % login.encode(), trace)
            untraced = b"To: " + rest
            self.assertTrue(untraced.startswith(b"To: %s@example.org\nFrom: alice@example.org\n" % login.encode()),
                            copy)
            self.assertEqual(untraced.count(b"example.org"), 2, "no other recipient named")
        data = self.received_by(self.remote, queued)["data"]
        self.assertNotIn(b"\r\nTo:", data)
        self.assertNotIn(b"bob@", data)

    def test_what_goes_out_has_our_trace_first_and_is_unstuffed(self):
        """The remote gets Received: (from, by, with ESMTP, id, date) first and the body as sent."""
        queued = queue_id(self.submit(("carol@[127.0.0.1]",), b"Subject: trace\r\n\r\n..dot\r\nend\r\n"))
        data = self.received_by(self.remote, queued)["data"]
        self.assertRegex(data.decode(), r"^Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n\tby mx\.example\.org "
                                        r"with ESMTP id %s;\r\n\t\w{3}, \d\d \w{3} \d{4} " % queued)
        self.assertTrue(data.endswith(b"Subject: trace\r\n\r\n..dot\r\nend\r\n"))   # '..' is stuffing on the wire

    def test_a_message_in_bdat_chunks_goes_out_like_one_in_data(self):
        """CHUNKING (RFC 3030): BDAT ... LAST to a remote recipient is queued and sent, its lines intact."""
        body = b"Subject: chunked\r\n\r\n.starts with a dot\r\n"
        with support.smtp_session(self.server, ehlo=True) as client:
            client.cmd_expecting("MAIL FROM:<alice@example.org>", 250)
            client.cmd_expecting("RCPT TO:<carol@[127.0.0.1]>", 250)
            client.send(b"BDAT %d LAST\r\n" % len(body) + body)
            queued = queue_id(client.reply())
        self.assertTrue(self.received_by(self.remote, queued)["data"].endswith(
            b"Subject: chunked\r\n\r\n..starts with a dot\r\n"))      # stuffed again on the wire

    def test_a_logged_in_submission_gets_date_and_message_id(self):
        """AUTH-submitted mail lacking Date:/Message-ID: gets both (RFC 6409 8.2, 8.3), with ESMTPA."""
        queued = queue_id(self.submit(("carol@[127.0.0.1]",), SUBJECT % b"bare", login="alice"))
        data = self.received_by(self.remote, queued)["data"].decode()
        self.assertIn(" with ESMTPA id %s;" % queued, data)
        self.assertRegex(data, r"\r\nDate: \w{3}, \d\d \w{3} \d{4} [\d:]{8} [+-]\d{4}\r\n")
        self.assertRegex(data, r"\r\nMessage-ID: <[^@>]+@mx\.example\.org>\r\n")

    def test_a_message_from_a_trusted_network_gets_no_added_headers(self):
        """Mail relayed for a client in --relay-networks (no AUTH) keeps its headers: no Date: added."""
        queued = queue_id(self.submit(("carol@[127.0.0.1]",), SUBJECT % b"relayed"))
        self.assertNotIn(b"\r\nDate:", self.received_by(self.remote, queued)["data"])

    def test_messages_in_a_row_share_one_connection(self):
        """Messages for one server in quick succession go over the connection the first one opened."""
        self.received_by(self.remote, queue_id(self.submit(("first@[127.0.0.1]",))))
        sessions = self.remote.sessions
        for number in range(3):
            self.received_by(self.remote, queue_id(self.submit(("next%d@[127.0.0.1]" % number,))))
        self.assertEqual(self.remote.sessions, sessions)

    def test_retry_after_4xx(self):
        """A 451 to RCPT is retried (--retry-base 0.3) until the remote takes it; sent once."""
        self.remote.rcpt["later@[127.0.0.1]"] = "451 4.3.0 try again later"
        queued = queue_id(self.submit(("later@[127.0.0.1]",)))
        self.outcome(queued, "later@[127.0.0.1]", "deferred")
        del self.remote.rcpt["later@[127.0.0.1]"]
        self.received_by(self.remote, queued)
        self.outcome(queued, "later@[127.0.0.1]", "sent")
        wait_for(lambda: queued not in support.queue_files(self.root))
        self.assertEqual(sum(queued.encode() in m["data"] for m in self.remote.messages), 1)

    def test_each_recipient_on_its_own(self):
        """One recipient deferred, one sent: the retry goes only to the deferred one."""
        self.remote.rcpt["slow@[127.0.0.1]"] = "452 4.2.2 mailbox busy"
        queued = queue_id(self.submit(("slow@[127.0.0.1]", "quick@[127.0.0.1]")))
        self.outcome(queued, "slow@[127.0.0.1]", "deferred")
        del self.remote.rcpt["slow@[127.0.0.1]"]
        wait_for(lambda: queued not in support.queue_files(self.root))
        sent = [m["recipients"] for m in self.remote.messages if queued.encode() in m["data"]]
        self.assertEqual(sent, [["quick@[127.0.0.1]"], ["slow@[127.0.0.1]"]])

    def test_bounce_after_5xx_into_the_local_senders_mailbox(self):
        """A 550 bounces at once: alice gets a multipart/report DSN with the remote's reply."""
        self.remote.rcpt["gone@[127.0.0.1]"] = "550 5.1.1 no such user here"
        queued = queue_id(self.submit(("gone@[127.0.0.1]",), SUBJECT % b"to the void"))
        self.outcome(queued, "gone@[127.0.0.1]", "bounced")
        bounce = wait_for(lambda: [b for b in self.bounces() if queued in b.as_string()])[0]
        self.assertEqual(bounce.get_param("report-type"), "delivery-status")
        self.assertEqual(bounce["From"], "Mail Delivery System <MAILER-DAEMON@mx.example.org>")
        readable, status, headers = bounce.get_payload()
        self.assertIn("<gone@[127.0.0.1]>: 550 5.1.1 no such user here", readable.get_payload())
        fields = status.as_string()
        for line in ("Reporting-MTA: dns; mx.example.org", "Final-Recipient: rfc822; gone@[127.0.0.1]",
                     "Action: failed", "Status: 5.1.1", "Remote-MTA: dns; [127.0.0.1]",
                     "Diagnostic-Code: smtp; 550 5.1.1 no such user here"):
            self.assertIn(line, fields)
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        self.assertIn("Subject: to the void", headers.get_payload())
        wait_for(lambda: queued not in support.queue_files(self.root))

    def test_bounce_to_a_remote_sender_goes_through_the_queue(self):
        """A remote sender's bounce is queued from <> and sent to the sender's server."""
        self.remote.rcpt["refused@[127.0.0.1]"] = "554 5.7.1 not wanted"
        queued = queue_id(self.submit(("refused@[127.0.0.1]",), sender="friend@[127.0.0.1]"))
        self.outcome(queued, "refused@[127.0.0.1]", "bounced")
        bounce = wait_for(lambda: [m for m in self.remote.messages
                                   if m["recipients"] == ["friend@[127.0.0.1]"] and queued.encode() in m["data"]])[0]
        self.assertEqual(bounce["sender"], "")
        self.assertIn(b"Content-Type: multipart/report; report-type=delivery-status;", bounce["data"])

    def test_a_bounce_to_a_utf8_sender_goes_with_smtputf8(self):
        """The bounce for a remote sender whose address is UTF-8 is sent with MAIL FROM:<> SMTPUTF8."""
        self.remote.rcpt["refused8@[127.0.0.1]"] = "550 5.1.1 not here"
        sender = "jos\u00e9@[127.0.0.1]"
        with support.smtp_session(self.server, ehlo=True) as client:
            client.cmd_expecting("MAIL FROM:<%s> SMTPUTF8" % sender, 250)
            client.cmd_expecting("RCPT TO:<refused8@[127.0.0.1]>", 250)
            client.cmd_expecting("DATA", 354)
            client.send(SUBJECT % b"utf-8 sender" + b".\r\n")
            queued = queue_id(client.reply())
        bounce = wait_for(lambda: [m for m in self.remote.messages
                                   if m["recipients"] == [sender] and queued.encode() in m["data"]])[0]
        self.assertRegex(bounce["mail"], r"^MAIL FROM:<> .*SMTPUTF8$")

    def test_no_bounce_for_the_null_sender(self):
        """Mail from <> that fails is logged as bounced and dropped: no bounce anywhere."""
        self.remote.rcpt["void@[127.0.0.1]"] = "550 5.1.1 nobody"
        queued = queue_id(self.submit(("void@[127.0.0.1]",), sender=""))
        self.outcome(queued, "void@[127.0.0.1]", "bounced")
        self.server.wait_for_output("%s: removed" % queued)
        self.assertNotIn("%s: bounce" % queued, self.server.output())

    def test_utf8_mail_to_a_server_without_smtputf8_bounces_5_6_7(self):
        """An SMTPUTF8 message with UTF-8 headers, to a server that lacks SMTPUTF8: bounced with 5.6.7."""
        with support.smtp_session(self.server, ehlo=True) as client:
            client.cmd_expecting("MAIL FROM:<alice@example.org> SMTPUTF8", 250)
            client.cmd_expecting("RCPT TO:<old@[127.0.0.2]>", 250)
            client.cmd_expecting("DATA", 354)
            client.send("Subject: caf\u00e9\r\n\r\nol\u00e9\r\n.\r\n")
            queued = queue_id(client.reply())
        self.outcome(queued, "old@[127.0.0.2]", "bounced")
        bounce = wait_for(lambda: [b for b in self.bounces() if queued in b.as_string()])[0]
        self.assertIn("Status: 5.6.7", bounce.get_payload()[1].as_string())
        self.assertEqual(self.old_remote.messages, [])

    def test_8bit_mail_goes_with_body_8bitmime(self):
        """A message with 8-bit bytes is sent with BODY=8BITMIME to a server offering it, bytes unchanged."""
        queued = queue_id(self.submit(("carol@[127.0.0.1]",), "Subject: 8bit\r\n\r\nna\u00efve\r\n".encode()))
        got = self.received_by(self.remote, queued)
        self.assertIn(" BODY=8BITMIME", got["mail"])
        self.assertTrue(got["data"].endswith("na\u00efve\r\n".encode()))

    def test_a_mail_loop_bounces_5_4_6(self):
        """A message already carrying 50 Received: headers (ours makes 51) bounces with 5.4.6, unsent."""
        body = b"Received: from a by b; Thu, 1 Jan 2026 00:00:00 +0000\r\n" * 50 + SUBJECT % b"loop"
        queued = queue_id(self.submit(("carol@[127.0.0.1]",), body))
        self.outcome(queued, "carol@[127.0.0.1]", "bounced")
        bounce = wait_for(lambda: [b for b in self.bounces() if queued in b.as_string()])[0]
        self.assertIn("Status: 5.4.6", bounce.get_payload()[1].as_string())
        self.assertFalse([m for m in self.remote.messages if queued.encode() in m["data"]])


class LifetimeTest(QueueCase):
    """A remote that answers 4xx for ever, and a --queue-lifetime of 1.5 s."""

    lifetime = "1.5"

    def test_bounce_after_the_lifetime(self):
        """A recipient deferred until --queue-lifetime (1.5 s) runs out bounces with Status 4.4.7."""
        self.remote.rcpt["never@[127.0.0.1]"] = "450 4.2.1 mailbox unavailable"
        queued = queue_id(self.submit(("never@[127.0.0.1]",), SUBJECT % b"patience"))
        bounce = wait_for(lambda: [b for b in self.bounces() if queued in b.as_string()], timeout=15)[0]
        status = bounce.get_payload()[1].as_string()
        self.assertIn("Status: 4.4.7", status)
        self.assertIn("Diagnostic-Code: smtp; 450 4.2.1 mailbox unavailable (delivery time expired)", status)


class UnreachableTest(QueueCase):
    """Remote servers that are down or hang; --queue and --flush (a slow retry: --retry-base 300)."""

    lifetime = "600"

    @classmethod
    def extra_args(cls):
        return ("--retry-base", "300", "--relay-timeout", "0.5")

    def test_a_remote_that_hangs_is_deferred_and_listed_by_queue(self):
        """A remote that never greets times out: deferred, and --queue lists the recipient with why."""
        hanging = support.RemoteSMTPServer("127.0.0.3", self.remote.port)
        hanging.greeting = None
        self.addCleanup(hanging.close)
        queued = queue_id(self.submit(("stuck@[127.0.0.3]",), SUBJECT % b"stuck"))
        reason = self.outcome(queued, "stuck@[127.0.0.3]", "deferred")
        self.assertIn("timed out", reason)
        wait_for(lambda: "\nrcpt\tpending\t1\t" in envelope_of(self.root, queued))   # recorded
        code, listing = support.run_queue_command(self.root, "--queue")
        self.assertEqual(code, 0, listing)
        self.assertRegex(listing, r"(?m)^%s +\d+ \w{3} .{20} +alice@example\.org$" % queued)
        self.assertRegex(listing, r"\(451 4\.4\.1 conversation with \[127\.0\.0\.3\]\[127\.0\.0\.3\]:\d+ failed: "
                                  r"[^;]*timed out; next try \d{4}-\d\d-\d\d [\d:]{8}\)\n +stuck@\[127\.0\.0\.3\]\n")

    def test_flush_retries_at_once(self):
        """A 4xx'd recipient waits 300 s; --flush makes the server send it now."""
        self.remote.rcpt["flushed@[127.0.0.1]"] = "421 4.3.2 not now"
        queued = queue_id(self.submit(("flushed@[127.0.0.1]",)))
        self.outcome(queued, "flushed@[127.0.0.1]", "deferred")
        wait_for(lambda: "\nrcpt\tpending\t1\t" in envelope_of(self.root, queued))   # recorded
        del self.remote.rcpt["flushed@[127.0.0.1]"]
        code, out = support.run_queue_command(self.root, "--flush")
        self.assertEqual(code, 0, out)
        self.received_by(self.remote, queued)

    def test_a_state_change_replaces_a_dead_writers_temporary_file(self):
        """An orphaned <id>.tmp (its writer died) does not block recording the next attempt."""
        self.remote.rcpt["again@[127.0.0.1]"] = "450 4.2.0 busy"
        queued = queue_id(self.submit(("again@[127.0.0.1]",)))
        wait_for(lambda: "\nrcpt\tpending\t1\t" in envelope_of(self.root, queued))   # recorded
        orphan = os.path.join(support.queue_folder(self.root), queued + ".tmp")
        with open(orphan, "wb") as f:
            f.write(b"half")
        support.run_queue_command(self.root, "--flush")
        wait_for(lambda: self.server.output().count("%s: to=<again@[127.0.0.1]>" % queued) == 2)
        wait_for(lambda: "\nrcpt\tpending\t2\t" in envelope_of(self.root, queued))
        self.assertFalse(os.path.exists(orphan))

    def test_queue_into_a_closed_pipe_ends_quietly(self):
        """'--queue | head': a reader that has gone gets no traceback, exit 1, nothing on stderr."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        os.mkdir(support.queue_folder(root))
        reader, writer = os.pipe()
        os.close(reader)                 # gone before the first byte: every write fails with EPIPE
        try:
            proc = subprocess.run([sys.executable, SMTP_SCRIPT, "--queue", "--root", root], stdout=writer,
                                  stderr=subprocess.PIPE, timeout=support.DEADLINE)
        finally:
            os.close(writer)
        self.assertEqual((proc.returncode, proc.stderr), (1, b""))

    def test_queue_on_an_empty_queue(self):
        """--queue on a root whose queue holds nothing says so."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        os.mkdir(support.queue_folder(root))
        self.assertEqual(support.run_queue_command(root, "--queue"), (0, "Mail queue is empty\n"))


class CrashTest(unittest.TestCase):
    """kill -9 and faults: nothing acknowledged is lost, nothing half-written stays."""

    def setUp(self):
        self.root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, self.root)
        self.remote = support.RemoteSMTPServer()
        self.addCleanup(self.remote.close)
        self.addCleanup(self.remote.release.set)
        self.args = ("--local-domains", "example.org", "--mx-port", str(self.remote.port), "--retry-base", "0.2")

    def start(self, env=None):
        server = support.ServerProcess(SMTP_SCRIPT, self.root, *self.args, env=env)
        self.addCleanup(server.close)
        return server

    def test_kill_9_while_relaying_then_restart_loses_nothing(self):
        """The server dies (SIGKILL) while the remote holds the message unanswered; restarted, it sends it."""
        self.remote.data = ["hang", "250 2.0.0 Ok: queued"]
        server = self.start()
        with support.smtp_session(server) as client:
            queued = queue_id(support.send_message(client, SUBJECT % b"survivor", "alice@example.org",
                                                   ("carol@[127.0.0.1]",)))
        self.assertTrue(self.remote.hung.wait(support.DEADLINE))
        server.kill()
        self.remote.release.set()
        self.assertEqual(support.queue_files(self.root), [queued])
        self.start()
        wait_for(lambda: [m for m in self.remote.messages if queued.encode() in m["data"]])
        wait_for(lambda: not support.queue_files(self.root))

    def test_sigterm_while_relaying_stops_at_once_and_keeps_the_message(self):
        """SIGTERM while a runner waits on a remote: the server exits 0 promptly, the message stays queued."""
        self.remote.data = ["hang"]
        server = self.start()
        with support.smtp_session(server) as client:
            queued = queue_id(support.send_message(client, SUBJECT % b"kept", "alice@example.org",
                                                   ("carol@[127.0.0.1]",)))
        self.assertTrue(self.remote.hung.wait(support.DEADLINE))
        self.assertEqual(server.terminate(), 0)
        self.assertEqual(support.queue_files(self.root), [queued])

    def test_queue_lists_a_recipient_on_its_first_try_as_due_now(self):
        """--queue while the first try hangs: the recipient is "not tried yet; next try now", not 1970."""
        self.remote.data = ["hang"]
        server = self.start()
        with support.smtp_session(server) as client:
            queued = queue_id(support.send_message(client, SUBJECT % b"first try", "alice@example.org",
                                                   ("carol@[127.0.0.1]",)))
        self.assertTrue(self.remote.hung.wait(support.DEADLINE))
        code, listing = support.run_queue_command(self.root, "--queue")
        self.assertEqual(code, 0, listing)
        self.assertRegex(listing, r"%s .*\n +\(not tried yet; next try now\)\n +carol@\[127\.0\.0\.1\]\n" % queued)

    def test_restart_removes_orphaned_temporary_files(self):
        """A .tmp file a dead server left in ROOT/.queue is removed when a server starts."""
        os.mkdir(support.queue_folder(self.root), 0o700)
        orphan = os.path.join(support.queue_folder(self.root), "0" * 21 + ".tmp")
        with open(orphan, "wb") as f:
            f.write(b"mailserver-queue 1\nid\t")
        self.start()
        self.assertFalse(os.path.exists(orphan))

    def test_a_failed_queue_write_cuts_the_local_appends_back(self):
        """The queue file's rename fails: 451, bob's mailbox as before, no queue file and no .tmp left."""
        folder = tempfile.mkdtemp(prefix="faults-")
        self.addCleanup(support.remove_mail_root, folder)
        env, flag = support.failing_queue_env(folder)
        server = self.start(env)
        open(flag, "w").close()
        with support.smtp_session(server) as client:
            reply = support.send_message(client, SUBJECT % b"all or none", "alice@example.org",
                                         ("bob@example.org", "carol@[127.0.0.1]"))
        self.assertEqual(reply[1], ["451 Requested action aborted: local error in processing"])
        self.assertEqual(read_mailbox(self.root, "bob"), b"")
        self.assertEqual(os.listdir(support.queue_folder(self.root)), [])

    def test_two_servers_on_one_root_send_each_message_once(self):
        """Two servers share a root; after a 4xx round, a --flush sets both on every message: each goes once."""
        self.remote.data = ["451 4.3.0 later"] * 6 + ["250 2.0.0 Ok: queued"]
        self.args += ("--retry-base", "300")
        first, second = self.start(), self.start()
        ids = []
        for number in range(6):
            server = (first, second)[number % 2]
            with support.smtp_session(server) as client:
                ids.append(queue_id(support.send_message(client, SUBJECT % b"shared", "alice@example.org",
                                                         ("carol@[127.0.0.1]",))))
        for queued in ids:
            wait_for(lambda: "\nrcpt\tpending\t1\t" in envelope_of(self.root, queued))   # the 4xx recorded
        support.run_queue_command(self.root, "--flush")
        wait_for(lambda: not support.queue_files(self.root))
        sent = [queued for m in self.remote.messages for queued in ids if queued.encode() in m["data"]]
        self.assertEqual(sorted(sent), sorted(ids))


class SmarthostTest(QueueCase):
    """--relay-host: everything through one server, STARTTLS with a checked certificate, AUTH from a file."""

    remote_kwargs = {"tls": True, "login": ("relayuser", "s3cret pass")}

    @classmethod
    def extra_args(cls):
        cls.auth_folder = tempfile.mkdtemp(prefix="relay-auth-")
        auth = os.path.join(cls.auth_folder, "relay-auth")
        with open(auth, "w") as f:
            f.write("relayuser s3cret pass\n")
        return ("--relay-host", "127.0.0.1:%d" % cls.remote.port, "--relay-cafile", support.TLS_CERT,
                "--relay-auth", auth)

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        support.remove_mail_root(cls.auth_folder)

    def test_everything_goes_through_the_smarthost_with_tls_and_auth(self):
        """Mail for any domain reaches the smarthost inside TLS after AUTH; the password is never logged."""
        queued = queue_id(self.submit(("friend@far.example", "other@elsewhere.example")))
        got = self.received_by(self.remote, queued)
        self.assertEqual((got["tls"], got["recipients"]), (True, ["friend@far.example", "other@elsewhere.example"]))
        self.outcome(queued, "friend@far.example", "sent")
        self.assertNotIn("s3cret", self.server.output())


class SmarthostWithoutTLSTest(QueueCase):
    """A smarthost that offers no STARTTLS gets nothing: our login must not go in clear."""

    @classmethod
    def extra_args(cls):
        return ("--relay-host", "127.0.0.1:%d" % cls.remote.port, "--relay-cafile", support.TLS_CERT)

    def test_no_starttls_means_deferred(self):
        """Deferred with 4.7.4, and the smarthost gets no message."""
        queued = queue_id(self.submit(("friend@far.example",)))
        self.assertIn("offers no STARTTLS", self.outcome(queued, "friend@far.example", "deferred"))
        self.assertEqual(self.remote.messages, [])


class OurServerAsSmarthostTest(unittest.TestCase):
    """Our own server, with --implicit-tls and AUTH, as the smarthost of another: end to end, ours to ours."""

    def test_relayed_with_implicit_tls_and_auth_into_the_smarthosts_mailbox(self):
        """alice@far.example goes through the smarthost (TLS from the first byte, AUTH) into its alice's mailbox."""
        far, near = support.make_mail_root(), support.make_mail_root()
        self.addCleanup(support.remove_mail_root, far)
        self.addCleanup(support.remove_mail_root, near)
        smarthost = support.ServerProcess(SMTP_SCRIPT, far, "--implicit-tls", *support.TLS_ARGS)
        self.addCleanup(smarthost.close)
        auth = os.path.join(near, "relay-auth")
        with open(auth, "w") as f:
            f.write("alice wonderland\n")
        server = support.ServerProcess(SMTP_SCRIPT, near, "--local-domains", "example.org",
                                       "--relay-host", "localhost:%d" % smarthost.port, "--relay-implicit-tls",
                                       "--relay-cafile", support.TLS_CERT, "--relay-auth", auth)
        self.addCleanup(server.close)
        with support.smtp_session(server) as client:
            queued = queue_id(support.send_message(client, SUBJECT % b"via the smarthost", "alice@example.org",
                                                   ("alice@far.example",)))
        server.wait_for_output(r"%s: to=<alice@far\.example> relay=localhost\[127\.0\.0\.1\]:%d .* status=sent"
                               % (queued, smarthost.port))
        stored = read_mailbox(far, "alice")
        self.assertIn(b"Subject: via the smarthost\n", stored)
        self.assertIn((" id %s;" % queued).encode(), stored)
        smarthost.wait_for_output("authentication succeeded for login alice, mechanism ")


class RelayOptionsTest(unittest.TestCase):
    """The relay options on the command line."""

    def test_relay_options_without_local_domains_exit_2(self):
        """--relay-host or --dns-server without --local-domains: exit 2 and a one-line error, no traceback."""
        for args in (["--relay-host", "smtp.example.net"], ["--dns-server", "127.0.0.1"]):
            proc = subprocess.run([sys.executable, SMTP_SCRIPT, "0"] + args, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=support.DEADLINE)
            self.assertEqual(proc.returncode, 2, args)
            self.assertIn(b"need --local-domains", proc.stderr)
            self.assertNotIn(b"Traceback", proc.stderr)


class MXDeliveryTest(QueueCase):
    """Delivery by MX lookup (RFC 5321 5.1) with a DNS responder on loopback (--dns-server, --mx-port)."""

    remote_kwargs = {"tls": True}
    ZONE = {
        ("mx.test", "MX"): [(10, "mx1.mx.test")],
        ("mx1.mx.test", "A"): ["127.0.0.1"],
        ("backup.test", "MX"): [(10, "down.backup.test"), (20, "up.backup.test")],
        ("down.backup.test", "A"): ["127.0.0.4"],          # nobody listens there: refused
        ("up.backup.test", "A"): ["127.0.0.1"],
        ("bare.test", "A"): ["127.0.0.1"],                  # no MX: the domain's own address
        ("null.test", "MX"): [(0, ".")],
        ("gone.test", "*"): "NXDOMAIN",
        ("broken.test", "*"): "SERVFAIL",
    }

    @classmethod
    def extra_args(cls):
        cls.responder = support.DNSResponder(cls.ZONE)
        return ("--dns-server", "%s:%d" % cls.responder.address)

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.responder.close()

    def test_mail_goes_to_the_mx_with_opportunistic_starttls(self):
        """user@mx.test reaches the MX found in DNS, inside STARTTLS (the test certificate, unchecked)."""
        queued = queue_id(self.submit(("user@mx.test",)))
        got = self.received_by(self.remote, queued)
        self.assertEqual((got["recipients"], got["tls"]), (["user@mx.test"], True))
        self.assertIn("relay=mx1.mx.test[127.0.0.1]:%d" % self.remote.port,
                      self.outcome(queued, "user@mx.test", "sent"))

    def test_an_unreachable_mx_falls_back_to_the_next(self):
        """The preferred MX refuses the connection: the one of the next preference gets the message."""
        queued = queue_id(self.submit(("user@backup.test",)))
        self.received_by(self.remote, queued)
        self.assertIn("relay=up.backup.test[127.0.0.1]", self.outcome(queued, "user@backup.test", "sent"))

    def test_a_domain_without_mx_gets_mail_at_its_address(self):
        """No MX record: the domain's own A record is the exchanger."""
        queued = queue_id(self.submit(("user@bare.test",)))
        self.received_by(self.remote, queued)

    def test_a_null_mx_bounces_5_1_10(self):
        """A null MX (RFC 7505) bounces at once with 556 5.1.10."""
        queued = queue_id(self.submit(("user@null.test",)))
        self.assertIn("556 5.1.10", self.outcome(queued, "user@null.test", "bounced"))
        bounce = wait_for(lambda: [b for b in self.bounces() if queued in b.as_string()])[0]
        self.assertIn("Status: 5.1.10", bounce.get_payload()[1].as_string())

    def test_an_unknown_domain_bounces_5_1_2(self):
        """NXDOMAIN bounces at once with 550 5.1.2."""
        queued = queue_id(self.submit(("user@gone.test",)))
        self.assertIn("550 5.1.2 gone.test: no such domain", self.outcome(queued, "user@gone.test", "bounced"))

    def test_a_dns_failure_is_retried(self):
        """SERVFAIL defers (4.4.3) and the message stays queued for a retry."""
        queued = queue_id(self.submit(("user@broken.test",)))
        self.assertIn("451 4.4.3 ", self.outcome(queued, "user@broken.test", "deferred"))
        wait_for(lambda: self.server.output().count("%s: to=<user@broken.test> relay=none" % queued) >= 2)
        self.assertIn(queued, support.queue_files(self.root))


# --------------------------------------------------------------------------
# DNS: the resolver (mailserver_smtp.Resolver, mail_exchangers) against support.DNSResponder
# --------------------------------------------------------------------------

SHORT_TIMEOUT = 0.2   # seconds: a dropped query fails fast
ZONE = {
    ("example.net", "MX"): [(20, "mx2.example.net"), (10, "mx1.example.net")],
    ("mx1.example.net", "A"): ["127.0.0.1"],
    ("mx1.example.net", "AAAA"): ["::1"],
    ("mx2.example.net", "A"): ["127.0.0.2"],
    ("equal.test", "MX"): [(10, "a.equal.test"), (10, "b.equal.test")],
    ("a.equal.test", "A"): ["127.0.0.3"],
    ("b.equal.test", "A"): ["127.0.0.4"],
    ("plain.test", "A"): ["127.0.0.5"],
    ("plain.test", "AAAA"): ["::1"],
    ("bare.test", "MX"): [],
    ("crowded.test", "MX"): [(n, "mx%d.crowded.test" % n) for n in range(40, 0, -1)],
    ("null.test", "MX"): [(0, ".")],
    ("broken.test", "*"): "SERVFAIL",
    ("refused.test", "*"): "REFUSED",
    ("gone.test", "*"): "NXDOMAIN",
    ("www.example.net", "CNAME"): ["host.example.net"],
    ("host.example.net", "A"): ["127.0.0.6"],
    ("alias.test", "CNAME"): ["www.example.net"],
    ("big.test", "A"): ["10.0.%d.%d" % (i // 256, i % 256) for i in range(60)],
    ("xn--bcher-kva.example", "MX"): [(5, "mx1.example.net")],
    ("flaky.test", "MX"): [(10, "broken.test"), (20, "mx2.example.net")],
    ("allflaky.test", "MX"): [(10, "broken.test"), (20, "refused.test")],
    ("nohost.test", "MX"): [(10, "gone.test")],
    ("example.net", "TXT"): ["v=spf1 -all", ("v=DKIM1; k=rsa; ", "p=", "ABC")],
    ("long.example.net", "TXT"): ["p=" + "A" * 600],
    ("empty.test", "TXT"): [""],
    ("latin.test", "TXT"): [b"caf\xe9"],
    ("txt.alias.test", "CNAME"): ["example.net"],
    ("1.0.0.127.in-addr.arpa", "PTR"): ["mx1.example.net"],
    ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa", "PTR"): ["mx1.example.net"],
}


def closed_udp_port():
    """A loopback UDP port nobody listens on (just freed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ResponderTestCase(unittest.TestCase):
    """Each test gets a responder serving ZONE and a resolver asking only it."""

    def setUp(self):
        self.responder = support.DNSResponder(ZONE)
        self.addCleanup(self.responder.close)
        self.resolver = dns.Resolver([self.responder.address], timeout=SHORT_TIMEOUT * 5, attempts=1)

    def assertFails(self, temporary, reason, call, *args):
        """call(*args) raises DNSError with that temporary flag and reason (a regex)."""
        with self.assertRaises(dns.DNSError) as caught:
            call(*args)
        self.assertEqual(caught.exception.temporary, temporary, str(caught.exception))
        self.assertRegex(caught.exception.reason, reason)
        return caught.exception


class MailExchangerTest(ResponderTestCase):
    """mail_exchangers: RFC 5321 5.1 and RFC 7505."""

    def test_order_by_preference(self):
        """MX records come lowest preference first, each with its A then AAAA addresses."""
        self.assertEqual(dns.mail_exchangers(self.resolver, "example.net"),
                         [("mx1.example.net", ["127.0.0.1", "::1"]), ("mx2.example.net", ["127.0.0.2"])])

    def test_equal_preferences_shuffled(self):
        """Exchangers of equal preference come in both orders (2**-39 chance of a false failure)."""
        orders = set()
        for _ in range(40):
            orders.add(tuple(host for host, _ in dns.mail_exchangers(self.resolver, "equal.test")))
            if len(orders) == 2:
                break
        self.assertEqual(orders, {("a.equal.test", "b.equal.test"), ("b.equal.test", "a.equal.test")})

    def test_only_the_best_exchangers_are_looked_up(self):
        """Of 40 MX records, only the 5 best hosts are looked up and returned: a runner's time stays bounded."""
        for n in range(1, 41):
            self.responder.zone[("mx%d.crowded.test" % n, "A")] = ["127.0.0.%d" % n]
        exchangers = dns.mail_exchangers(self.resolver, "crowded.test")
        self.assertEqual([host for host, _ in exchangers], ["mx%d.crowded.test" % n for n in range(1, 6)])
        self.assertEqual({name for name, rtype in self.responder.queries if rtype != "MX"},
                         {"mx%d.crowded.test" % n for n in range(1, 6)})

    def test_implicit_mx(self):
        """A domain without MX records is its own exchanger, at its A and AAAA addresses."""
        self.assertEqual(dns.mail_exchangers(self.resolver, "Plain.Test."), [("plain.test", ["127.0.0.5", "::1"])])

    def test_no_mx_no_address_is_permanent(self):
        """A domain with neither MX nor address records fails permanently."""
        self.assertFails(False, dns.DNS_NO_ADDRESS, dns.mail_exchangers, self.resolver, "bare.test")

    def test_null_mx_is_permanent(self):
        """A null MX fails permanently, with RFC 7505 named, and its "." is never looked up."""
        error = self.assertFails(False, re.escape(dns.DNS_NULL_MX), dns.mail_exchangers, self.resolver, "null.test")
        self.assertIn("null.test", str(error))
        self.assertEqual(self.responder.queries, [("null.test", "MX")])

    def test_nxdomain_is_permanent(self):
        """A domain that does not exist fails permanently."""
        self.assertFails(False, dns.DNS_NO_SUCH_DOMAIN, dns.mail_exchangers, self.resolver, "gone.test")

    def test_servfail_is_temporary(self):
        """SERVFAIL fails temporarily."""
        self.assertFails(True, re.escape(dns.DNS_SERVER_FAILURE), dns.mail_exchangers, self.resolver, "broken.test")

    def test_exchanger_failing_temporarily_is_skipped(self):
        """An exchanger whose address lookup fails temporarily is left out; the next one is used."""
        self.assertEqual(dns.mail_exchangers(self.resolver, "flaky.test"), [("mx2.example.net", ["127.0.0.2"])])

    def test_all_exchangers_failing_temporarily(self):
        """When every exchanger's address lookup fails temporarily, the failure is temporary."""
        self.assertFails(True, "REFUSED", dns.mail_exchangers, self.resolver, "allflaky.test")

    def test_no_exchanger_with_address_is_permanent(self):
        """When no exchanger exists, the failure is permanent."""
        self.assertFails(False, dns.DNS_NO_EXCHANGER_ADDRESS, dns.mail_exchangers, self.resolver, "nohost.test")

    def test_idna_domain(self):
        """A non-ASCII domain is asked for in its IDNA form."""
        self.assertEqual(dns.mail_exchangers(self.resolver, "Bücher.example"),
                         [("mx1.example.net", ["127.0.0.1", "::1"])])
        self.assertEqual(self.responder.queries[0], ("xn--bcher-kva.example", "MX"))

    def test_address_literals(self):
        """IPv4 and IPv6 address literals are their own exchangers, without any DNS query."""
        self.assertEqual(dns.mail_exchangers(self.resolver, "[192.0.2.1]"), [("[192.0.2.1]", ["192.0.2.1"])])
        self.assertEqual(dns.mail_exchangers(self.resolver, "[IPv6:2001:DB8:0::1]"),
                         [("[IPv6:2001:DB8:0::1]", ["2001:db8::1"])])
        self.assertEqual(self.responder.queries, [])

    def test_bad_address_literal_is_permanent(self):
        """An address literal that is no address fails permanently."""
        for literal in ("[192.0.2.300]", "[IPv6:192.0.2.1]", "[tag:stuff]", "[]"):
            self.assertFails(False, dns.DNS_BAD_LITERAL, dns.mail_exchangers, self.resolver, literal)


class QueryTest(ResponderTestCase):
    """Resolver.query: names, rcodes, transports."""

    def test_noerror_without_records(self):
        """A known name without records of the type gives an empty list."""
        self.assertEqual(self.resolver.query("mx2.example.net", "AAAA"), [])

    def test_refused_is_temporary(self):
        """REFUSED fails temporarily."""
        self.assertFails(True, "REFUSED", self.resolver.query, "refused.test", "A")

    def test_timeout_is_temporary(self):
        """A server that never answers gives a temporary DNS timeout, after the timeout for each try."""
        self.responder.drop.add("example.net")
        resolver = dns.Resolver([self.responder.address], timeout=SHORT_TIMEOUT, attempts=2)
        started = time.monotonic()
        self.assertFails(True, dns.DNS_TIME_OUT, resolver.query, "example.net", "MX")
        self.assertLess(time.monotonic() - started, 4 * SHORT_TIMEOUT + 1)
        self.assertEqual(self.responder.queries, [("example.net", "MX")] * 2)

    def test_unreachable_server_is_temporary(self):
        """A closed server port fails temporarily."""
        resolver = dns.Resolver([("127.0.0.1", closed_udp_port())], timeout=SHORT_TIMEOUT, attempts=1)
        self.assertFails(True, "unreachable", resolver.query, "example.net", "MX")

    def test_next_server_after_failure(self):
        """A server that fails temporarily is followed by the next one."""
        with support.DNSResponder({("example.net", "*"): "SERVFAIL"}) as failing:
            resolver = dns.Resolver([failing.address, self.responder.address], timeout=1, attempts=1)
            self.assertEqual(resolver.query("example.net", "MX"),
                             [(20, "mx2.example.net"), (10, "mx1.example.net")])
            self.assertEqual(failing.queries, [("example.net", "MX")])

    def test_truncated_reply_asked_again_over_tcp(self):
        """A reply with TC=1 is asked for again over TCP, whose answer counts."""
        self.responder.truncate.add("example.net")
        self.assertEqual(self.resolver.query("example.net", "MX"), [(20, "mx2.example.net"), (10, "mx1.example.net")])
        self.assertEqual(self.responder.tcp_queries, [("example.net", "MX")])

    def test_large_answer_over_tcp(self):
        """An answer too long for 512 octets arrives whole over TCP."""
        self.assertEqual(self.resolver.query("big.test", "A"), ZONE[("big.test", "A")])
        self.assertEqual(self.responder.tcp_queries, [("big.test", "A")])

    def test_cname_followed(self):
        """A CNAME chain in the answer is followed to the records of the type asked."""
        self.assertEqual(self.resolver.query("alias.test", "A"), ["127.0.0.6"])
        self.assertEqual(self.responder.queries, [("alias.test", "A")])

    def test_cname_not_finished_is_asked_again(self):
        """A CNAME whose target's records the server left out is asked for at the target."""
        self.responder.unchased.add("www.example.net")
        self.assertEqual(self.resolver.query("www.example.net", "A"), ["127.0.0.6"])
        self.assertEqual(self.responder.queries, [("www.example.net", "A"), ("host.example.net", "A")])

    def test_cname_loop(self):
        """A CNAME loop is a DNSError, not a hang."""
        with support.DNSResponder({("a.test", "CNAME"): ["b.test"], ("b.test", "CNAME"): ["a.test"]},
                                  unchased=("a.test", "b.test")) as looping:
            resolver = dns.Resolver([looping.address], timeout=1, attempts=1)
            self.assertFails(True, dns.DNS_CNAME_CHAIN, resolver.query, "a.test", "A")

    def test_reply_with_another_id_ignored(self):
        """A reply with another id is ignored: the real answer after it counts."""
        self.responder.wrong_id.add("example.net")
        self.assertEqual(len(self.resolver.query("example.net", "MX")), 2)

    def test_reply_from_another_port_ignored(self):
        """A reply with the right id from another port is ignored: the real answer after it counts."""
        self.responder.spoof.add("example.net")
        self.assertEqual(len(self.resolver.query("example.net", "MX")), 2)

    def test_names_normalized(self):
        """Names are asked in lower case without the trailing dot."""
        self.resolver.query("MX1.Example.NET.", "A")
        self.assertEqual(self.responder.queries, [("mx1.example.net", "A")])

    def test_bad_names_refused(self):
        """Empty labels, labels over 63 octets and control characters fail permanently, unasked.

        Other characters are asked for (RFC 2181 11; SPF's names may hold
        them): host names are checked by the callers (mail_exchangers).
        """
        for name in ("", ".", "a..test", ".a.test", "x" * 64 + ".test", "a\tb.test", "a\0b.test", "a.test..",
                     "\u00e9" * 70):
            self.assertFails(False, dns.DNS_BAD_NAME, self.resolver.query, name, "A")
        self.assertFails(False, dns.DNS_BAD_NAME, dns.mail_exchangers, self.resolver, "a b.test")
        self.assertEqual(self.responder.queries, [])

    def test_threads_share_a_resolver(self):
        """Concurrent queries on one resolver each get their own answer."""
        names = ["mx1.example.net", "mx2.example.net", "a.equal.test", "b.equal.test", "plain.test"] * 4
        results = {}

        def ask(index, name):
            results[index] = self.resolver.query(name, "A")

        threads = [threading.Thread(target=ask, args=item) for item in enumerate(names)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        self.assertEqual([results.get(i) for i in range(len(names))], [ZONE[(name, "A")] for name in names])

    def test_txt_strings_of_one_record_joined(self):
        """A TXT record's strings come as one text (RFC 7208 3.3); each record is one item."""
        self.assertEqual(self.resolver.query("example.net", "TXT"), ["v=spf1 -all", "v=DKIM1; k=rsa; p=ABC"])

    def test_long_txt_record(self):
        """A text of 602 octets, published as three strings, comes back whole (over TCP, as it is long)."""
        self.assertEqual(self.resolver.query("long.example.net", "TXT"), ["p=" + "A" * 600])

    def test_txt_edge_cases(self):
        """An empty string is an empty text; a non-ASCII octet survives as Latin-1; CNAMEs are followed."""
        self.assertEqual(self.resolver.query("empty.test", "TXT"), [""])
        self.assertEqual(self.resolver.query("latin.test", "TXT"), ["caf\xe9"])
        self.assertEqual(self.resolver.query("txt.alias.test", "TXT")[0], "v=spf1 -all")
        self.assertEqual(self.resolver.query("mx1.example.net", "TXT"), [])

    def test_ptr(self):
        """PTR records of an IPv4 and an IPv6 address, by the names reverse_name gives (RFC 1035 3.5, RFC 3596 2.5)."""
        self.assertEqual(dns.reverse_name("127.0.0.1"), "1.0.0.127.in-addr.arpa")
        self.assertEqual(self.resolver.query(dns.reverse_name("127.0.0.1"), "PTR"), ["mx1.example.net"])
        self.assertEqual(self.resolver.query(dns.reverse_name("::1"), "PTR"), ["mx1.example.net"])
        self.assertFails(False, dns.DNS_NO_SUCH_DOMAIN, self.resolver.query, dns.reverse_name("127.0.0.9"), "PTR")

    @unittest.skipUnless(socket.has_ipv6, "no IPv6")
    def test_ipv6_server(self):
        """A server on an IPv6 address is asked over IPv6."""
        try:
            responder = support.DNSResponder(ZONE, host="::1")
        except OSError:
            self.skipTest("no ::1")
        with responder:
            resolver = dns.Resolver([responder.address], timeout=1, attempts=1)
            self.assertEqual(resolver.query("mx1.example.net", "A"), ["127.0.0.1"])


def query_of(reply_maker):
    """A raw[name] function: the query's id and question, then what reply_maker adds after them."""
    def reply(query):
        qid = struct.unpack_from("!H", query)[0]
        return reply_maker(qid, support.dns_test_read_question(query)[4])
    return reply


class MalformedReplyTest(ResponderTestCase):
    """Replies that break RFC 1035 give a temporary DNSError, never another exception or a hang."""

    def malformed(self, reply_maker):
        """Asking for bad.test, answered by reply_maker, fails temporarily as malformed."""
        self.responder.raw["bad.test"] = query_of(reply_maker)
        self.assertFails(True, "^malformed", self.resolver.query, "bad.test", "A")

    def test_compression_loop(self):
        """A name whose pointer leads back into itself is an error."""
        # the answer's owner, right after the question: label "a", then a pointer back to that label
        self.malformed(lambda qid, question: struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question
                       + b"\x01a" + struct.pack("!H", 0xC000 | 12 + len(question))
                       + struct.pack("!HHIH", 1, 1, 0, 4) + b"\x7f\0\0\1")

    def test_pointer_to_itself(self):
        """A pointer to its own position is an error."""
        self.malformed(lambda qid, question: struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question
                       + struct.pack("!H", 0xC000 | 12 + len(question))
                       + struct.pack("!HHIH", 1, 1, 0, 4) + b"\x7f\0\0\1")

    def test_pointer_past_the_end(self):
        """A pointer beyond the message is an error."""
        self.malformed(lambda qid, question: struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question
                       + b"\xc3\xff" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\x7f\0\0\1")

    def test_cut_short(self):
        """A reply whose answer count promises more than it holds is an error."""
        self.malformed(lambda qid, question: struct.pack("!HHHHHH", qid, 0x8180, 1, 2, 0, 0) + question
                       + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\x7f\0\0\1")

    def test_bad_address_length(self):
        """An A record of 3 octets is an error."""
        self.malformed(lambda qid, question: struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question
                       + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 3) + b"\x7f\0\0")

    def test_txt_string_cut_short(self):
        """A TXT string whose length runs past its record is an error."""
        self.responder.raw["bad.test"] = query_of(
            lambda qid, question: struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question
            + b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, 0, 4) + b"\x05abc")
        self.assertFails(True, "^malformed", self.resolver.query, "bad.test", "TXT")

    def test_header_only(self):
        """A reply of a few octets is an error."""
        self.malformed(lambda qid, question: struct.pack("!HH", qid, 0x8180))

    def test_random_damage_gives_only_dns_errors(self):
        """Any truncation or byte change of a good reply parses or raises DNSError, nothing else."""
        question = support.dns_test_read_question(dns._dns_build_query(7, "example.net", 15))
        good = self.responder.reply(question)
        rng = random.Random(5321)
        damaged = [good[:cut] for cut in range(len(good))]
        for _ in range(2000):
            message = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                message[rng.randrange(len(message))] = rng.randrange(256)
            damaged.append(bytes(message))
        for message in damaged:
            try:
                dns._dns_parse_reply(message, 7, "example.net", 15)
            except dns.DNSError:
                pass


class ResolvConfTest(unittest.TestCase):
    """The resolver's servers come from the nameserver lines of resolv.conf, as resolv.conf(5) says."""

    def resolver_from(self, text):
        """The resolver made from a resolv.conf holding text."""
        with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as conf:
            conf.write(text)
        self.addCleanup(os.unlink, conf.name)
        return dns.Resolver(dns._dns_read_resolv_conf(conf.name), timeout=1)

    def test_nameservers(self):
        """IPv4 and IPv6 nameserver lines become servers on port 53; other lines and bad addresses do not."""
        resolver = self.resolver_from("# local\nsearch example.net\nnameserver 192.0.2.53\n"
                                      "nameserver   2001:db8::53  \nnameserver not-an-ip\n; nameserver 192.0.2.9\n")
        self.assertEqual(resolver.servers, [("192.0.2.53", 53), ("2001:db8::53", 53)])
        self.assertEqual(resolver.timeout, 1)

    def test_only_three_servers(self):
        """Only the first three nameservers count (MAXNS)."""
        resolver = self.resolver_from("".join("nameserver 192.0.2.%d\n" % i for i in range(1, 6)))
        self.assertEqual(resolver.servers, [("192.0.2.1", 53), ("192.0.2.2", 53), ("192.0.2.3", 53)])

    def test_no_nameserver(self):
        """A resolv.conf without nameserver lines means the local server."""
        self.assertEqual(self.resolver_from("search example.net\n").servers, [("127.0.0.1", 53)])

    def test_missing_file(self):
        """A missing resolv.conf means the local server."""
        missing = os.path.join(tempfile.gettempdir(), "no-such-dir-%d" % os.getpid(), "resolv.conf")
        self.assertEqual(dns.Resolver(dns._dns_read_resolv_conf(missing)).servers, [("127.0.0.1", 53)])


if __name__ == "__main__":
    unittest.main()
