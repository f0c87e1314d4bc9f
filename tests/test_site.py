"""A whole site in one process (CONTRACT.md section 8): listeners, the site file, one set of relay
settings per root, the outgoing identity, trace fields and the log lines a person and fail2ban read."""

import base64
import email.parser
import email.policy
import os
import re
import smtplib
import socket
import subprocess
import sys
import tempfile
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
