"""Tests of TLS across the programs: mail_client.py's STARTTLS/STLS against the real servers."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from test_client import ALICE, SENT, closed_port, mail, run_client  # noqa: E402

TLS_CERT = os.path.join(support.REPO, "tests", "tls", "test-only-cert.pem")
TLS_KEY = os.path.join(support.REPO, "tests", "tls", "test-only-key.pem")
TLS_ARGS = ("--tls-cert", TLS_CERT, "--tls-key", TLS_KEY)


class ClientSMTPTLSTest(unittest.TestCase):
    """The client sends through STARTTLS when asked to use TLS, and refuses plain text under --tls."""

    @classmethod
    def setUpClass(cls):
        cls.root = support.make_mail_root()
        # --require-tls: a mail that arrives at all arrived encrypted.
        cls.tls_server = support.ServerProcess(support.SMTP_SCRIPT, cls.root, *TLS_ARGS, "--require-tls")
        cls.plain_server = support.ServerProcess(support.SMTP_SCRIPT, cls.root)

    @classmethod
    def tearDownClass(cls):
        cls.tls_server.close()
        cls.plain_server.close()
        support.remove_mail_root(cls.root)

    def send(self, server, subject, *options):
        return run_client(ALICE + mail(subject=subject) + "c\n", server.port, closed_port(),
                          "127.0.0.1", *options)

    def test_cafile_makes_the_client_use_starttls(self):
        result = self.send(self.tls_server, "over tls", "--cafile", TLS_CERT)
        self.assertIn(SENT, result.lines, result.stdout)
        self.assertIn(b"Subject: over tls\n", support.read_mailbox(self.root, "bob"))

    def test_tls_with_cafile_works_too(self):
        result = self.send(self.tls_server, "required tls", "--tls", "--cafile", TLS_CERT)
        self.assertIn(SENT, result.lines, result.stdout)

    def test_an_untrusted_certificate_stops_the_mail(self):
        result = self.send(self.tls_server, "untrusted", "--tls")
        self.assertNotIn(SENT, result.lines)
        self.assertIn("certificate", result.stdout.lower())
        self.assertEqual(result.returncode, 0)
        self.assertNotIn(b"untrusted", support.read_mailbox(self.root, "bob"))

    def test_insecure_skips_the_check_and_says_so(self):
        result = self.send(self.tls_server, "insecure", "--insecure")
        self.assertIn(SENT, result.lines, result.stdout)
        self.assertIn("Warning: --insecure", result.stdout)

    def test_tls_refuses_a_server_without_starttls(self):
        result = self.send(self.plain_server, "plain refused", "--tls", "--cafile", TLS_CERT)
        self.assertNotIn(SENT, result.lines)
        self.assertIn("does not offer STARTTLS", result.stdout)
        self.assertNotIn(b"plain refused", support.read_mailbox(self.root, "bob"))

    def test_without_tls_options_a_plain_server_is_used_as_before(self):
        result = self.send(self.plain_server, "plain ok", "--cafile", TLS_CERT)
        self.assertIn(SENT, result.lines, result.stdout)
        result = self.send(self.plain_server, "plain default")
        self.assertIn(SENT, result.lines, result.stdout)

    def test_a_bad_cafile_is_a_command_line_error(self):
        result = run_client("", 1, 1, "127.0.0.1", "--cafile", "/nonexistent/ca.pem")
        self.assertEqual(result.returncode, 2)
        self.assertIn("--cafile", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


if __name__ == "__main__":
    unittest.main()
