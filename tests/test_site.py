"""A whole site in one process (CONTRACT.md section 8): listeners, the site file, one set of relay
settings per root, the outgoing identity, trace fields and the log lines a person and fail2ban read."""

import base64
import email.parser
import email.utils
import email.policy
import os
import re
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from support import DEADLINE, TLS_ARGS, TLS_CERT, TLS_KEY, client_tls_context  # noqa: E402

LISTENER_LINE = re.compile(r"listening on (\S+) port (\d+) \((\w+)\)")
PASSWORD = support.DEFAULT_USERS["alice"]


def listener_ports(server, count):
    """{mode: [port, ...]} of the first count listeners a server has logged."""
    support.wait_for(lambda: len(LISTENER_LINE.findall(server.output())) >= count)
    ports = {}
    for _, port, mode in LISTENER_LINE.findall(server.output())[:count]:
        ports.setdefault(mode, []).append(int(port))
    return ports


def plain(login, password):
    """An AUTH PLAIN initial response (RFC 4616)."""
    return base64.b64encode(("\0%s\0%s" % (login, password)).encode()).decode()


def run_script(script, *args, cwd=None):
    """Run a server script that is expected to exit at once; the CompletedProcess (text)."""
    return subprocess.run([sys.executable, script] + list(args), capture_output=True, text=True,
                          timeout=DEADLINE, cwd=cwd, stdin=subprocess.DEVNULL)


class SMTPListenersTest(unittest.TestCase):
    """Two listeners of each SMTP mode in one process, each with the TLS and AUTH rules of its mode."""

    @classmethod
    def setUpClass(cls):
        cls.root = support.make_mail_root()
        listen = []
        for mode in ("smtp", "submission", "submission", "smtps", "smtps"):
            listen += ["--listen", "127.0.0.1:0/" + mode]
        cls.server = support.ServerProcess(support.SMTP_SCRIPT, cls.root, "--domain", "mx.example.org",
                                           "--local-domains", "example.org", *TLS_ARGS, *listen)
        cls.ports = listener_ports(cls.server, 6)

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        support.remove_mail_root(cls.root)

    def connect(self, port, implicit=False):
        client = support.LineClient("127.0.0.1", port)
        self.addCleanup(client.close)
        if implicit:
            client.wrap_tls()
        self.assertEqual(client.reply()[0], 220)
        return client

    def test_each_mode_has_two_listeners(self):
        self.assertEqual({mode: len(ports) for mode, ports in self.ports.items()},
                         {"smtp": 2, "submission": 2, "smtps": 2})
        self.assertEqual(self.ports["smtp"][0], self.server.port)     # the positional PORT is the first

    def test_smtp_mode_takes_mail_without_auth_and_offers_starttls(self):
        for port in self.ports["smtp"]:
            with self.subTest(port=port):
                client = self.connect(port)
                lines = client.cmd_expecting("EHLO client.test", 250)[1]
                self.assertIn("250-STARTTLS", lines)
                client.cmd_expecting("MAIL FROM:<carol@else.test>", 250)
                client.cmd_expecting("RCPT TO:<alice@example.org>", 250)
                client.cmd_expecting("QUIT", 221)

    def test_submission_mode_needs_starttls_then_auth(self):
        for port in self.ports["submission"]:
            with self.subTest(port=port):
                client = self.connect(port)
                lines = client.cmd_expecting("EHLO client.test", 250)[1]
                self.assertIn("250-STARTTLS", lines)
                self.assertFalse([line for line in lines if "AUTH" in line], lines)
                self.assertEqual(client.cmd("MAIL FROM:<alice@example.org>")[1],
                                 ["530 5.7.0 Must issue a STARTTLS command first"])
                self.assertEqual(client.cmd("AUTH PLAIN " + plain("alice", PASSWORD))[0], 538)
                client.cmd_expecting("STARTTLS", 220)
                client.wrap_tls()
                lines = client.cmd_expecting("EHLO client.test", 250)[1]
                self.assertIn("250-AUTH PLAIN LOGIN CRAM-MD5", lines)
                self.assertEqual(client.cmd("MAIL FROM:<alice@example.org>")[1],
                                 ["530 5.7.0 Authentication required"])
                client.cmd_expecting("AUTH PLAIN " + plain("alice", PASSWORD), 235)
                client.cmd_expecting("MAIL FROM:<alice@example.org>", 250)
                client.cmd_expecting("RCPT TO:<bob@example.org>", 250)
                client.cmd_expecting("QUIT", 221)

    def test_smtps_mode_is_tls_from_the_first_byte_and_needs_auth(self):
        for port in self.ports["smtps"]:
            with self.subTest(port=port):
                client = self.connect(port, implicit=True)
                lines = client.cmd_expecting("EHLO client.test", 250)[1]
                self.assertNotIn("250-STARTTLS", lines)
                self.assertIn("250-AUTH PLAIN LOGIN CRAM-MD5", lines)
                self.assertEqual(client.cmd("MAIL FROM:<alice@example.org>")[1],
                                 ["530 5.7.0 Authentication required"])
                client.cmd_expecting("AUTH PLAIN " + plain("alice", PASSWORD), 235)
                client.cmd_expecting("MAIL FROM:<alice@example.org>", 250)
                client.cmd_expecting("QUIT", 221)

    def test_smtplib_submits_on_both_submission_modes(self):
        message = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: listeners\r\n\r\nhi\r\n"
        with smtplib.SMTP("127.0.0.1", self.ports["submission"][1], timeout=DEADLINE) as smtp:
            smtp.starttls(context=client_tls_context())
            smtp.login("alice", PASSWORD)
            smtp.sendmail("alice@example.org", ["bob@example.org"], message)
        with smtplib.SMTP_SSL("127.0.0.1", self.ports["smtps"][1], timeout=DEADLINE,
                              context=client_tls_context()) as smtp:
            smtp.login("alice", PASSWORD)
            smtp.sendmail("alice@example.org", ["bob@example.org"], message)
        support.wait_for(lambda: len(support.stored_messages(self.root, "bob")) >= 2)

    def test_one_queue_runner_for_all_listeners(self):
        self.assertEqual(len(re.findall(r"queue: \d+ runners started", self.server.output())), 1)

    def test_limits_count_across_listeners(self):
        """--max-per-client counts the connections of one client on every listener together."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        server = support.ServerProcess(support.SMTP_SCRIPT, root, "--max-per-client", "2",
                                       "--domain", "mx.example.org", "--listen", "127.0.0.1:0")
        self.addCleanup(server.close)
        first, second = listener_ports(server, 2)["smtp"]
        self.connect(first), self.connect(second)
        refused = support.LineClient("127.0.0.1", first)
        self.addCleanup(refused.close)
        self.assertEqual(refused.line(), "421 4.7.0 mx.example.org Too many connections from your address")


class POP3ListenersTest(unittest.TestCase):
    """Two listeners of each POP3 mode in one process: STLS on pop3, TLS from the first byte on pop3s."""

    @classmethod
    def setUpClass(cls):
        cls.root = support.make_mail_root()
        cls.server = support.ServerProcess(support.POP_SCRIPT, cls.root, *TLS_ARGS, "--listen", "127.0.0.1:0",
                                           "--listen", "127.0.0.1:0/pop3s", "--listen", "127.0.0.1:0/POP3S")
        cls.ports = listener_ports(cls.server, 4)

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        support.remove_mail_root(cls.root)

    def test_pop3_listeners_offer_stls(self):
        self.assertEqual(len(self.ports["pop3"]), 2)
        for port in self.ports["pop3"]:
            with self.subTest(port=port), support.LineClient("127.0.0.1", port) as client:
                self.assertTrue(client.line().startswith("+OK POP3 server is ready"))
                client.send(b"CAPA\r\n")
                lines = iter(client.line, ".")
                self.assertIn("STLS", list(lines))
                client.send(b"STLS\r\n")
                self.assertTrue(client.line().startswith("+OK"))
                client.wrap_tls()
                client.send(b"USER alice\r\n")
                self.assertTrue(client.line().startswith("+OK"))
                client.send(("PASS %s\r\n" % PASSWORD).encode())
                self.assertTrue(client.line().startswith("+OK"))

    def test_pop3s_listeners_are_tls_from_the_first_byte(self):
        self.assertEqual(len(self.ports["pop3s"]), 2)
        for port in self.ports["pop3s"]:
            with self.subTest(port=port), support.LineClient("127.0.0.1", port) as client:
                client.wrap_tls()
                self.assertTrue(client.line().startswith("+OK POP3 server is ready"))
                client.send(b"CAPA\r\n")
                self.assertNotIn("STLS", list(iter(client.line, ".")))
                client.send(b"USER alice\r\n")
                self.assertTrue(client.line().startswith("+OK"))
                client.send(("PASS %s\r\n" % PASSWORD).encode())
                self.assertTrue(client.line().startswith("+OK"))


class ListenerErrorsTest(unittest.TestCase):
    """A listener that cannot be opened, or a bad --listen, stops the server before it serves anything."""

    def test_a_listener_that_cannot_bind_is_named_and_nothing_starts(self):
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        for script, mode in ((support.SMTP_SCRIPT, "submission"), (support.POP_SCRIPT, "pop3s")):
            with self.subTest(script=os.path.basename(script)):
                result = run_script(script, "0", "--host", "127.0.0.1", "--root", root, *TLS_ARGS,
                                    "--listen", "127.0.0.1:0", "--listen", "127.0.0.1:%d/%s" % (port, mode))
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertIn("cannot listen on 127.0.0.1 port %d (%s)" % (port, mode), result.stderr)
                self.assertNotIn("listening on", result.stderr)      # no half-started server
                self.assertNotIn("Traceback", result.stderr)

    def test_bad_listen_options_exit_2(self):
        cases = [(support.SMTP_SCRIPT, ("--listen", "25/pop3")), (support.SMTP_SCRIPT, ("--listen", "x:y")),
                 (support.SMTP_SCRIPT, ("--listen", "[::1:25")), (support.SMTP_SCRIPT, ("--listen", "70000")),
                 (support.SMTP_SCRIPT, ("--listen", "0/submission")), (support.SMTP_SCRIPT, ()),
                 (support.POP_SCRIPT, ("--listen", "0/pop3s")), (support.POP_SCRIPT, ("--listen", "0/smtp"))]
        for script, args in cases:
            with self.subTest(script=os.path.basename(script), args=args):
                result = run_script(script, *args)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertNotIn("Traceback", result.stderr)

    @unittest.skipUnless(support.has_ipv6_loopback(), "no IPv6 loopback")
    def test_an_ipv6_listener_is_written_in_brackets(self):
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        server = support.ServerProcess(support.SMTP_SCRIPT, root, "--listen", "[::1]:0/smtp")
        self.addCleanup(server.close)
        support.wait_for(lambda: re.search(r"listening on ::1 port (\d+) \(smtp\)", server.output()))
        port = int(re.search(r"listening on ::1 port (\d+)", server.output()).group(1))
        with support.LineClient("::1", port) as client:
            self.assertEqual(client.reply()[0], 220)


if __name__ == "__main__":
    unittest.main()


FAIL2BAN_HOST = r"(?:::f{4,6}:)?(?P<host>\S+)"     # what fail2ban's <HOST> stands for (its filter.d/common)


def readme_failregex():
    """The fail2ban failregex the README gives."""
    with open(os.path.join(support.REPO, "README.md"), encoding="utf-8") as f:
        found = re.search(r"^    failregex = (.+)$", f.read(), re.M)
    return found.group(1)


class TraceAndLogTest(unittest.TestCase):
    """With --local-domains a stored copy starts with Return-Path: and our RFC 5321 Received:; the log
    names each delivery's client, id, Message-ID, size and TLS, and failed logins in one form."""

    @classmethod
    def setUpClass(cls):
        cls.root = support.make_mail_root()
        cls.server = support.ServerProcess(support.SMTP_SCRIPT, cls.root, "--domain", "mx.example.org",
                                           "--local-domains", "example.org", *TLS_ARGS)

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        support.remove_mail_root(cls.root)

    def setUp(self):
        support.remove_mailboxes(self.root)

    def send(self, tls=False, login=False, ehlo=True, sender="carol@else.test"):
        client = support.LineClient("127.0.0.1", self.server.port)
        self.addCleanup(client.close)
        client.reply()
        client.cmd_expecting(("EHLO" if ehlo else "HELO") + " client.test", 250)
        if tls:
            client.cmd_expecting("STARTTLS", 220)
            client.wrap_tls()
            client.cmd_expecting("EHLO client.test", 250)
        if login:
            client.cmd_expecting("AUTH PLAIN " + plain("alice", PASSWORD), 235)
        body = (b"From: %s\r\nTo: alice@example.org, bob@example.org\r\nSubject: trace\r\n"
                b"Message-ID: <trace.1@else.test>\r\n\r\nbody\r\n" % sender.encode())
        client.cmd_expecting("MAIL FROM:<%s>" % sender, 250)
        client.cmd_expecting("RCPT TO:<alice@example.org>", 250)
        client.cmd_expecting("RCPT TO:<bob@example.org>", 250)
        client.cmd_expecting("DATA", 354)
        client.send(body + b".\r\n")
        self.assertEqual(client.reply()[0], 250)
        port = client.sock.getsockname()[1]
        client.cmd("QUIT")
        return port

    def stored(self, login):
        message, = support.stored_messages(self.root, login)
        return email.parser.BytesParser(policy=email.policy.compat32).parsebytes(message)

    def received_parts(self, field):
        """The clauses of our Received: field, checked against RFC 5321 4.4's grammar."""
        unfolded = " ".join(field.split())
        found = re.fullmatch(r"from (\S+) \(\[([^\]]+)\]\) by (\S+) with (\w+) id ([0-9A-F]{21}) "
                             r"for <([^>]+)>; (.+)", unfolded)
        self.assertIsNotNone(found, unfolded)
        return found.groups()

    def test_trace_fields_of_each_copy(self):
        self.send()
        for login in ("alice", "bob"):
            with self.subTest(login=login):
                message = self.stored(login)
                names = [name.lower() for name in message.keys()]
                self.assertEqual(names[:2], ["return-path", "received"])
                self.assertEqual(message["Return-Path"], "<carol@else.test>")
                helo, ip, by, protocol, our_id, recipient, date = self.received_parts(message.get_all("Received")[0])
                self.assertEqual((helo, ip, by, protocol, recipient),
                                 ("client.test", "127.0.0.1", "mx.example.org", "ESMTP", "%s@example.org" % login))
                when = email.utils.parsedate_to_datetime(date)
                self.assertIsNotNone(when.tzinfo)
                self.assertLess(abs(time.time() - when.timestamp()), 120)
                # the course line stays right after Subject:, and the client lists the message by it
                self.assertEqual(names[names.index("subject") + 1], "received")
                course = message.get_all("Received")[1]
                self.assertRegex(course, r"^\d{4}-\d\d-\d\d : \d\d : \d\d$")
                stored, = support.stored_messages(self.root, login)
                listed = support.mail_client.summarize(1, stored.decode().splitlines())
                self.assertEqual((listed.sender, listed.received, listed.subject), ("carol@else.test", course, "trace"))

    def test_with_names_how_the_message_came(self):
        cases = [(dict(ehlo=False), "SMTP"), (dict(tls=True), "ESMTPS"),
                 (dict(tls=True, login=True, sender="alice@example.org"), "ESMTPSA")]
        for kwargs, protocol in cases:
            with self.subTest(protocol=protocol):
                support.remove_mailboxes(self.root)
                self.send(**kwargs)
                self.assertEqual(self.received_parts(self.stored("bob").get_all("Received")[0])[3], protocol)

    def test_delivery_line_names_client_id_message_id_size_and_tls(self):
        port = self.send(tls=True)
        our_id = self.received_parts(self.stored("alice").get_all("Received")[0])[4]
        line = self.server.wait_for_output(r"%s: delivered .*client=127\.0\.0\.1:%d .*" % (our_id, port)).group(0)
        size = len(support.read_mailbox(self.root, "alice"))
        self.assertIn("delivered %d bytes from <carol@else.test> to alice, bob" % size, line)
        self.assertIn("message-id=<trace.1@else.test>", line)
        self.assertRegex(line, r"tls=TLSv1\.[23]\b")

    def test_fail2ban_regex_of_the_readme_matches_the_failed_login_line_of_both_servers(self):
        failregex = re.compile(readme_failregex().replace("<HOST>", FAIL2BAN_HOST))
        pop = support.ServerProcess(support.POP_SCRIPT, self.root)
        self.addCleanup(pop.close)
        client = support.LineClient("127.0.0.1", self.server.port)
        self.addCleanup(client.close)
        client.reply()
        client.cmd_expecting("EHLO client.test", 250)
        client.cmd("AUTH PLAIN " + plain("alice from 10.9.9.9", "wrong"))
        with support.PopClient(pop) as popclient:
            popclient.cmd("USER alice")
            popclient.cmd("PASS wrong")
        for server in (self.server, pop):
            with self.subTest(server=os.path.basename(server.proc.args[1])):
                line = server.wait_for_output(r"authentication failed.*").string.rstrip("\n")
                date, clock, rest = line.split(" ", 2)        # fail2ban takes the date off first
                self.assertRegex(date + " " + clock, r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}$")
                found = failregex.search(" " + rest)
                self.assertIsNotNone(found, rest)
                self.assertEqual(found.group("host"), "127.0.0.1")
        self.assertIsNone(failregex.search(" smtp INFO 127.0.0.1:1: authentication succeeded for login alice, "
                                           "mechanism PLAIN, from 127.0.0.1"))


class CourseModeTest(unittest.TestCase):
    """Without --local-domains the course dialogue and the stored message are as they always were."""

    def test_course_dialogue_and_mailbox_byte_for_byte(self):
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        server = support.ServerProcess(support.SMTP_SCRIPT, root, "--domain", "kuleuven.be",
                                       "--listen", "127.0.0.1:0/smtp")
        self.addCleanup(server.close)
        for port in listener_ports(server, 2)["smtp"]:
            support.remove_mailboxes(root)
            with self.subTest(port=port), support.LineClient("127.0.0.1", port) as client:
                dialogue = [client.raw_line()]
                for line in (b"HELO kuleuven.be", b"MAIL_FROM: <cnlab@kuleuven.be>", b"RCPT_TO: <alice@kuleuven.be>",
                             b"RCPT_TO: <nobody@kuleuven.be>", b"DATA",
                             b"From: cnlab@kuleuven.be\r\nTo: alice@kuleuven.be\r\nSubject: hi\r\nbody\r\n.",
                             b"QUIT"):
                    client.send(line + b"\r\n")
                    dialogue.append(client.raw_line())
                self.assertEqual(dialogue, [
                    b"220 kuleuven.be Service ready\r\n", b"250 OK Hello kuleuven.be\r\n",
                    b"250 <cnlab@kuleuven.be>... Sender ok\r\n", b"250 alice... Recipient ok\r\n",
                    b"550 No such user\r\n", b'354 Enter mail, end with "." on a line by itself\r\n',
                    b"250 OK Message accepted for delivery\r\n", b"221 kuleuven.be closing connection\r\n"])
                self.assertRegex(support.read_mailbox(root, "alice"),
                                 rb"\AFrom: cnlab@kuleuven.be\nTo: alice@kuleuven.be\nSubject: hi\n"
                                 rb"Received: \d{4}-\d\d-\d\d : \d\d : \d\d\nbody\n\.\n\Z")


class SiteFileTest(unittest.TestCase):
    """--site FILE: one INI file for both servers; the command line wins; every error names file and line."""

    def setUp(self):
        self.root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, self.root)

    def site(self, text, name="site.ini"):
        path = os.path.join(self.root, name)
        with open(path, "w") as f:
            f.write(text % {"root": self.root, "cert": TLS_CERT, "key": TLS_KEY})
        return path

    def refused(self, script, path, pattern):
        result = run_script(script, "--site", path)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertRegex(result.stderr.splitlines()[-1], pattern)
        self.assertNotIn("Traceback", result.stderr)

    def test_every_kind_of_error_names_the_file_and_line(self):
        cases = [
            ("[mail]\nroot = %(root)s\n[smtp]\nlisten = 0\nrelay-hots = x.test\n", "line 5: unknown key 'relay-hots'"),
            ("[mail]\nroot = %(root)s\nport = 25\n", "line 3: unknown key 'port'"),
            ("[mail]\nsite = other.ini\n", "line 2: unknown key 'site'"),
            ("[mail]\n\n[smtp]\nmax-size = big\n", "line 4: bad value 'big' for max-size"),
            ("[mail]\nverbose = maybe\n", "line 2: bad value 'maybe' for verbose: yes or no"),
            ("[smtp]\nlisten = 0/smtp 0/pop3s\n", "line 2: bad value .* for listen"),
            ("[mail]\nproxy-from = 10.0.0.0/33\n", "line 2: bad value .* for proxy-from"),
            ("[mail]\nroot = %(root)s\n[smtp]\n[mail]\n", "line 4: section \\[mail\\] given twice"),
            ("[mail]\nroot = %(root)s\nroot = /\n", "line 3: key 'root' given twice in \\[mail\\]"),
            ("root = %(root)s\n", "line 1: a key before the first \\[section\\]"),
            ("[mail]\nroot\n", "line 2: not a 'key = value' line"),
            ("[mail]\n# a comment\n\n[imap]\n", "line 4: unknown section \\[imap\\]"),
        ]
        for text, message in cases:
            with self.subTest(text=text):
                path = self.site(text)
                self.refused(support.SMTP_SCRIPT, path, "site file %s %s" % (re.escape(path), message))

    def test_pop3_checks_its_own_sections_and_leaves_smtp_keys_of_mail_to_smtp(self):
        path = self.site("[mail]\nroot = %(root)s\nlocal-domains = example.org\n[pop3]\nlisten = 0/pop3\nquota = 5\n")
        self.refused(support.POP_SCRIPT, path, "site file %s line 6: unknown key 'quota'" % re.escape(path))

    def test_a_missing_file_a_symlink_a_folder_and_a_fifo_are_refused(self):
        good = self.site("[mail]\nroot = %(root)s\n")
        link = os.path.join(self.root, "link.ini")
        os.symlink(good, link)
        for script in (support.SMTP_SCRIPT, support.POP_SCRIPT):
            with self.subTest(script=os.path.basename(script)):
                missing = os.path.join(self.root, "missing.ini")
                self.refused(script, missing, "cannot read the site file %s" % re.escape(missing))
                self.refused(script, link, "site file %s is a symlink" % re.escape(link))
                self.refused(script, self.root, "site file %s is not a regular file" % re.escape(self.root))
                fifo = os.path.join(self.root, "fifo.ini")
                if not os.path.exists(fifo) and hasattr(os, "mkfifo"):
                    os.mkfifo(fifo)
                if os.path.exists(fifo):                    # refused unopened: its open would wait for a writer
                    self.refused(script, fifo, "site file %s is not a regular file" % re.escape(fifo))

    @unittest.skipIf(hasattr(os, "geteuid") and os.geteuid() == 0, "root reads any file")
    def test_an_unreadable_file_is_refused(self):
        path = self.site("[mail]\nroot = %(root)s\n")
        os.chmod(path, 0)
        self.refused(support.SMTP_SCRIPT, path, "cannot read the site file %s: .*Permission denied" % re.escape(path))

    def test_a_whole_site_from_one_file_and_the_command_line_wins(self):
        path = self.site("# the whole site\n[mail]\nroot = %(root)s\ndomain = site.example.org\ntls-cert = %(cert)s\n"
                         "tls-key = %(key)s\n\n[smtp]\nlisten = 127.0.0.1:0/smtp\n  127.0.0.1:0/submission"
                         " 127.0.0.1:0/smtps\nlocal-domains = example.org\nmax-size = 5000\n\n"
                         "[pop3]\nlisten = 127.0.0.1:0/pop3 127.0.0.1:0/pop3s\n")
        smtp = support.StartedServer(support.SMTP_SCRIPT, self.root, "--site", path, "--max-size", "7000")
        self.addCleanup(smtp.close)
        pop = support.StartedServer(support.POP_SCRIPT, self.root, "--site", path)
        self.addCleanup(pop.close)
        ports = listener_ports(smtp, 4)
        self.assertEqual({mode: len(p) for mode, p in ports.items()}, {"smtp": 2, "submission": 1, "smtps": 1})
        self.assertEqual({mode: len(p) for mode, p in listener_ports(pop, 3).items()}, {"pop3": 2, "pop3s": 1})
        with support.LineClient("127.0.0.1", ports["submission"][0]) as client:
            self.assertEqual(client.line(), "220 site.example.org Service ready")
            lines = client.cmd_expecting("EHLO client.test", 250)[1]
            self.assertIn("250-SIZE 7000", lines)               # the command line wins over the file
            self.assertEqual(client.cmd("RCPT TO:<x@else.test>")[0], 503)
        with support.LineClient("127.0.0.1", ports["smtp"][1]) as client:
            client.reply()
            client.cmd_expecting("EHLO client.test", 250)
            client.cmd_expecting("MAIL FROM:<x@else.test>", 250)
            self.assertEqual(client.cmd("RCPT TO:<x@else.test>")[0], 250)   # loopback relays: local-domains is set
        smtp.close()                  # (a server with another --domain may not share the root with it)
        moved = support.StartedServer(support.SMTP_SCRIPT, self.root, "--site", path, "--listen", "127.0.0.1:0",
                                      "--domain", "cmd.example.org")
        self.addCleanup(moved.close)
        self.assertEqual(listener_ports(moved, 2), {"smtp": [moved.port, listener_ports(moved, 2)["smtp"][1]]})
        self.assertEqual(len(LISTENER_LINE.findall(moved.output())), 2)       # the file's listen is replaced
        with support.LineClient("127.0.0.1", moved.port) as client:
            self.assertEqual(client.line(), "220 cmd.example.org Service ready")


class RelaySettingsTest(unittest.TestCase):
    """Every server of one root uses the same relay settings: a second one that differs does not start."""

    def setUp(self):
        self.root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, self.root)

    def start(self, *args):
        return support.ServerProcess(support.SMTP_SCRIPT, self.root, "--local-domains", "example.org",
                                     "--domain", "mx.example.org", "--mx-port", "2525", *args)

    def run_second(self, *args):
        return run_script(support.SMTP_SCRIPT, "0", "--host", "127.0.0.1", "--root", self.root, "--local-domains",
                          "example.org", "--domain", "mx.example.org", "--mx-port", "2525", *args)

    def test_a_second_server_with_other_relay_settings_refuses_to_start(self):
        first = self.start()
        self.addCleanup(first.close)
        for args, setting in [(("--mx-port", "25"), "--mx-port is '2525' there, '25' here"),
                              (("--domain", "other.example.org"), "--domain is 'mx.example.org' there"),
                              (("--retry-base", "60"), "--retry-base is '300' there, '60' here"),
                              (("--source-address", "127.0.0.1"), "--source-address is 'None' there")]:
            with self.subTest(args=args):
                result = self.run_second(*args)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertIn("relay settings differ from those of a running server", result.stderr)
                self.assertIn(setting, result.stderr)
                self.assertNotIn("listening on", result.stderr)
        same = self.start("--relay-concurrency", "2", "--max-size", "1000", "--retry-base", "300.0")
        self.addCleanup(same.close)
        self.assertTrue(same.alive())

    def test_the_settings_of_a_stopped_or_killed_server_go_with_it(self):
        for stop in ("terminate", "kill"):
            with self.subTest(stop=stop):
                first = self.start()
                getattr(first, stop)()
                first.close()
                other = self.start("--mx-port", "25")
                other.close()
        settings = [n for n in os.listdir(os.path.join(self.root, ".run")) if n.endswith(".settings")]
        self.assertLessEqual(len(settings), 1)


class SourceAddressTest(unittest.TestCase):
    """--source-address: outgoing connections come from it, and EHLO says --domain."""

    def test_the_remote_sees_the_source_address_and_our_domain(self):
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        remote = support.RemoteSMTPServer()
        self.addCleanup(remote.close)
        server = support.ServerProcess(support.SMTP_SCRIPT, root, "--local-domains", "example.org",
                                       "--domain", "mx.example.org", "--mx-port", str(remote.port),
                                       "--source-address", "127.0.0.3", "--retry-base", "0.3")
        self.addCleanup(server.close)
        with support.smtp_session(server, ehlo=True) as client:
            code, lines = support.send_message(client, b"Subject: out\r\n\r\nhi\r\n", "alice@example.org",
                                               ("carl@[127.0.0.1]",))
            self.assertEqual(code, 250, lines)
        support.wait_for(lambda: remote.messages)
        self.assertEqual(remote.peers, ["127.0.0.3"])
        self.assertIn("ehlo mx.example.org", [line.lower() for line in remote.received])

    def test_an_address_not_of_this_machine_is_refused_at_start(self):
        for address in ("192.0.2.1", "not-an-address"):
            with self.subTest(address=address):
                result = run_script(support.SMTP_SCRIPT, "0", "--local-domains", "example.org",
                                    "--source-address", address)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertIn("--source-address %s is not an address of this machine" % address, result.stderr)
