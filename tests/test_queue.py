"""Mail for other domains (CONTRACT.md section 7, issue 16): who may relay, the queue, delivery, retries, bounces.

The remote servers are scripted stand-ins (support.RemoteSMTPServer) on
loopback; mail reaches them as <user@[127.0.0.1]> with --mx-port, or through
--relay-host, so no test needs DNS (the MX tests are in the DNS part below).
"""

import base64
import email
import email.policy
import os
import re
import subprocess
import sys
import tempfile
import unittest

import support
from support import SMTP_SCRIPT, read_mailbox, wait_for

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


def run_queue_command(root, *args):
    """Run mailserver_smtp.py --queue / --flush on a root; return (exit code, stdout)."""
    proc = subprocess.run([sys.executable, SMTP_SCRIPT] + list(args) + ["--root", root],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=support.DEADLINE)
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


class QueueCase(support.OneServerTestCase):
    """A server with --local-domains example.org whose other domains are scripted remotes on one port.

    [127.0.0.1] is a remote with every extension; [127.0.0.2] one without
    SMTPUTF8.  Retries are quick (--retry-base 0.3) and the lifetime short.
    """

    lifetime = "4"
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

    def test_what_goes_out_has_our_trace_first_and_is_unstuffed(self):
        """The remote gets Received: (from, by, with ESMTP, id, date) first and the body as sent."""
        queued = queue_id(self.submit(("carol@[127.0.0.1]",), b"Subject: trace\r\n\r\n..dot\r\nend\r\n"))
        data = self.received_by(self.remote, queued)["data"]
        self.assertRegex(data.decode(), r"^Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n\tby mx\.example\.org "
                                        r"with ESMTP id %s;\r\n\t\w{3}, \d\d \w{3} \d{4} " % queued)
        self.assertTrue(data.endswith(b"Subject: trace\r\n\r\n..dot\r\nend\r\n"))   # '..' is stuffing on the wire

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

    def test_no_bounce_for_the_null_sender(self):
        """Mail from <> that fails is logged as bounced and dropped: no bounce anywhere."""
        self.remote.rcpt["void@[127.0.0.1]"] = "550 5.1.1 nobody"
        queued = queue_id(self.submit(("void@[127.0.0.1]",), sender=""))
        self.outcome(queued, "void@[127.0.0.1]", "bounced")
        self.server.wait_for_output("%s: removed" % queued)
        self.assertNotIn("%s: bounce" % queued, self.server.output())

    def test_bounce_after_the_lifetime(self):
        """A recipient deferred until --queue-lifetime (4 s) runs out bounces with Status 4.4.7."""
        self.remote.rcpt["never@[127.0.0.1]"] = "450 4.2.1 mailbox unavailable"
        queued = queue_id(self.submit(("never@[127.0.0.1]",), SUBJECT % b"patience"))
        bounce = wait_for(lambda: [b for b in self.bounces() if queued in b.as_string()], timeout=15)[0]
        status = bounce.get_payload()[1].as_string()
        self.assertIn("Status: 4.4.7", status)
        self.assertIn("Diagnostic-Code: smtp; 450 4.2.1 mailbox unavailable (delivery time expired)", status)

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
        code, listing = run_queue_command(self.root, "--queue")
        self.assertEqual(code, 0, listing)
        self.assertRegex(listing, r"(?m)^%s +\d+ \w{3} .{20} +alice@example\.org$" % queued)
        self.assertRegex(listing, r"\(451 4\.4\.1 conversation with \[127\.0\.0\.3\]\[127\.0\.0\.3\]:\d+ failed: "
                                  r"[^;]*timed out; next try \d{4}-\d\d-\d\d [\d:]{8}\)\n +stuck@\[127\.0\.0\.3\]\n")

    def test_flush_retries_at_once(self):
        """A 4xx'd recipient waits 300 s; --flush makes the server send it now."""
        self.remote.rcpt["flushed@[127.0.0.1]"] = "421 4.3.2 not now"
        queued = queue_id(self.submit(("flushed@[127.0.0.1]",)))
        self.outcome(queued, "flushed@[127.0.0.1]", "deferred")
        del self.remote.rcpt["flushed@[127.0.0.1]"]
        code, out = run_queue_command(self.root, "--flush")
        self.assertEqual(code, 0, out)
        self.received_by(self.remote, queued)

    def test_queue_on_an_empty_queue(self):
        """--queue on a root whose queue holds nothing says so."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        os.mkdir(support.queue_folder(root))
        self.assertEqual(run_queue_command(root, "--queue"), (0, "Mail queue is empty\n"))


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
            wait_for(lambda: "%s: to=<carol@[127.0.0.1]>" % queued in first.output() + second.output())
        run_queue_command(self.root, "--flush")
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


if __name__ == "__main__":
    unittest.main()
