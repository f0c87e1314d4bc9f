"""Tests of mail_client.py: the real client as a subprocess, fed through pipes, against the servers."""

import os
import re
import signal
import socket
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from support import (ALICE, ALICE_MAILBOX, BOB, LISTED_DATE, SENT, ClientTestCase, FakeServer,  # noqa: E402
                     FakeSMTPServer, NoTopPOP3Server, StandardSMTPServer, client_command, closed_port,
                     mail, run_client)

import mail_client  # noqa: E402
import pop_server  # noqa: E402

INCORRECT = mail_client.INCORRECT_FORMAT


# --------------------------------------------------------------------------
# Small scripted servers, for what the real ones cannot show
# --------------------------------------------------------------------------

class VanishingPOP3Server(NoTopPOP3Server):
    """Hangs up on the second RETR (the first one reads the headers for the listing)."""

    retrieved = 0

    def send(self, conn, *lines):
        """Send as usual, but hang up instead of sending the second message."""
        if lines[:1] == ("+OK message follows",):
            self.retrieved += 1
            if self.retrieved == 2:
                conn.shutdown(socket.SHUT_RDWR)
                raise OSError("hung up")
        super().send(conn, *lines)


class FailingOnceSMTPServer(FakeSMTPServer):
    """Hangs up at once on its first connection ("hang up"), or refuses the first RCPT_TO with
    451 ("refuse"); serves as the course server afterwards."""

    def __init__(self, first):
        self.first = first
        self.sessions = 0
        super().__init__()

    def session(self, conn, rfile):
        """The first session fails as told; the later ones are the contract's dialogue."""
        self.sessions += 1
        if self.sessions == 1 and self.first == "hang up":
            return
        super().session(conn, rfile)

    def send(self, conn, *lines):
        """Send as usual, but the first recipient ever gets 451."""
        if self.first == "refuse" and lines == self.REPLIES["RCPT_TO:"]:
            self.first, lines = None, ("451 Try again later",)
        super().send(conn, *lines)


class PasswordChangedPOP3Server(NoTopPOP3Server):
    """Takes any password in its first session (the check at start), later ones only "new"."""

    sessions = 0
    last = None

    def session(self, conn, rfile):
        self.sessions += 1
        self.last = None
        super().session(conn, rfile)

    def readline(self, rfile):
        self.last = super().readline(rfile)
        return self.last

    def send(self, conn, *lines):
        """Send as usual, but answer a PASS other than "new" in a later session with -ERR."""
        if self.sessions > 1 and (self.last or "").startswith("PASS ") and self.last != "PASS new":
            lines = ("-ERR [AUTH] wrong password",)
        super().send(conn, *lines)


# --------------------------------------------------------------------------
# Mail Sending
# --------------------------------------------------------------------------

class SendingTests(support.OneServerTestCase, ClientTestCase):
    """Mail Sending against the real SMTP server."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.smtp = cls.server
        cls.no_pop = closed_port()

    def send(self, text):
        """Log in, type text at the menu, then exit; return the Result."""
        return run_client(ALICE + text + "c\n", self.smtp.port, self.no_pop)

    def test_good_mail_is_delivered_in_the_stored_format(self):
        """A good mail prints the contract's success line and is stored in the section 1 form."""
        result = self.send(mail(subject="Good mail", body=["first line", "second line"]))
        self.assertClean(result)
        self.assertIn(SENT, result.lines)
        self.assertNoError(result)
        stored = support.read_mailbox(self.root, "bob").decode("utf-8")
        self.assertRegex(stored, r"From: alice@example.org\nTo: bob@example.org\nSubject: Good mail\n"
                                 r"Received: \d{4}-\d{2}-\d{2} : \d{2} : \d{2}\n"
                                 r"first line\nsecond line\n\.\n")

    def test_several_recipients_each_get_a_copy(self):
        """A To: line with several addresses gives each recipient a copy."""
        result = self.send(mail(to="alice@example.org, bob@example.org", subject="For you both"))
        self.assertClean(result)
        self.assertIn(SENT, result.lines)
        for login in ("alice", "bob"):
            self.assertIn(b"Subject: For you both\n", support.read_mailbox(self.root, login))

    def test_display_names_stay_in_the_header_and_the_addresses_go_in_the_envelope(self):
        """From/To with Name <address> (a quoted name with a comma too) are sent; the header keeps the names."""
        result = self.send(mail(sender="Alice Liddell <alice@example.org>",
                                to='Bob <bob@example.org>, "Liddell, Alice" <alice@example.org>',
                                subject="Named"))
        self.assertClean(result)
        self.assertNoError(result)
        self.assertIn(SENT, result.lines)
        for login in ("alice", "bob"):     # each address got its copy: the envelope held both
            self.assertRegex(support.read_mailbox(self.root, login).decode("utf-8"),
                             r'From: Alice Liddell <alice@example.org>\n'
                             r'To: Bob <bob@example.org>, "Liddell, Alice" <alice@example.org>\n'
                             r'Subject: Named\nReceived: ')

    def test_refused_mail_is_kept_and_can_be_left(self):
        """After a refusal the mail is offered again; "n" brings back the menu, and nothing was stored."""
        result = self.send(mail(to="nobody@example.org", subject="Kept") + "n\n")
        self.assertClean(result)
        self.assertEqual(result.stdout.count(mail_client.SEND_AGAIN_PROMPT), 1)
        self.assertIn(mail_client.GOODBYE, result.lines)
        self.assertNotIn(SENT, result.stdout)

    def test_unknown_recipient_is_an_error_not_a_success(self):
        """A recipient the server refuses is printed as an error with the server's 550, not as a success."""
        result = self.send(mail(to="nobody@example.org", subject="Lost"))
        self.assertClean(result)
        self.assertNotIn(SENT, result.stdout)
        self.assertRegex(result.stdout, r"Error: .*nobody@example.org.*550 No such user")

    def test_one_unknown_recipient_stops_the_whole_mail(self):
        """One refused recipient stops the whole mail: no other recipient gets it."""
        result = self.send(mail(to="bob@example.org, nobody@example.org", subject="Half lost"))
        self.assertNotIn(SENT, result.stdout)
        self.assertIn("550", result.stdout)
        self.assertNotIn(b"Half lost", support.read_mailbox(self.root, "bob"))

    def test_body_lines_starting_with_a_dot_are_dot_stuffed(self):
        """Body lines starting with '.' are dot-stuffed on the wire, so the server stores them intact."""
        result = self.send(mail(subject="Dots", body=["..", ".hidden", "end"]))
        self.assertIn(SENT, result.lines)
        stored = support.read_mailbox(self.root, "bob").decode("utf-8")
        # Sent as "..." and ".." and stored stuffed again: the server saw ".." and ".hidden".
        self.assertIn("Subject: Dots\n", stored)
        self.assertRegex(stored, r"\n\.\.\.\n\.\.hidden\nend\n\.\n")

    def test_subject_of_150_characters_is_fine(self):
        """A subject of exactly 150 characters is sent and stored whole."""
        subject = "s" * 150
        result = self.send(mail(subject=subject))
        self.assertIn(SENT, result.lines)
        self.assertIn(("Subject: %s\n" % subject).encode(), support.read_mailbox(self.root, "bob"))

    def test_body_line_of_998_characters_is_delivered(self):
        """A body line of 998 characters, the longest RFC 5321 allows, is sent and stored whole."""
        line = "w" * 998
        result = self.send(mail(subject="Longest line", body=[line]))
        self.assertIn(SENT, result.lines)
        self.assertIn(("\n%s\n.\n" % line).encode(), support.read_mailbox(self.root, "bob"))

    def test_utf8_text_arrives_unchanged(self):
        """UTF-8 in the subject and body reaches the mailbox unchanged."""
        result = self.send(mail(subject="Caf\u00e9", body=["Gr\u00fc\u00dfe \u2603"]))
        self.assertIn(SENT, result.lines)
        stored = support.read_mailbox(self.root, "bob")
        self.assertIn("Subject: Caf\u00e9\n".encode("utf-8"), stored)
        self.assertIn("Gr\u00fc\u00dfe \u2603\n".encode("utf-8"), stored)

    def test_menu_takes_numbers_and_words_in_any_case(self):
        """Mail Sending is chosen by "1", "A" or its words in any case; so is Exit."""
        for choice in ("1", "A", "Mail Sending", "SENDING"):
            with self.subTest(choice=choice):
                typed = mail(subject="Chosen by " + choice)[2:]  # drop the "a" choice
                result = run_client(ALICE + choice + "\n" + typed + "EXIT\n",
                                    self.smtp.port, self.no_pop)
                self.assertClean(result)
                self.assertIn(SENT, result.lines)
                self.assertIn(mail_client.GOODBYE, result.lines)

    def test_unknown_menu_choice_repeats_the_menu_with_a_hint(self):
        """An unknown menu choice prints a hint and the menu again."""
        result = run_client(ALICE + "d\n3\n", self.smtp.port, self.no_pop)
        self.assertClean(result)
        self.assertEqual(result.stdout.count("a) Mail Sending"), 2)
        self.assertIn(mail_client.MENU_HINT, result.stdout)


class FormatCheckTests(ClientTestCase):
    """A badly formatted mail is refused before any connection (the SMTP port is closed)."""

    @classmethod
    def setUpClass(cls):
        cls.port = closed_port()

    def refused(self, typed, reason):
        """Type the mail; check it is refused with a reason matching reason and nothing sent; return the Result."""
        result = run_client(ALICE + "a\n" + typed + "c\n", self.port, self.port)
        self.assertClean(result)
        self.assertIn(INCORRECT, result.lines)
        reason_line = result.lines[result.lines.index(INCORRECT) + 1]
        self.assertRegex(reason_line, reason)
        # Nothing was sent: no SMTP connection was tried, and the menu came back.
        self.assertNotIn("cannot connect to the SMTP", result.stdout)
        self.assertNotIn(SENT, result.stdout)
        self.assertEqual(result.stdout.count("a) Mail Sending"), 2)
        return result

    def test_from_line_missing(self):
        """A mail whose line 1 is not From: is refused, naming line 1."""
        self.refused("Sender: alice@example.org\nTo: bob@example.org\nSubject: x\nbody\n.\n",
                     r"line 1 .*From:")

    def test_from_address_invalid(self):
        """A From: that is no address is refused, quoting it."""
        self.refused("From: alice\nTo: bob@example.org\nSubject: x\nbody\n.\n",
                     r"line 1: 'alice' is not a valid sender address")

    def test_from_with_two_addresses(self):
        """A From: with two addresses is refused: one sender only."""
        self.refused("From: alice@example.org, bob@example.org\nTo: bob@example.org\n"
                     "Subject: x\nbody\n.\n", r"line 1: .*one sender")

    def test_to_line_missing(self):
        """A mail whose line 2 is not To: is refused, naming line 2."""
        self.refused("From: alice@example.org\nSubject: x\nbody\n.\n", r"line 2 .*To:")

    def test_to_without_address(self):
        """A To: without an address is refused."""
        self.refused("From: alice@example.org\nTo:\nSubject: x\nbody\n.\n", r"line 2: .*no recipient")

    def test_to_with_one_invalid_address(self):
        """A To: with one invalid address among good ones is refused, quoting it."""
        self.refused("From: alice@example.org\nTo: bob@example.org, bob@@example\nSubject: x\nbody\n.\n",
                     r"line 2: 'bob@@example' is not a valid recipient address")

    def test_to_with_an_empty_list_item(self):
        """A To: list with an empty item is refused."""
        self.refused("From: alice@example.org\nTo: bob@example.org,\nSubject: x\nbody\n.\n",
                     r"line 2: .*empty")

    def test_subject_line_missing(self):
        """A mail whose line 3 is not Subject: is refused, naming line 3."""
        self.refused("From: alice@example.org\nTo: bob@example.org\nbody\n.\n", r"line 3 .*Subject:")

    def test_subject_longer_than_150_characters(self):
        """A subject of 151 characters prints the contract's "This is an incorrect format" and the reason."""
        result = self.refused("From: alice@example.org\nTo: bob@example.org\nSubject: %s\nbody\n.\n"
                              % ("s" * 151), r"line 3: the subject is 151 characters long; at most 150")
        # The contract's words, not mail_client.INCORRECT_FORMAT: changing the constant must fail here.
        self.assertIn("This is an incorrect format", result.lines)

    def test_no_body(self):
        """A mail without a body line is refused."""
        self.refused("From: alice@example.org\nTo: bob@example.org\nSubject: x\n.\n", r"no body")

    def test_nothing_typed(self):
        """A mail that is only the final '.' is refused."""
        self.refused(".\n", r"line 1 is missing")

    def test_every_problem_is_reported_at_once_in_line_order(self):
        """Every problem of a mail is listed at once under the contract's line, each naming its line."""
        result = self.refused("From: alice\nTo: Bob <bob@example.org>, carol@@example.com\nSubject: %s\n%s\n.\n"
                              % ("s" * 151, "b" * 999), r"^  line 1: 'alice' is not a valid sender address")
        start = result.lines.index(INCORRECT) + 1
        self.assertEqual(result.lines[start:start + 5], [
            "  line 1: 'alice' is not a valid sender address (expected user@domain)",
            "  line 2: 'carol@@example.com' is not a valid recipient address (expected user@domain)",
            "  line 3: the subject is 151 characters long; at most 150 are allowed",
            "  line 4 is longer than 998 characters",
            ""])

    def test_malformed_display_names(self):
        """A name with a comma or specials unquoted, an unclosed quote or a '<' without '>' is refused."""
        for to, reason in [
                ("Bob@Home <bob@example.org>", r"line 2: the name 'Bob@Home' holds @: put it in double quotes"),
                ('"Bob <bob@example.org>', r"line 2: the name \"Bob is not a closed quoted name"),
                ("Bob <bob@example.org", r"line 2: 'Bob <bob@example.org' is not an address"),
                ("Bob <bob@example.org> x", r"line 2: 'Bob <bob@example.org> x' is not an address")]:
            with self.subTest(to=to):
                self.refused("From: alice@example.org\nTo: %s\nSubject: x\nbody\n.\n" % to, reason)
        self.refused("From: Liddell, Alice <alice@example.org>\nTo: bob@example.org\nSubject: x\nbody\n.\n",
                     r'line 1: a mail has exactly one sender address \(a name with a comma goes in double quotes')

    def test_body_line_too_long(self):
        """A body line over 998 characters is refused, naming its line."""
        self.refused("From: alice@example.org\nTo: bob@example.org\nSubject: x\n%s\n.\n" % ("b" * 999),
                     r"line 4 is longer than 998")


class FallbackTests(ClientTestCase):
    """The client also works with standard servers that lack the course extras."""

    def test_standard_smtp_server_gets_mail_from_after_500(self):
        """After a 500 to MAIL_FROM: the client greets with EHLO and sends an RFC 5322 message the RFC 5321 way."""
        server = StandardSMTPServer()
        self.addCleanup(server.close)
        result = run_client(ALICE + mail(to="bob@example.org, carol@example.com",
                                         body=["Hello", ".dot"]) + "c\n",
                            server.port, closed_port())
        self.assertClean(result)
        self.assertIn(SENT, result.lines)
        got = server.received
        self.assertEqual(got[1], "MAIL_FROM: <alice@example.org>")
        # Contract 4.7: the first connection is left with QUIT, the mail goes on a new one
        # "with EHLO and the RFC spelling".
        self.assertEqual(got[2], "QUIT")
        self.assertRegex(got[3], r"^EHLO ")
        self.assertEqual(got[4:7], ["MAIL FROM:<alice@example.org>", "RCPT TO:<bob@example.org>",
                                    "RCPT TO:<carol@example.com>"])
        self.assertEqual(got[7:11], ["DATA", "From: alice@example.org",
                                     "To: bob@example.org, carol@example.com", "Subject: Lunch"])
        # A standard server gets an RFC 5322 message: Date and Message-ID, a blank line, the body.
        self.assertRegex(got[11], r"^Date: \w{3}, \d{1,2} \w{3} \d{4} ")
        self.assertRegex(got[12], r"^Message-ID: <.+@example.org>$")
        self.assertEqual(got[13:], ["", "Hello", "..dot", ".", "QUIT"])

    def test_display_names_go_in_the_header_only(self):
        """Name <address>: the course dialogue carries the addresses, DATA the header as typed."""
        server = FakeSMTPServer()
        self.addCleanup(server.close)
        result = run_client(ALICE + mail(sender="Alice Liddell <alice@example.org>",
                                         to='Bob <bob@example.org>, "Carol, C." <carol@example.com>')
                            + "c\n", server.port, closed_port())
        self.assertIn(SENT, result.lines)
        self.assertEqual(server.received[1:8], [
            "MAIL_FROM: <alice@example.org>", "RCPT_TO: <bob@example.org>", "RCPT_TO: <carol@example.com>",
            "DATA", "From: Alice Liddell <alice@example.org>",
            'To: Bob <bob@example.org>, "Carol, C." <carol@example.com>', "Subject: Lunch"])

    def test_standard_smtp_server_gets_names_encoded(self):
        """To a standard server a non-ASCII display name goes RFC 2047-encoded."""
        server = StandardSMTPServer()
        self.addCleanup(server.close)
        result = run_client(ALICE + mail(sender="J\u00fcrgen <alice@example.org>") + "c\n",
                            server.port, closed_port())
        self.assertIn(SENT, result.lines)
        self.assertIn("MAIL FROM:<alice@example.org>", server.received)
        self.assertIn("From: =?utf-8?q?J=C3=BCrgen?= <alice@example.org>", server.received)

    def test_standard_smtp_server_gets_8bit_text_labelled(self):
        """To a standard server 8-bit text goes with BODY=8BITMIME, an encoded subject and a charset."""
        server = StandardSMTPServer()
        self.addCleanup(server.close)
        result = run_client(ALICE + mail(subject="Caf\u00e9", body=["Gr\u00fc\u00dfe"]) + "c\n",
                            server.port, closed_port())
        self.assertIn(SENT, result.lines)
        got = server.received
        self.assertEqual(got[4], "MAIL FROM:<alice@example.org> BODY=8BITMIME")
        self.assertIn("Subject: =?utf-8?b?Q2Fmw6k=?=", got)
        self.assertIn("Content-Type: text/plain; charset=utf-8", got)
        self.assertEqual(got[-4:], ["", "Gr\u00fc\u00dfe", ".", "QUIT"])

    def test_pop3_server_without_top_is_listed_with_retr(self):
        """A POP3 server without TOP is listed through RETR."""
        server = NoTopPOP3Server([
            ["From: Bob Builder <bob@example.org>", "To: alice@example.org", "Subject: No TOP here",
             "Date: Fri, 27 Nov 2026 10:00:00 +0000", "", "Body"],
        ])
        self.addCleanup(server.close)
        result = run_client(ALICE + "b\nQUIT\n", closed_port(), server.port)
        self.assertClean(result)
        self.assertIn(NoTopPOP3Server.GREETING, result.lines)
        self.assertRegex(result.stdout, r"\n\s*1  bob@example.org  %s  No TOP here\n" % LISTED_DATE)
        self.assertIn("TOP 1 0", server.received)
        self.assertIn("RETR 1", server.received)
        self.assertIn(NoTopPOP3Server.GOODBYE, result.lines)

    def test_server_that_hangs_up_gives_one_line_errors(self):
        """A server that hangs up at once gives one error line per server, and the menu goes on."""
        server = FakeServer()
        self.addCleanup(server.close)
        result = run_client(ALICE + mail() + "b\nc\n", server.port, server.port)
        self.assertClean(result)
        errors = [line for line in result.lines if "Error:" in line]
        self.assertEqual(len(errors), 2, result.stdout)
        for line in errors:
            self.assertIn("closed the connection", line)
        self.assertIn(mail_client.GOODBYE, result.lines)


    def test_pop3_server_vanishing_mid_session_returns_to_the_menu(self):
        """A POP3 server that hangs up mid-session gives one error line and the menu again."""
        server = VanishingPOP3Server([["From: bob@example.org", "Subject: Going", "Body"]])
        self.addCleanup(server.close)
        result = run_client(ALICE + "b\nRETR 1\nc\n", closed_port(), server.port)
        self.assertClean(result)
        self.assertIn("Going", result.stdout)
        errors = [line for line in result.lines if "Error:" in line]
        self.assertEqual(errors, ["Error: the server closed the connection (POP3 server 127.0.0.1 port %d)"
                                  % server.port])
        self.assertEqual(result.stdout.count("a) Mail Sending"), 2)
        self.assertIn(mail_client.GOODBYE, result.lines)


class SendAgainTests(ClientTestCase):
    """A mail that could not be sent is kept and offered again."""

    def test_after_a_lost_connection_yes_sends_it_again(self):
        """A server that hung up: the error, "Send it again?", and "y" sends the same mail."""
        server = FailingOnceSMTPServer("hang up")
        self.addCleanup(server.close)
        result = run_client(ALICE + mail(subject="Second try") + "y\nc\n", server.port, closed_port())
        self.assertClean(result)
        self.assertRegex(result.stdout, r"Error: the server closed the connection .*\n%s"
                         % re.escape(mail_client.SEND_AGAIN_PROMPT))
        self.assertIn(SENT, result.lines)
        self.assertEqual(server.sessions, 2)
        self.assertIn("Subject: Second try", server.received)
        self.assertIn(mail_client.GOODBYE, result.lines)

    def test_after_a_refusal_yes_sends_it_again(self):
        """A 451 for the recipient: "y" sends the whole mail again, on a new connection."""
        server = FailingOnceSMTPServer("refuse")
        self.addCleanup(server.close)
        result = run_client(ALICE + mail() + "yes\nc\n", server.port, closed_port())
        self.assertClean(result)
        self.assertRegex(result.stdout, r"Error: the server refused the recipient bob@example.org: 451 ")
        self.assertIn(SENT, result.lines)
        self.assertEqual(support.command_word(server.received[0]), "HELO")
        self.assertEqual(server.received.count("MAIL_FROM: <alice@example.org>"), 2)
        self.assertEqual(server.received.count("Subject: Lunch"), 1)

    def test_another_answer_is_the_next_menu_choice(self):
        """An answer that is neither yes nor no is the menu choice: "b" goes on to Mail Management."""
        pop = NoTopPOP3Server([["From: bob@example.org", "Subject: Waiting", "x"]])
        self.addCleanup(pop.close)
        result = run_client(ALICE + mail() + "b\nQUIT\n", closed_port(), pop.port)
        self.assertClean(result)
        self.assertIn(mail_client.SEND_AGAIN_PROMPT.strip(), result.stdout)
        self.assertIn("Waiting", result.stdout)
        self.assertEqual(result.lines[-1].strip(), NoTopPOP3Server.GOODBYE)

    def test_end_of_input_at_the_offer_ends_cleanly(self):
        """End of input at "Send it again?" ends the client with exit code 0 and no traceback."""
        result = run_client(ALICE + mail(), closed_port(), closed_port())
        self.assertClean(result)
        self.assertTrue(result.stdout.rstrip().endswith(mail_client.SEND_AGAIN_PROMPT.strip()), result.stdout)


class UnreachableTests(ClientTestCase):
    """Servers that cannot be reached, or do not answer, give one-line errors."""

    def test_closed_ports_give_one_line_errors_and_the_menu_goes_on(self):
        """Closed ports give one "cannot connect" line per server, and the menu goes on."""
        port = closed_port()
        result = run_client(ALICE + mail() + "b\nc\n", port, port)
        self.assertClean(result)
        errors = [line for line in result.lines if "Error:" in line]
        self.assertEqual(len(errors), 2, result.stdout)
        self.assertIn("cannot connect to the SMTP server 127.0.0.1 port %d" % port, errors[0])
        self.assertIn("cannot connect to the POP3 server 127.0.0.1 port %d" % port, errors[1])
        self.assertNotIn(SENT, result.stdout)
        self.assertIn(mail_client.GOODBYE, result.lines)

    def test_unreachable_pop3_server_at_start_is_one_warning_line(self):
        """The password cannot be checked at start: one warning line, no second Username:, the menu."""
        port = closed_port()
        result = run_client(ALICE + "c\n", port, port)
        self.assertClean(result)
        self.assertEqual(result.stdout.count(mail_client.USERNAME_PROMPT), 1)
        warnings = [line for line in result.lines if line.startswith("Warning:")]
        self.assertEqual(warnings, ["Warning: the password was not checked (cannot connect to the POP3 "
                                    "server 127.0.0.1 port %d: Connection refused); Mail Sending may "
                                    "still work." % port], result.stdout)
        self.assertLess(result.stdout.index(warnings[0]), result.stdout.index("a) Mail Sending"))
        self.assertNoError(result)

    def test_silent_server_times_out(self):
        """A server that never answers gives a one-line timeout error after --timeout."""
        class Silent(FakeServer):
            """A server that reads everything and never answers."""

            def session(self, conn, rfile):
                while self.readline(rfile) is not None:
                    pass
        server = Silent()
        self.addCleanup(server.close)
        result = run_client(ALICE + mail() + "b\nc\n", server.port, server.port, "127.0.0.1",
                            "--timeout", "0.2")
        self.assertClean(result)
        self.assertIn("Error: the SMTP server 127.0.0.1 port %d did not answer in time" % server.port,
                      result.lines)
        self.assertIn("Error: the POP3 server 127.0.0.1 port %d did not answer in time" % server.port,
                      result.lines)

    @support.skip_unless_ipv6
    def test_ipv6_address(self):
        """The client sends mail to a server at an IPv6 address."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        smtp = support.ServerProcess(support.SMTP_SCRIPT, root, host="::1")
        self.addCleanup(smtp.close)
        result = run_client(ALICE + mail(subject="Over IPv6") + "c\n", smtp.port, closed_port(), "::1")
        self.assertClean(result)
        self.assertIn(SENT, result.lines)
        self.assertIn(b"Subject: Over IPv6\n", support.read_mailbox(root, "bob"))

    def test_unknown_host_name(self):
        """A host name that does not resolve gives a one-line error."""
        result = run_client(ALICE + mail() + "c\n", 2525, 1110, host="no-such-host.invalid")
        self.assertClean(result)
        self.assertRegex(result.stdout, r"Error: cannot connect to the SMTP server no-such-host.invalid")


# --------------------------------------------------------------------------
# Mail Management
# --------------------------------------------------------------------------

class ManagementTests(support.OneServerTestCase, ClientTestCase):
    """Mail Management against the real POP3 server, on a freshly written mailbox each test."""

    script = support.POP_SCRIPT

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.pop = cls.server
        cls.no_smtp = closed_port()

    def setUp(self):
        with open(support.mailbox_path(self.root, "alice"), "w", newline="\n") as f:
            f.write(ALICE_MAILBOX)

    def manage(self, *commands, login=ALICE):
        """Log in, choose Mail Management and type the commands."""
        return run_client(login + "b\n" + "".join(c + "\n" for c in commands),
                          self.no_smtp, self.pop.port)

    def test_login_shows_greeting_and_aligned_listing(self):
        """A login prints the server greeting and one aligned line per message: number, sender, date, subject."""
        result = self.manage("QUIT")
        self.assertClean(result)
        self.assertNoError(result)
        self.assertTrue(any(line.startswith((pop_server.Replies.GREETING % "<")) for line in result.lines),
                        result.stdout)
        rows = [line for line in result.lines if re.match(r"\s*\d+  ", line)]
        self.assertEqual(len(rows), 2, result.stdout)
        self.assertRegex(rows[0], r"^\s*1  bob@example.org    2026-11-27 : 12 : 30  Lunch on Friday$")
        self.assertRegex(rows[1], r"^\s*2  carol@example.com  2026-11-28 : 09 : 05  Exam results$")
        self.assertEqual(rows[0].index("2026"), rows[1].index("2026"))

    def test_wrong_then_right_password(self):
        """A wrong password is noticed at start: the error, Username: and Password: again, then the menu."""
        result = self.manage("QUIT", login="alice\nwrong\n" + ALICE)
        self.assertClean(result)
        before_menu = result.stdout.split("a) Mail Sending")[0]
        self.assertRegex(before_menu, r"Error: login failed: -ERR \[AUTH\]")
        self.assertEqual(before_menu.count(mail_client.USERNAME_PROMPT), 2)
        self.assertEqual(result.stdout.count(mail_client.USERNAME_PROMPT), 2)
        self.assertIn("Lunch on Friday", result.stdout)

    def test_locked_maildrop_at_start_is_no_wrong_password(self):
        """A maildrop another session holds: a warning at start, not a second Username: prompt."""
        with support.PopClient(self.pop, "alice", "wonderland"):
            result = run_client(ALICE + "c\n", self.no_smtp, self.pop.port)
        self.assertClean(result)
        self.assertEqual(result.stdout.count(mail_client.USERNAME_PROMPT), 1)
        self.assertIn("Warning: the password was not checked (login failed: -ERR [IN-USE]", result.stdout)

    def test_mail_management_asks_again_when_the_password_changed_meanwhile(self):
        """A login refused in Mail Management (though taken at start) asks Username: and Password: again."""
        server = PasswordChangedPOP3Server([["From: bob@example.org", "Subject: After the change", "x"]])
        self.addCleanup(server.close)
        result = run_client(ALICE + "b\nalice\nnew\nQUIT\n", self.no_smtp, server.port)
        self.assertClean(result)
        self.assertEqual(result.stdout.count("Error: login failed: -ERR [AUTH] wrong password"), 1)
        self.assertEqual(result.stdout.count(mail_client.USERNAME_PROMPT), 2)
        self.assertIn("After the change", result.stdout)
        self.assertIn("PASS new", server.received)

    def test_a_reply_that_could_not_be_sent_is_offered_again_and_another_answer_is_a_command(self):
        """REPLY to an unreachable SMTP server: "Send it again?"; "STAT" typed there runs as the next command."""
        result = self.manage("REPLY 1", "Noon is fine.", ".", "STAT", "QUIT")
        self.assertClean(result)
        self.assertRegex(result.stdout, r"Error: cannot connect to the SMTP server .*\n%s"
                         % re.escape(mail_client.SEND_AGAIN_PROMPT))
        self.assertRegex(result.stdout, r"\b2 messages, [1-9]\d* octets\n")
        self.assertNotIn("unknown command", result.stdout)
        self.assertEqual(result.lines[-1].strip(), pop_server.Replies.GOODBYE)

    def test_empty_mailbox(self):
        """An empty mailbox is said to be empty, and STAT shows 0 messages, 0 octets."""
        os.remove(support.mailbox_path(self.root, "alice"))
        result = self.manage("STAT", "QUIT")
        self.assertClean(result)
        self.assertIn(mail_client.EMPTY_MAILBOX, result.lines)
        self.assertIn("0 messages, 0 octets", result.lines)

    def test_stat(self):
        """STAT (any case) prints the message count and octets."""
        result = self.manage("stat", "QUIT")
        self.assertClean(result)
        self.assertRegex(result.stdout, r"\b2 messages, [1-9]\d* octets\n")

    def test_list_all_and_one(self):
        """LIST prints every size, LIST n one; a number past the last prints the server's error."""
        result = self.manage("LIST", "list 2", "LIST 7", "QUIT")
        self.assertClean(result)
        self.assertRegex(result.stdout, r"No\.  Size\n\s*1  [1-9]\d* octets\n\s*2  [1-9]\d* octets\n")
        self.assertRegex(result.stdout, r"Message 2: [1-9]\d* octets\n")
        self.assertRegex(result.stdout, r"Error: -ERR")

    def test_retr_undoes_byte_stuffing(self):
        """RETR n shows the message with its byte-stuffing undone."""
        result = self.manage("RETR 1", "QUIT")
        self.assertClean(result)
        start = result.lines.index("----- Message 1 -----")
        end = result.lines.index("----- End of message 1 -----")
        self.assertEqual(result.lines[start + 1:end][-3:], ["Shall we meet at noon?", ".", ".."])
        self.assertIn("Subject: Lunch on Friday", result.lines[start + 1:end])

    def test_retr_errors(self):
        """RETR of no message prints the server's error; RETR without a number prints the usage."""
        result = self.manage("RETR 9", "RETR", "RETR x", "QUIT")
        self.assertClean(result)
        self.assertRegex(result.stdout, r"Error: -ERR")
        self.assertEqual(result.stdout.count("Error: usage: RETR n"), 2)

    def test_dele_and_quit_remove_the_message(self):
        """DELE n then QUIT removes that message and prints the server's goodbye."""
        result = self.manage("DELE 1", "QUIT")
        self.assertClean(result)
        self.assertNoError(result)
        self.assertIn(pop_server.Replies.GOODBYE, result.lines)
        stored = support.read_mailbox(self.root, "alice")
        self.assertNotIn(b"Lunch on Friday", stored)
        self.assertIn(b"Subject: Exam results\n", stored)

    def test_quit_ends_the_program(self):
        """QUIT ends the program: nothing typed after it is read."""
        result = self.manage("QUIT", "a")
        self.assertClean(result)
        self.assertEqual(result.lines[-1].strip(), pop_server.Replies.GOODBYE)

    def test_rset_undeletes(self):
        """RSET undeletes what DELE marked, in the session and in the file."""
        result = self.manage("DELE 1", "RSET", "SEARCH noon", "QUIT")
        self.assertClean(result)
        self.assertNoError(result)
        self.assertNotIn(mail_client.NO_MATCH, result.lines)
        self.assertEqual(support.read_mailbox(self.root, "alice"), ALICE_MAILBOX.encode())

    def test_dele_then_end_of_input_deletes_nothing(self):
        """DELE followed by end of input (no QUIT) deletes nothing."""
        result = self.manage("DELE 2")
        self.assertClean(result)
        self.assertEqual(support.read_mailbox(self.root, "alice"), ALICE_MAILBOX.encode())

    def test_search_words_in_subject_and_body(self):
        """SEARCH words finds messages with every word in subject or body, in any case."""
        result = self.manage("SEARCH results online", "search LUNCH", "SEARCH noon", "SEARCH bob",
                             "SEARCH missing", "SEARCH noon results", "QUIT")
        self.assertClean(result)
        found = [line.split()[0] for line in result.lines if re.match(r"\s*\d+  ", line)][2:]
        self.assertEqual(found, ["2", "1", "1"])  # "bob" is only in From:, not searched
        # ... and every word must occur: no message holds both "noon" and "results".
        self.assertEqual(result.stdout.count(mail_client.NO_MATCH), 3)

    def test_search_from(self):
        """SEARCH FROM matches a whole address in any case, or a part without '@'."""
        result = self.manage("SEARCH FROM carol@example.com", "search from BOB", "SEARCH FROM eve@x.org",
                             "SEARCH FROM ob@example.org", "SEARCH FROM <Carol@Example.com>", "QUIT")
        self.assertClean(result)
        found = [line.split()[0] for line in result.lines if re.match(r"\s*\d+  ", line)][2:]
        # A whole address must match whole (any case); a part without "@" may match a part.
        self.assertEqual(found, ["2", "1", "2"])
        self.assertEqual(result.stdout.count(mail_client.NO_MATCH), 2)

    def test_search_date(self):
        """SEARCH DATE YYYY-MM-DD finds the messages received that day and refuses other date forms."""
        result = self.manage("SEARCH DATE 2026-11-28", "SEARCH DATE 2026-11-27", "SEARCH DATE 2026-01-01",
                             "SEARCH DATE 28-11-2026", "QUIT")
        self.assertClean(result)
        found = [line.split()[0] for line in result.lines if re.match(r"\s*\d+  ", line)][2:]
        self.assertEqual(found, ["2", "1"])
        self.assertEqual(result.stdout.count(mail_client.NO_MATCH), 1)
        self.assertIn("Error: '28-11-2026' is not a date", result.stdout)

    def test_search_skips_deleted_messages(self):
        """SEARCH leaves out messages marked for deletion."""
        result = self.manage("DELE 2", "SEARCH results", "QUIT")
        self.assertIn(mail_client.NO_MATCH, result.lines)

    def test_help_and_unknown_commands(self):
        """HELP lists every command; unknown commands and a bare SEARCH print an error."""
        result = self.manage("help", "FETCH 1", "SEARCH", "QUIT")
        self.assertClean(result)
        for command in ("STAT", "LIST", "RETR n", "DELE n", "RSET", "SEARCH words", "SEARCH FROM",
                        "SEARCH DATE", "HELP", "QUIT"):
            self.assertIn(command, result.stdout)
        self.assertIn("Error: unknown command 'FETCH'", result.stdout)
        self.assertIn("Error: usage: SEARCH", result.stdout)


class EndToEndTests(support.BothServersTestCase, ClientTestCase):
    """A mail sent with the client is read back with the client, through both real servers."""

    def test_sent_mail_is_listed_and_read_with_its_dot_lines(self):
        """A mail sent with the client is listed and read back with its dot lines intact."""
        smtp, pop = self.servers
        sent = run_client(ALICE + mail(subject="Round trip", body=["..", ".x", "bye"]) + "c\n",
                          smtp.port, pop.port)
        self.assertIn(SENT, sent.lines)
        result = run_client(BOB + "b\nRETR 1\nQUIT\n", smtp.port, pop.port)
        self.assertClean(result)
        self.assertRegex(result.stdout, r"\n\s*1  alice@example.org  %s  Round trip\n" % LISTED_DATE)
        start = result.lines.index("----- Message 1 -----")
        self.assertEqual(result.lines[start + 1:start + 4],
                         ["From: alice@example.org", "To: bob@example.org", "Subject: Round trip"])
        self.assertEqual(result.lines[start + 5:start + 8], ["..", ".x", "bye"])


class TerminalTests(ClientTestCase):
    """On a terminal the password is not echoed (getpass); POSIX only, through a pseudo-terminal."""

    def setUp(self):
        try:
            import pty
            import select
        except ImportError:
            self.skipTest("no pseudo-terminals here")
        self.select = select.select
        self.master, slave = pty.openpty()
        self.addCleanup(os.close, self.master)
        # A new session has no controlling terminal, so getpass cannot fall back to
        # the terminal running the tests and reads the pseudo-terminal on stdin.
        self.proc = subprocess.Popen(client_command(closed_port(), closed_port()), stdin=slave,
                                     stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.addCleanup(self.proc.wait, support.DEADLINE)
        self.addCleanup(self.proc.kill)
        self.seen = b""

    def read_until(self, text):
        """Everything the terminal showed up to and including text."""
        deadline = support.DEADLINE
        while text.encode() not in self.seen:
            ready, _, _ = self.select([self.master], [], [], deadline)
            self.assertTrue(ready, "terminal never showed %r: %r" % (text, self.seen))
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the client closed the terminal
                chunk = b""
            self.assertTrue(chunk, "terminal closed before %r: %r" % (text, self.seen))
            self.seen += chunk
        return self.seen.decode("utf-8", "replace")

    def test_password_is_not_echoed(self):
        """On a terminal the answer to Password: is not echoed; the username is."""
        # The contract's prompts (section 4.1), not mail_client's constants: changing them must fail here.
        self.read_until("Username: ")
        os.write(self.master, b"alice\n")
        self.read_until("Password: ")
        os.write(self.master, b"wonderland\n")
        self.read_until(mail_client.CHOICE_PROMPT)
        os.write(self.master, b"c\n")
        shown = self.read_until(mail_client.GOODBYE)
        self.assertEqual(self.proc.wait(support.DEADLINE), 0)
        self.assertIn("alice", shown)  # the terminal echoes ordinary answers...
        self.assertNotIn("wonderland", shown)  # ...but not the password


class EndOfInputTests(ClientTestCase):
    """End of input at every prompt ends the client with exit code 0 and no traceback."""

    @classmethod
    def setUpClass(cls):
        cls.pop = NoTopPOP3Server([["From: bob@example.org", "Subject: Hi", "Hello"]])
        cls.port = closed_port()

    @classmethod
    def tearDownClass(cls):
        cls.pop.close()

    def test_every_prompt(self):
        """End of input at each prompt ends the client with exit code 0, no traceback, nothing sent."""
        inputs = {
            "username": "",
            "password": "alice\n",
            "menu": ALICE,
            "from line": ALICE + "a\n",
            "mail body": ALICE + "a\nFrom: alice@example.org\nTo: bob@example.org\nSubject: x\nbody\n",
            "menu after a refused mail": ALICE + "a\n.\n",
            "mailbox command": ALICE + "b\n",
            "mailbox command after a command": ALICE + "b\nSTAT\n",
            "menu without newline": ALICE + "b",
        }
        for where, text in inputs.items():
            with self.subTest(where=where):
                result = run_client(text, self.port, self.pop.port)
                self.assertClean(result)
                self.assertNotIn(SENT, result.stdout)

    @unittest.skipIf(os.name == "nt", "SIGINT cannot be sent to a child on Windows")
    def test_ctrl_c_at_a_prompt(self):
        """Ctrl-C at a prompt ends the client with exit code 130 and nothing on stderr."""
        # A shell that starts the tests in the background ignores SIGINT, and the
        # client would inherit that: give it the default disposition back.
        proc = subprocess.Popen(client_command(self.port, self.pop.port), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.stderr.close)
        self.addCleanup(proc.stdin.close)
        seen = b""
        while mail_client.USERNAME_PROMPT.encode() not in seen:  # the prompt is up: the client waits
            chunk = os.read(proc.stdout.fileno(), 1024)
            self.assertTrue(chunk, "client ended before asking")
            seen += chunk
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(support.DEADLINE), 130)
        self.assertEqual(proc.stderr.read(), b"")

    def test_username_after_failed_login(self):
        """End of input when the username or password is asked again ends the client cleanly."""
        class Refusing(NoTopPOP3Server):
            """A POP3 server that refuses every command after its greeting."""

            def session(self, conn, rfile):
                self.send(conn, "+OK hello")
                while self.readline(rfile) is not None:
                    self.send(conn, "-ERR no")
        server = Refusing([])
        self.addCleanup(server.close)
        for text in (ALICE, ALICE + "alice\n", ALICE + "alice\nwonderland\n"):   # refused at start
            with self.subTest(text=text):
                result = run_client(text, self.port, server.port)
                self.assertClean(result)
                self.assertIn("Error: login failed: -ERR no", result.stdout)


if __name__ == "__main__":
    unittest.main()
