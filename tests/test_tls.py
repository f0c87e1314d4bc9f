"""Tests of TLS across the programs: mail_client.py's STARTTLS/STLS against the real servers."""

import os
import poplib
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from support import (ALICE, SENT, TLS_ARGS, TLS_CERT, client_tls_context, closed_port, mail,  # noqa: E402
                     run_client)

import pop_server  # noqa: E402


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
        """Send a mail with the client through server, with the client options given."""
        return run_client(ALICE + mail(subject=subject) + "c\n", server.port, closed_port(),
                          "127.0.0.1", *options)

    def test_cafile_makes_the_client_use_starttls(self):
        """With --cafile the client sends through STARTTLS, to a server that takes mail only inside TLS."""
        result = self.send(self.tls_server, "over tls", "--cafile", TLS_CERT)
        self.assertIn(SENT, result.lines, result.stdout)
        self.assertIn(b"Subject: over tls\n", support.read_mailbox(self.root, "bob"))

    def test_tls_with_cafile_works_too(self):
        """--tls with --cafile sends through STARTTLS."""
        result = self.send(self.tls_server, "required tls", "--tls", "--cafile", TLS_CERT)
        self.assertIn(SENT, result.lines, result.stdout)

    def test_an_untrusted_certificate_stops_the_mail(self):
        """An untrusted certificate under --tls stops the mail with an error naming the certificate."""
        result = self.send(self.tls_server, "untrusted", "--tls")
        self.assertNotIn(SENT, result.lines)
        self.assertIn("certificate", result.stdout.lower())
        self.assertEqual(result.returncode, 0)
        self.assertNotIn(b"untrusted", support.read_mailbox(self.root, "bob"))
        # One line that says what to do (issue 20), not OpenSSL's bare CERTIFICATE_VERIFY_FAILED.
        self.assertRegex(result.stdout, r"\nError: TLS with the SMTP server 127.0.0.1 port %d failed: its "
                                        r"certificate could not be verified \([^)\n]+\); if it is "
                                        r"self-signed or from a private CA, give it with --cafile FILE "
                                        r"\(the server's certificate or its CA\)\n" % self.tls_server.port)

    def test_a_certificate_for_another_name_says_so(self):
        """A certificate that names another host: the error says so, and --cafile is not the cure offered."""
        server = support.ServerProcess(support.SMTP_SCRIPT, self.root, *TLS_ARGS, host="127.0.0.2")
        self.addCleanup(server.close)
        result = run_client(ALICE + mail(subject="wrong name") + "c\n", server.port, closed_port(),
                            "127.0.0.2", "--tls", "--cafile", TLS_CERT)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn(SENT, result.lines)
        self.assertRegex(result.stdout, r"Error: TLS with the SMTP server 127.0.0.2 port \d+ failed: its "
                                        r"certificate does not name '127.0.0.2' \(.+\); connect by a name "
                                        r"the certificate names\n")

    def test_insecure_skips_the_check_and_says_so(self):
        """--insecure sends through TLS without checking the certificate, and warns that it does."""
        result = self.send(self.tls_server, "insecure", "--insecure")
        self.assertIn(SENT, result.lines, result.stdout)
        self.assertIn("Warning: --insecure", result.stdout)

    def test_tls_refuses_a_server_without_starttls(self):
        """--tls refuses to send to a server that does not offer STARTTLS."""
        result = self.send(self.plain_server, "plain refused", "--tls", "--cafile", TLS_CERT)
        self.assertNotIn(SENT, result.lines)
        self.assertIn("does not offer STARTTLS", result.stdout)
        self.assertNotIn(b"plain refused", support.read_mailbox(self.root, "bob"))

    def test_without_tls_options_a_plain_server_is_used_as_before(self):
        """Without --tls a plain server is used as before, also when --cafile is given."""
        result = self.send(self.plain_server, "plain ok", "--cafile", TLS_CERT)
        self.assertIn(SENT, result.lines, result.stdout)
        result = self.send(self.plain_server, "plain default")
        self.assertIn(SENT, result.lines, result.stdout)

    def test_a_bad_cafile_is_a_command_line_error(self):
        """A --cafile that cannot be read exits with 2 and a message naming the option, no traceback."""
        result = run_client("", 1, 1, "127.0.0.1", "--cafile", "/nonexistent/ca.pem")
        self.assertEqual(result.returncode, 2)
        self.assertIn("--cafile", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class POP3STLSTest(unittest.TestCase):
    """STLS (RFC 2595) in pop_server.py, with and without --require-tls."""

    @classmethod
    def setUpClass(cls):
        cls.root = support.make_mail_root()
        with open(support.mailbox_path(cls.root, "alice"), "wb") as f:
            f.write(b"From: bob@example.org\nTo: alice@example.org\nSubject: Secret\n"
                    b"Received: 2026-11-28 : 10 : 00\nThe password is swordfish\n.\n")
        cls.server = support.ServerProcess(support.POP_SCRIPT, cls.root, *TLS_ARGS)
        cls.strict = support.ServerProcess(support.POP_SCRIPT, cls.root, *TLS_ARGS, "--require-tls")

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        cls.strict.close()
        support.remove_mail_root(cls.root)

    def poplib_session(self, server):
        """A poplib connection to server, closed after the test."""
        pop = poplib.POP3("127.0.0.1", server.port, timeout=support.DEADLINE)
        self.addCleanup(pop.close)
        return pop

    def test_poplib_stls_then_login(self):
        """poplib's STLS works; CAPA no longer offers STLS inside TLS, and mail is read through it."""
        pop = self.poplib_session(self.server)
        self.assertIn(b"STLS", [c.encode() for c in pop.capa()])
        self.assertTrue(pop.stls(context=client_tls_context()).startswith(b"+OK"))
        self.assertNotIn("STLS", pop.capa(), "not offered again inside TLS")
        pop.user("alice")
        pop.pass_("wonderland")
        self.assertIn(b"The password is swordfish", pop.retr(1)[1])
        pop.quit()

    def test_commands_pipelined_behind_stls_are_never_executed(self):
        """Commands sent behind STLS before the handshake are thrown away, never executed."""
        client = self.server.connect()
        self.addCleanup(client.close)
        self.assertTrue(client.line().startswith("+OK"))
        client.send("STLS\r\nUSER alice\r\n")
        self.assertTrue(client.line().startswith("+OK"))
        client.wrap_tls()
        client.send("PASS wonderland\r\n")
        self.assertTrue(client.line().startswith("-ERR"), "the USER sent before the handshake was dropped")
        client.send("STAT\r\n")
        self.assertTrue(client.line().startswith("-ERR"))

    def test_garbage_instead_of_a_handshake_ends_only_that_connection(self):
        """Junk instead of a TLS handshake closes that connection only; plain logins still work."""
        client = self.server.connect()
        self.addCleanup(client.close)
        client.line()
        client.send("STLS\r\n")
        self.assertTrue(client.line().startswith("+OK"))
        client.send(b"USER alice\r\nPASS wonderland\r\n" * 10)
        self.assertTrue(client.closed())
        pop = self.poplib_session(self.server)
        pop.user("alice")
        self.assertTrue(pop.pass_("wonderland").startswith(b"+OK"), "plain logins still work")
        pop.quit()

    def test_require_tls_refuses_user_and_pass_before_stls(self):
        """Under --require-tls, USER and PASS are neither offered nor taken before STLS."""
        pop = self.poplib_session(self.strict)
        capabilities = pop.capa()
        self.assertNotIn("USER", capabilities)
        self.assertIn("STLS", capabilities)
        with self.assertRaises(poplib.error_proto):
            pop.user("alice")
        with self.assertRaises(poplib.error_proto):
            pop.pass_("wonderland")
        pop.stls(context=client_tls_context())
        self.assertIn("USER", pop.capa())
        pop.user("alice")
        self.assertTrue(pop.pass_("wonderland").startswith(b"+OK"))
        pop.quit()

    def test_stls_is_refused_after_login_and_with_an_argument(self):
        """STLS gets -ERR with an argument and after login."""
        client = self.server.connect()
        self.addCleanup(client.close)
        client.line()
        client.send("STLS now\r\n")
        self.assertTrue(client.line().startswith("-ERR"))
        client.send("USER alice\r\nPASS wonderland\r\nSTLS\r\nQUIT\r\n")
        self.assertEqual([client.line()[:3] for _ in range(4)], ["+OK", "+OK", "-ER", "+OK"])

    def test_the_client_manages_mail_over_stls(self):
        """The client reads mail over STLS from a server that requires TLS."""
        result = run_client(ALICE + "b\nRETR 1\nQUIT\n", closed_port(), self.strict.port,
                            "127.0.0.1", "--tls", "--cafile", TLS_CERT)
        self.assertIn("The password is swordfish", result.stdout, result.stdout)
        self.assertEqual(result.returncode, 0)


class PlainPOP3Test(unittest.TestCase):
    """Without a certificate there is no STLS, and --tls in the client refuses the server."""

    def test_no_stls_and_the_client_refuses_under_tls(self):
        """A server without a certificate offers no STLS, and the client under --tls refuses it."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        server = support.ServerProcess(support.POP_SCRIPT, root)
        self.addCleanup(server.close)
        pop = poplib.POP3("127.0.0.1", server.port, timeout=support.DEADLINE)
        self.addCleanup(pop.close)
        self.assertNotIn("STLS", pop.capa())
        with self.assertRaises(poplib.error_proto):
            pop._shortcmd("STLS")
        result = run_client(ALICE + "b\n", closed_port(), server.port, "127.0.0.1", "--tls",
                            "--cafile", TLS_CERT)
        self.assertIn("does not offer STLS", result.stdout)
        self.assertNotIn(pop_server.Replies.GREETING % "<", result.stdout)


if __name__ == "__main__":
    unittest.main()
