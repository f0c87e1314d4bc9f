"""The queue by hand, delay notices and bounce subjects (CONTRACT.md section 11, issue 24).

Each test starts its own server on a fresh root with --local-domains
example.org and a scripted remote (support.RemoteSMTPServer) reached as
<user@[127.0.0.1]> with --mx-port, so no test needs DNS.
"""

import email
import email.header
import email.policy
import os
import re
import time
import unittest

import support
from support import wait_for

SUBJECT = b"Subject: %s\r\n\r\nhello\r\n"
QUEUED = re.compile(r"queued as ([0-9A-F]{21})$")


def parsed(stored):
    """A stored message (LF lines, dot-stuffed) as an email message."""
    lines = [line[1:] if line.startswith(b".") else line for line in stored.split(b"\n")]
    return email.message_from_bytes(b"\n".join(lines), policy=email.policy.compat32)


class ByHandCase(support.QueueRootTestCase):
    """A fresh root, a remote, and servers started by each test, with long retries."""

    def setUp(self):
        super().setUp()
        self.args += ("--domain", "mx.example.org", "--retry-base", "300", "--relay-timeout", "2")

    def submit(self, server, recipients=("carol@[127.0.0.1]",), subject=b"by hand", sender="alice@example.org"):
        """Send one message; its queue id."""
        with support.smtp_session(server) as client:
            reply = support.send_message(client, SUBJECT % subject, sender, recipients)
        found = QUEUED.search(reply[1][-1])
        support.expect(found, "not queued: %r" % reply[1])
        return found.group(1)

    def path(self, queued, suffix=""):
        return os.path.join(support.queue_folder(self.root), queued + suffix)

    def left(self):
        """What is in the queue folder but the servers' own dot-files: messages, .held and .delete files."""
        return [name for name in os.listdir(support.queue_folder(self.root)) if not name.startswith(".")]

    def envelope(self, queued):
        """The envelope of a queue file (b"" once it is gone)."""
        try:
            with open(self.path(queued), "rb") as f:
                return f.read().partition(b"\n\n")[0]
        except FileNotFoundError:
            return b""

    def got(self, subject):
        """The messages the remote took whose data holds subject."""
        return [m for m in self.remote.messages if subject in m["data"]]

    def reports(self, login="alice"):
        """The delivery reports in a user's mailbox, parsed."""
        return [parsed(m) for m in support.stored_messages(self.root, login) if b"multipart/report" in m]


class QueueByHandTest(ByHandCase):
    """--delete, --hold, --release: at once on a message at rest, after the attempt on one being sent."""

    def deferred(self, server, subject):
        """A message whose first try got 451 (next try in 300 s); its id."""
        self.remote.rcpt["carol@[127.0.0.1]"] = "451 4.3.0 later"
        queued = self.submit(server, subject=subject)
        server.wait_for_output(r"%s: to=<carol@\[127\.0\.0\.1\]> .* status=deferred" % queued)
        wait_for(lambda: b"\nrcpt\tpending\t1\t" in self.envelope(queued))
        del self.remote.rcpt["carol@[127.0.0.1]"]
        return queued

    def test_delete_a_message_at_rest(self):
        server = self.start()
        queued = self.deferred(server, b"to delete")
        self.assertEqual(support.run_queue_command(self.root, "--delete", queued), (0, "%s: deleted\n" % queued))
        self.assertFalse(os.path.exists(self.path(queued)))
        self.assertEqual(self.left(), [])
        support.run_queue_command(self.root, "--flush")
        server.wait_for_output("flush requested")
        self.assertEqual(self.got(b"to delete"), [])

    def test_hold_then_release_on_a_running_server(self):
        """Held: --queue marks it "!", a flush skips it (logged); released: tried within a second, sent."""
        server = self.start()
        queued = self.deferred(server, b"to hold")
        code, out = support.run_queue_command(self.root, "--hold", queued)
        self.assertEqual((code, out), (0, "%s: held: not tried until --release\n" % queued))
        code, listing = support.run_queue_command(self.root, "--queue")
        self.assertRegex(listing, r"(?m)^%s! +\d+ " % queued)
        support.run_queue_command(self.root, "--flush")
        server.wait_for_output("%s: held by --hold: not tried" % queued)
        self.assertEqual(self.got(b"to hold"), [])
        code, out = support.run_queue_command(self.root, "--release", queued)
        self.assertEqual(code, 0, out)
        started = time.monotonic()
        server.wait_for_output("%s: released by --release: trying it now" % queued)
        wait_for(lambda: self.got(b"to hold"))
        # FLUSH_POLL (1 s) and the sending, with room for a loaded machine; not the next scan (60 s) or try (300 s)
        self.assertLess(time.monotonic() - started, 4)
        wait_for(lambda: not os.path.exists(self.path(queued)))
        self.assertEqual(support.run_queue_command(self.root, "--queue"), (0, "Mail queue is empty\n"))

    def test_hold_and_delete_while_a_delivery_runs_take_effect_after_it(self):
        """The remote hangs on the data: --hold says so, and the message is not tried again;
        --delete then waits for the attempt, and the runner deletes it once the attempt is over."""
        self.remote.data = ["hang", "250 2.0.0 Ok"]
        server = self.start()
        queued = self.submit(server, subject=b"in flight")
        self.assertTrue(self.remote.hung.wait(support.DEADLINE))
        code, out = support.run_queue_command(self.root, "--hold", queued)
        self.assertEqual((code, out), (0, "%s: being sent now: held once this attempt is over\n" % queued))
        code, out = support.run_queue_command(self.root, "--delete", queued)
        self.assertEqual((code, out), (0, "%s: being sent now: deleted once this attempt is over\n" % queued))
        self.assertTrue(os.path.exists(self.path(queued)))      # not while the runner holds it
        self.remote.release.set()          # the hanging connection is closed: deferred
        server.wait_for_output("%s: deleted by --delete, after the attempt under way" % queued)
        self.assertEqual(self.left(), [])
        self.assertEqual(self.got(b"in flight"), [])

    def test_an_unknown_id_is_an_error(self):
        self.start()
        for args in (("--delete", "0" * 21), ("--hold", "0" * 21), ("--release", "../../etc/passwd"),
                     ("--delete", "")):
            code, out = support.run_queue_command(self.root, *args)
            self.assertEqual(code, 1, args)
            self.assertRegex(out, r"^cannot (delete|hold|release): .* is not in the queue", args)

    def test_release_of_a_message_not_held_is_an_error(self):
        server = self.start()
        queued = self.deferred(server, b"not held")
        self.assertEqual(support.run_queue_command(self.root, "--release", queued),
                         (1, "cannot release: %s is not held\n" % queued))

    def test_two_servers_on_one_root_obey_a_hold_and_one_sends_after_the_release(self):
        """Servers in two processes share the root; the message is neither's to try while held; sent once."""
        first = self.start()
        second = self.start()
        queued = self.deferred(first, b"shared hold")
        support.run_queue_command(self.root, "--hold", queued)
        support.run_queue_command(self.root, "--flush")
        for server in (first, second):
            server.wait_for_output("%s: held by --hold: not tried" % queued)
        support.run_queue_command(self.root, "--release", queued)
        wait_for(lambda: not os.path.exists(self.path(queued)))
        self.assertEqual(len(self.got(b"shared hold")), 1)

    def test_help_lists_the_commands(self):
        code, out = support.run_queue_command(self.root, "--help")
        for command in ("--delete ID", "--hold ID", "--release ID", "--queue", "--flush"):
            self.assertIn("python3 mailserver_smtp.py %s" % command, out)


class DelayNoticeTest(ByHandCase):
    """--delay-warning: one notice, at its time, for the recipients still waiting; none for <>, none once sent."""

    def test_one_notice_at_the_time_then_none(self):
        """A 451 every time: after 1 s alice hears once (Action: delayed, Will-Retry-Until), never again."""
        self.remote.rcpt["slow@[127.0.0.1]"] = "451 4.2.1 try later"
        server = self.start("--delay-warning", "1", "--retry-base", "0.3", "--queue-lifetime", "3600")
        queued = self.submit(server, ("slow@[127.0.0.1]", "quick@[127.0.0.1]"), b"late one")
        notice = wait_for(self.reports)[0]
        self.assertEqual(notice["Subject"], "Delayed Mail (still being retried): late one")
        self.assertEqual(notice["From"], "Mail Delivery System <MAILER-DAEMON@mx.example.org>")
        readable, status, headers = notice.get_payload()
        fields = status.as_string()
        self.assertIn("Final-Recipient: rfc822; slow@[127.0.0.1]\nAction: delayed\nStatus: 4.2.1\n"
                      "Will-Retry-Until: ", fields)
        self.assertNotIn("quick@", fields)                  # sent already: not waiting
        self.assertIn("tried again until", readable.get_payload())
        self.assertIn("Subject: late one", headers.get_payload())
        server.wait_for_output("%s: delay notice delivered to alice" % queued)
        for attempt in (3, 4):                              # more tries, no more notices
            server.wait_for_output(r"%s: to=<slow@\[127\.0\.0\.1\]> .* status=deferred" % queued)
            wait_for(lambda: b"\nrcpt\tpending\t%d\t" % attempt in self.envelope(queued))
        self.assertEqual(len(self.reports()), 1)
        self.assertIn(b"\nwarned\t1\n", self.envelope(queued))

    def test_no_notice_when_delivery_succeeds_first(self):
        server = self.start("--delay-warning", "2")
        queued = self.submit(server, subject=b"on time")
        server.wait_for_output("%s: removed" % queued)
        self.assertEqual(self.reports(), [])
        self.assertNotIn("delay notice", server.output())

    def test_no_notice_for_the_null_sender_nor_with_0(self):
        self.remote.rcpt["slow@[127.0.0.1]"] = "451 4.2.1 try later"
        server = self.start("--delay-warning", "0.5", "--retry-base", "0.3")
        bounce = self.submit(server, ("slow@[127.0.0.1]",), b"from nobody", sender="")
        for attempt in (1, 2, 3):
            server.wait_for_output(r"%s: to=<slow@\[127\.0\.0\.1\]> .* status=deferred" % bounce)
            wait_for(lambda: b"\nrcpt\tpending\t%d\t" % attempt in self.envelope(bounce))
        self.assertNotIn("delay notice", server.output())
        self.assertNotIn(b"warned", self.envelope(bounce))

    def test_off_with_0(self):
        self.remote.rcpt["slow@[127.0.0.1]"] = "451 4.2.1 try later"
        server = self.start("--delay-warning", "0", "--retry-base", "0.3")
        queued = self.submit(server, ("slow@[127.0.0.1]",), b"never warned")
        for attempt in (1, 2, 3):
            wait_for(lambda: b"\nrcpt\tpending\t%d\t" % attempt in self.envelope(queued))
        self.assertEqual(self.reports(), [])


class BounceSubjectTest(ByHandCase):
    """A bounce's Subject names the original one: decoded, one line, shortened safely."""

    def bounce_subject(self, subject):
        self.remote.rcpt["gone@[127.0.0.1]"] = "550 5.1.1 no such user"
        server = self.start()
        self.submit(server, ("gone@[127.0.0.1]",), subject)
        bounce = wait_for(self.reports)[0]
        return str(email.header.make_header(email.header.decode_header(bounce["Subject"])))

    def test_plain_subject(self):
        self.assertEqual(self.bounce_subject(b"Lunch on Friday"),
                         "Undelivered Mail Returned to Sender: Lunch on Friday")

    def test_encoded_folded_long_subject(self):
        """An RFC 2047 subject, folded, 300 characters: decoded, unfolded, cut to 100 with '...'."""
        word = email.header.Header("\u00e9t\u00e9 " * 75, "utf-8").encode(linesep="\r\n")
        got = self.bounce_subject(word.encode("ascii"))
        self.assertEqual(got, "Undelivered Mail Returned to Sender: " + ("\u00e9t\u00e9 " * 25).strip()[:97].rstrip()
                         + "...")

    def test_a_subject_with_control_characters_and_bad_encoding_is_tamed(self):
        got = self.bounce_subject(b"=?bogus-charset?Q?x?= tab\there \x01bell =?utf-8?q?caf=C3=A9?=")
        self.assertEqual(got, "Undelivered Mail Returned to Sender: x tab here bell caf\u00e9")


if __name__ == "__main__":
    unittest.main()
