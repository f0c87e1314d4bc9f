"""Tests of mail_client.py for real-world mail: MIME reading, RAW, SAVE, SEARCH, REPLY,
sending through any server (Postfix's 221), SMTP AUTH and implicit TLS.

Messages are built with email.message.EmailMessage and delivered through the real SMTP
server; AUTH and implicit TLS are tested against strict scripted servers in this file.
"""

import base64
import hashlib
import hmac
import os
import random
import re
import secrets
import shutil
import smtplib
import ssl
import subprocess
import sys
import tempfile
import unittest
from email.message import EmailMessage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from support import (ALICE, SENT, ClientTestCase, FakeServer, NoTopPOP3Server,  # noqa: E402
                     StandardSMTPServer, TLS_CERT, TLS_KEY, client_command, closed_port, mail,
                     run_client)

import mail_client as client  # noqa: E402

INCORRECT = client.INCORRECT_FORMAT
POSTFIX_GOODBYE = "221 2.7.0 Error: I can break rules, too. Goodbye."
ROW = re.compile(r"\s*(\d+)  ")


def message_lines(result, number):
    """The lines RETR or RAW printed for message number."""
    start = result.lines.index("----- Message %d -----" % number)
    return result.lines[start + 1:result.lines.index("----- End of message %d -----" % number)]


def listed(result):
    """The message numbers of every listing row printed, in order."""
    return [int(ROW.match(line).group(1)) for line in result.lines if ROW.match(line)]


def temporary_folder(test):
    """A fresh folder removed after the test."""
    folder = tempfile.mkdtemp(prefix="client-save-")
    test.addCleanup(shutil.rmtree, folder, True)
    return folder


# --------------------------------------------------------------------------
# The messages: built with EmailMessage (and two broken ones by hand)
# --------------------------------------------------------------------------

EVIL_SCRIPT = b"#!/bin/sh\necho gotcha\n"
REPORT = b"%PDF-1.4 not really a PDF\n"


def quoted_printable_mail():
    m = EmailMessage()
    m["From"], m["To"] = "Bob Builder <bob@example.org>", "alice@example.org"
    m["Subject"], m["Message-ID"] = "K\u00e4sekuchen f\u00fcr dich", "<cake@example.org>"
    m["Date"] = "Fri, 27 Nov 2026 10:00:00 +0000"
    m.set_content("Der K\u00e4sekuchen ist fertig.\nKomm vorbei!\n", cte="quoted-printable")
    return m


def base64_text_mail():
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "carol@example.com", "alice@example.org", "Aus K\u00f6ln"
    m.set_content("Gr\u00fc\u00dfe aus K\u00f6ln, sagt Carol.\n", cte="base64")
    return m


def html_only_mail():
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "news@example.net", "alice@example.org", "Newsletter"
    m.set_content("<html><head><style>p { color: red }</style><script>alert(1)</script></head>"
                  "<body><p>Hello &amp; welcome, <b>J&ouml;rg</b>!</p>"
                  "<p>Read <a href=\"https://example.net/story\">the story</a> today.</p>"
                  "</body></html>", subtype="html")
    return m


def two_attachments_mail():
    m = EmailMessage()
    m["From"], m["To"] = "Bob <bob@example.org>", "Alice <Alice@lab.example>"
    m["Reply-To"], m["Subject"] = "Bob's list <list@example.org>", "Re: Re: Files"
    m["Message-ID"], m["References"] = "<files@example.org>", "<older@example.org>"
    m.set_content("Two files, as promised.\n")
    m.add_attachment(REPORT, maintype="application", subtype="pdf", filename="report.pdf")
    m.add_attachment(EVIL_SCRIPT, maintype="text", subtype="x-sh", filename="../../evil.sh")
    return m


BROKEN_BASE64 = (b"From: dave@example.org\r\nTo: alice@example.org\r\nSubject: Damaged\r\n"
                 b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 b"Content-Transfer-Encoding: base64\r\n\r\nSGVsbG8gV29y!!!bGQ\r\n")
UNKNOWN_CHARSET = (b"From: erin@example.org\r\nTo: alice@example.org\r\nSubject: Klingon\r\n"
                   b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=x-klingon\r\n"
                   b"Content-Transfer-Encoding: 8bit\r\n\r\nQapla\xc3\xa4 tlhIngan\r\n")
QP, B64, HTML, FILES, BROKEN, CHARSET = 1, 2, 3, 4, 5, 6   # their numbers in alice's mailbox


class HeaderRuleTest(unittest.TestCase):
    """split_message follows the header rule the servers share (the course form and RFC 5322)."""

    def check(self, lines, headers, body):
        self.assertEqual(client.split_message(lines), (headers, body))

    def test_course_form_with_an_indented_first_body_line(self):
        self.check(["From: a", "To: b", "Subject: s", "Received: r", "  indented first body line", "more"],
                   [("From", "a"), ("To", "b"), ("Subject", "s"), ("Received", "r")],
                   ["  indented first body line", "more"])

    def test_rfc5322_form_folds_continuations(self):
        self.check(["Subject: s", " folded", "", "body"], [("Subject", "s folded")], ["body"])

    def test_a_tab_continuation_folds_too(self):
        self.check(["To: a,", "\tb", "", "x"], [("To", "a, b")], ["x"])

    def test_a_body_line_with_a_colon_after_the_headers_is_a_header(self):
        self.check(["From: a", "Subject: s", "Note: x", "text"],
                   [("From", "a"), ("Subject", "s"), ("Note", "x")], ["text"])

    def test_no_headers_at_all_is_all_body(self):
        self.check(["just text", "Subject: late"], [], ["just text", "Subject: late"])
        self.check(["  indented", "x"], [], ["  indented", "x"])
        self.check(["", "x"], [], ["x"])      # an empty header block, as RFC 5322 allows

    def test_course_form_keeps_everything_after_the_first_fold(self):
        # Without the empty line, a folded-looking line and all after it are body.
        self.check(["Subject: s", " folded", "Other: y"], [("Subject", "s")], [" folded", "Other: y"])

    def test_only_headers_and_nothing_else(self):
        self.check(["From: a", "Subject: s"], [("From", "a"), ("Subject", "s")], [])

    def test_header_names_are_printable_ascii_without_colon(self):
        self.check(["X-Odd!#$~: v", "bad name: v"], [("X-Odd!#$~", "v")], ["bad name: v"])
        self.check([": no name", "x"], [], [": no name", "x"])
        self.check(["Caf\u00e9: v", "x"], [], ["Caf\u00e9: v", "x"])

    def test_the_empty_line_belongs_to_neither_part(self):
        self.check(["Subject: s", "", "", "b"], [("Subject", "s")], ["", "b"])


class IndentedFirstBodyLineSearchTest(ClientTestCase):
    """SEARCH finds the words of an indented first body line of a course message (real POP3 server)."""

    def test_search_finds_the_indented_line(self):
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        with open(support.mailbox_path(root, "alice"), "w", newline="\n") as f:
            f.write("From: bob@example.org\nTo: alice@example.org\nSubject: Lunch\n"
                    "Received: 2026-11-27 : 12 : 30\n    Indented greeting\nsecond\n.\n")
        pop = support.ServerProcess(support.POP_SCRIPT, root)
        self.addCleanup(pop.close)
        result = run_client(ALICE + "b\nSEARCH greeting\nQUIT\n", closed_port(), pop.port)
        self.assertClean(result)
        self.assertNotIn("No message matches.", result.lines)
        self.assertEqual(result.stdout.count("2026-11-27 : 12 : 30  Lunch"), 2, result.stdout)



class MimeThroughServersTest(support.BothServersTestCase, ClientTestCase):
    """The six messages, delivered through the real SMTP server, read through the real POP3 one."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        smtp, cls.pop = cls.servers
        cls.smtp = smtp
        try:
            with smtplib.SMTP("127.0.0.1", smtp.port, timeout=support.DEADLINE) as session:
                for build in (quoted_printable_mail, base64_text_mail, html_only_mail,
                              two_attachments_mail):
                    session.send_message(build())
                for raw in (BROKEN_BASE64, UNKNOWN_CHARSET):
                    session.sendmail("someone@example.org", ["alice@example.org"], raw)
        except BaseException:
            cls.tearDownClass()
            raise

    def setUp(self):
        support.remove_mailboxes(self.root, ("bob",))

    def manage(self, *commands, smtp_port=None, folder=support.REPO):
        """alice logs in, chooses Mail Management and types the commands."""
        return run_client(ALICE + "b\n" + "".join(c + "\n" for c in commands),
                          smtp_port or self.smtp.port, self.pop.port, cwd=folder)

    def test_listing_shows_decoded_subjects(self):
        result = self.manage("QUIT")
        self.assertClean(result)
        self.assertRegex(result.stdout, r"\n\s*1  bob@example.org  .*  K\u00e4sekuchen f\u00fcr dich\n")
        self.assertEqual(listed(result), [1, 2, 3, 4, 5, 6])

    def test_quoted_printable_and_base64_text_are_decoded(self):
        result = self.manage("RETR %d" % QP, "RETR %d" % B64, "QUIT")
        self.assertClean(result)
        self.assertNoError(result)
        self.assertEqual(message_lines(result, QP), [
            "From: Bob Builder <bob@example.org>", "To: alice@example.org",
            "Date: Fri, 27 Nov 2026 10:00:00 +0000", "Subject: K\u00e4sekuchen f\u00fcr dich", "",
            "Der K\u00e4sekuchen ist fertig.", "Komm vorbei!"])
        shown = message_lines(result, B64)
        self.assertIn("Gr\u00fc\u00dfe aus K\u00f6ln, sagt Carol.", shown)
        self.assertIn("Subject: Aus K\u00f6ln", shown)
        self.assertNotIn("Note:", result.stdout)

    def test_html_only_shows_its_text(self):
        shown = message_lines(self.manage("RETR %d" % HTML, "QUIT"), HTML)
        self.assertIn("Hello & welcome, J\u00f6rg!", shown)
        self.assertIn("Read the story [https://example.net/story] today.", shown)
        text = "\n".join(shown)
        for hidden in ("<", "color: red", "alert(1)", "&amp;"):
            self.assertNotIn(hidden, text)

    def test_attachments_are_numbered_with_name_type_and_size(self):
        shown = message_lines(self.manage("RETR %d" % FILES, "QUIT"), FILES)
        self.assertIn("Two files, as promised.", shown)
        attachments = shown[shown.index("Attachments:") + 1:]
        self.assertEqual(attachments, [
            "   1. report.pdf (application/pdf, %d bytes)" % len(REPORT),
            "   2. ../../evil.sh (text/x-sh, %d bytes; SAVE names it evil.sh)" % len(EVIL_SCRIPT)])
        self.assertNotIn("JVBERi0", "\n".join(shown))   # no base64 on the screen

    def test_broken_base64_and_unknown_charset_show_what_they_can(self):
        result = self.manage("RETR %d" % BROKEN, "RETR %d" % CHARSET, "STAT", "QUIT")
        self.assertClean(result)
        self.assertNotIn("Traceback", result.stdout)
        broken = message_lines(result, BROKEN)
        self.assertIn("Hello World", broken)
        self.assertRegex(broken[-1], r"^Note: .*base64 is damaged")
        klingon = message_lines(result, CHARSET)
        self.assertIn("Qapla\u00e4 tlhIngan", klingon)
        self.assertRegex(klingon[-1], r"^Note: .*unknown charset 'x-klingon'")
        self.assertIn("6 messages", result.stdout)   # and the session goes on

    def test_raw_shows_the_message_as_the_server_sent_it(self):
        result = self.manage("RAW %d" % QP, "QUIT")
        self.assertClean(result)
        raw = message_lines(result, QP)
        self.assertIn("Content-Transfer-Encoding: quoted-printable", raw)
        self.assertIn("Der K=C3=A4sekuchen ist fertig.", raw)
        self.assertIn("Subject: =?utf-8?q?K=C3=A4sekuchen_f=C3=BCr?= dich", raw)
        self.assertRegex("\n".join(raw), r"\nReceived: [^\n]+\n")

    def test_search_looks_in_decoded_text_not_in_the_transfer_encoding(self):
        result = self.manage("SEARCH K\u00e4sekuchen fertig", "SEARCH gr\u00fc\u00dfe", "SEARCH welcome",
                             "SEARCH story", "SEARCH K=C3=A4sekuchen", "SEARCH SGVsbG8",
                             "SEARCH tlhIngan", "SEARCH hello world", "QUIT")
        self.assertClean(result)
        self.assertEqual(listed(result)[6:], [QP, B64, HTML, HTML, CHARSET, BROKEN])
        self.assertEqual(result.stdout.count("No message matches."), 2)

    def test_save_all_writes_safe_names_inside_the_folder(self):
        folder = temporary_folder(self)
        outside = os.path.join(folder, "..", "..", "evil.sh")
        self.assertFalse(os.path.lexists(outside))
        result = self.manage("SAVE %d %s" % (FILES, folder), "QUIT")
        self.assertClean(result)
        self.assertNoError(result)
        self.assertEqual(sorted(os.listdir(folder)), ["evil.sh", "report.pdf"])
        for name, data in (("report.pdf", REPORT), ("evil.sh", EVIL_SCRIPT)):
            with open(os.path.join(folder, name), "rb") as f:
                self.assertEqual(f.read(), data)
        self.assertIn("Saved attachment 1 to %s" % os.path.join(folder, "report.pdf"), result.lines)
        self.assertIn("Saved attachment 2 to %s" % os.path.join(folder, "evil.sh"), result.lines)
        self.assertFalse(os.path.lexists(outside))

    def test_save_never_overwrites_and_never_follows_a_link(self):
        folder = temporary_folder(self)
        with open(os.path.join(folder, "evil.sh"), "wb") as f:
            f.write(b"mine")
        target = os.path.join(temporary_folder(self), "target")
        with open(target, "wb") as f:
            f.write(b"untouched")
        try:
            os.symlink(target, os.path.join(folder, "evil-1.sh"))
        except (OSError, NotImplementedError):
            self.skipTest("no symbolic links here")
        result = self.manage("SAVE %d 2 %s" % (FILES, folder), "save %d ALL %s" % (FILES, folder), "QUIT")
        self.assertClean(result)
        self.assertIn("Saved attachment 2 to %s" % os.path.join(folder, "evil-2.sh"), result.lines)
        self.assertIn("Saved attachment 2 to %s" % os.path.join(folder, "evil-3.sh"), result.lines)
        self.assertIn("Saved attachment 1 to %s" % os.path.join(folder, "report.pdf"), result.lines)
        for path, data in ((os.path.join(folder, "evil.sh"), b"mine"), (target, b"untouched"),
                           (os.path.join(folder, "evil-2.sh"), EVIL_SCRIPT)):
            with open(path, "rb") as f:
                self.assertEqual(f.read(), data)

    def test_save_defaults_to_the_current_folder_and_explains_mistakes(self):
        folder = temporary_folder(self)
        result = self.manage("SAVE %d 1" % FILES, "SAVE %d 3" % FILES, "SAVE %d" % QP,
                             "SAVE %d all %s" % (FILES, os.path.join(folder, "missing")), "SAVE x",
                             "QUIT", folder=folder)
        self.assertClean(result)
        self.assertEqual(os.listdir(folder), ["report.pdf"])
        self.assertIn("Error: message %d has 2 attachments: choose 1 to 2 or all" % FILES, result.lines)
        self.assertIn("Error: message %d has no attachments" % QP, result.lines)
        self.assertIn("Error: there is no folder %r" % os.path.join(folder, "missing"), result.lines)
        self.assertIn("Error: usage: SAVE n [k|all] [DIR]", result.lines)

    def test_reply_reaches_the_sender_through_the_real_server(self):
        result = self.manage("REPLY %d" % QP, "Danke, Bob!", ".", "STAT", "QUIT")
        self.assertClean(result)
        self.assertNoError(result)
        for line in ("From: alice@example.org", "To: bob@example.org",
                     "Subject: Re: K\u00e4sekuchen f\u00fcr dich", SENT, "6 messages, %s" % ""):
            self.assertIn(line, result.stdout)
        self.assertLess(result.stdout.index(SENT), result.stdout.rindex("Command: "))
        self.assertRegex(support.read_mailbox(self.root, "bob").decode("utf-8"),
                         r"\AFrom: alice@example.org\nTo: bob@example.org\n"
                         r"Subject: Re: K\u00e4sekuchen f\u00fcr dich\nReceived: [^\n]+\nDanke, Bob!\n\.\n\Z")

    def test_reply_to_a_standard_server_threads_and_says_re_once(self):
        server = StandardSMTPServer()
        self.addCleanup(server.close)
        result = self.manage("REPLY %d" % FILES, "Got them.", ".", "QUIT", smtp_port=server.port)
        self.assertClean(result)
        self.assertIn(SENT, result.lines)
        got = server.received
        self.assertIn("MAIL FROM:<alice@lab.example>", got)   # the domain it was sent to
        self.assertIn("RCPT TO:<list@example.org>", got)       # Reply-To before From
        header = got[got.index("DATA") + 1:got.index("")]
        self.assertEqual(header[:3], ["From: alice@lab.example", "To: list@example.org",
                                      "Subject: Re: Files"])
        self.assertIn("In-Reply-To: <files@example.org>", header)
        references = header.index("References: <older@example.org>")
        self.assertEqual(header[references + 1], " <files@example.org>")

    def test_every_message_can_be_answered(self):
        server = StandardSMTPServer()
        self.addCleanup(server.close)
        typed = [line for n in range(1, 7) for line in ("REPLY %d" % n, "Thanks.", ".")]
        result = self.manage(*typed + ["QUIT"], smtp_port=server.port)
        self.assertClean(result)
        self.assertEqual(result.stdout.count(SENT), 6, result.stdout)
        subjects = [line for line in server.received if line.startswith("Subject: ")]
        self.assertEqual(subjects, ["Subject: =?utf-8?q?Re=3A_K=C3=A4sekuchen_f=C3=BCr_dich?=",
                                    "Subject: =?utf-8?q?Re=3A_Aus_K=C3=B6ln?=",
                                    "Subject: Re: Newsletter", "Subject: Re: Files",
                                    "Subject: Re: Damaged", "Subject: Re: Klingon"])

    def test_a_reply_is_checked_like_any_mail(self):
        result = self.manage("REPLY %d" % QP, ".", "REPLY 99", "QUIT")
        self.assertClean(result)
        self.assertIn(INCORRECT, result.lines)
        self.assertIn("  the mail has no body: type at least one line before the final \".\"",
                      result.lines)
        self.assertRegex(result.stdout, r"Error: -ERR")
        self.assertEqual(support.read_mailbox(self.root, "bob"), b"")
        self.assertEqual(result.lines[-1].strip(), "+OK Thanks for using POP3 server")

    def test_deleted_messages_are_not_saved_or_answered(self):
        result = self.manage("DELE %d" % FILES, "SAVE %d" % FILES, "REPLY %d" % FILES, "RSET", "QUIT")
        self.assertEqual(result.stdout.count("Error: message %d is marked for deletion" % FILES), 2)



# --------------------------------------------------------------------------
# Sending through any server: Postfix's 221 to MAIL_FROM:
# --------------------------------------------------------------------------

class PostfixLikeSMTPServer(FakeServer):
    """Speaks RFC 5321 and answers MAIL_FROM: as Postfix does: 221, then it hangs up.

    first_answer None hangs up without a word; a 500 answer keeps the connection.
    Each connection's commands are kept apart in connections, the mails taken in messages.
    """

    def __init__(self, first_answer=POSTFIX_GOODBYE, rcpt_answer="250 2.1.5 Ok"):
        self.first_answer = first_answer
        self.rcpt_answer = rcpt_answer
        self.connections = []
        self.messages = []
        super().__init__()

    def session(self, conn, rfile):
        lines = []
        self.connections.append(lines)
        self.send(conn, "220 lab.example ESMTP Postfix")
        while True:
            line = self.readline(rfile)
            if line is None:
                return
            lines.append(line)
            verb = line.upper()
            if verb.startswith("EHLO "):
                self.send(conn, "250-lab.example", "250-PIPELINING", "250 8BITMIME")
            elif verb.startswith("HELO "):
                self.send(conn, "250 lab.example")
            elif verb.startswith("MAIL_FROM:"):
                if self.first_answer:
                    self.send(conn, self.first_answer)
                if self.first_answer is None or self.first_answer.startswith("221"):
                    return
            elif verb.startswith("MAIL FROM:"):
                self.send(conn, "250 2.1.0 Ok")
            elif verb.startswith("RCPT TO:"):
                self.send(conn, self.rcpt_answer)
            elif verb == "DATA":
                self.send(conn, "354 End data with <CR><LF>.<CR><LF>")
                self.messages.append([])
                while True:
                    line = self.readline(rfile)
                    if line in (".", None):
                        break
                    self.messages[-1].append(line)
                self.send(conn, "250 2.0.0 Ok: queued as 4711")
            elif verb == "QUIT":
                self.send(conn, "221 2.0.0 Bye")
                return
            else:
                self.send(conn, "502 5.5.2 Error: command not recognized")


def commands(lines):
    """The command words of one connection's commands."""
    return [re.match(r"(MAIL_FROM:|MAIL FROM:|RCPT TO:|\S*)", line).group(1).upper() for line in lines]


class AnyServerTest(ClientTestCase):
    """A server that hangs up on (or refuses) MAIL_FROM: gets the mail on a second connection."""

    def send_through(self, server):
        self.addCleanup(server.close)
        return run_client(ALICE + mail(body=["Hi Bob", ".dot"]) + "c\n", server.port, closed_port())

    def test_postfix_221_and_close_then_the_second_connection_gets_the_mail(self):
        server = PostfixLikeSMTPServer()
        result = self.send_through(server)
        self.assertClean(result)
        self.assertIn(SENT, result.lines)
        self.assertNotIn("Error", result.stdout)     # silently: nothing to report
        first, second = server.connections
        self.assertEqual(commands(first), ["HELO", "MAIL_FROM:"])
        self.assertEqual(commands(second), ["EHLO", "MAIL FROM:", "RCPT TO:", "DATA", "QUIT"])
        self.assertIn("MAIL FROM:<alice@example.org>", second)
        self.assertIn("RCPT TO:<bob@example.org>", second)
        self.assertEqual(server.messages[0][-2:], ["Hi Bob", "..dot"])
        self.assertEqual(len(server.messages), 1)

    def test_a_close_without_a_reply_is_taken_the_same_way(self):
        server = PostfixLikeSMTPServer(first_answer=None)
        result = self.send_through(server)
        self.assertClean(result)
        self.assertIn(SENT, result.lines)
        self.assertEqual(len(server.connections), 2)
        self.assertEqual(commands(server.connections[1])[:2], ["EHLO", "MAIL FROM:"])

    def test_500_leaves_the_first_connection_with_quit(self):
        server = PostfixLikeSMTPServer(first_answer="500 5.5.2 Error: bad syntax")
        result = self.send_through(server)
        self.assertIn(SENT, result.lines)
        self.assertEqual(commands(server.connections[0]), ["HELO", "MAIL_FROM:", "QUIT"])
        self.assertEqual(commands(server.connections[1])[:2], ["EHLO", "MAIL FROM:"])

    def test_only_one_second_try_and_its_failure_says_why_it_was_made(self):
        server = PostfixLikeSMTPServer(rcpt_answer="550 5.1.1 <bob@example.org>: User unknown")
        result = self.send_through(server)
        self.assertClean(result)
        self.assertNotIn(SENT, result.stdout)
        self.assertEqual(len(server.connections), 2)
        errors = [line for line in result.lines if line.startswith("Error:")]
        self.assertEqual(len(errors), 1, result.stdout)
        self.assertIn("550 5.1.1 <bob@example.org>: User unknown", errors[0])
        self.assertIn("sent again on a new connection, because the server answered MAIL_FROM: "
                      "with " + POSTFIX_GOODBYE, errors[0])
        self.assertEqual(result.stdout.count("a) Mail Sending"), 2)


# --------------------------------------------------------------------------
# SMTP AUTH and implicit TLS, against strict scripted servers
# --------------------------------------------------------------------------

def server_tls_context():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS_CERT, TLS_KEY)
    return context


def b64(data):
    return base64.b64encode(data).decode("ascii")


def unb64(text):
    """Strict base64 decoding: ValueError on anything RFC 4648 does not allow."""
    return base64.b64decode(text.encode("ascii"), validate=True)


class AuthSMTPServer(FakeServer):
    """A submission server: MAIL gets 530 until AUTH succeeds; checks each SASL exchange to the byte.

    Every departure from RFC 4954/4616/2195 by the client lands in problems; auths records
    (mechanism, inside TLS?, accepted?) and delivered the envelope of each mail taken.
    """

    LOGIN, PASSWORD = "alice", "wonderland"

    def __init__(self, mechanisms=("PLAIN", "LOGIN", "CRAM-MD5"), starttls=False, implicit=False):
        self.mechanisms, self.starttls, self.implicit = mechanisms, starttls, implicit
        self.context = server_tls_context() if (starttls or implicit) else None
        self.problems, self.auths, self.delivered, self.commands = [], [], [], []
        super().__init__()

    def _serve(self, conn):
        if self.implicit:
            conn.settimeout(support.DEADLINE)
            try:
                conn = self.context.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                self.problems.append("TLS handshake failed: %s" % exc)
                conn.close()
                return
        super()._serve(conn)

    def session(self, conn, rfile):
        state = {"tls": self.implicit, "ehlo": False, "authed": False, "conn": conn, "rfile": rfile}
        self.send(conn, "220 submit.example ESMTP")
        try:
            while True:
                line = self.readline(state["rfile"])
                if line is None:
                    return
                self.commands.append(line)
                verb, _, rest = line.partition(" ")
                handler = getattr(self, "on_" + verb.upper().replace(":", "").replace("_", ""), None)
                reply = handler(state, rest) if handler else "500 5.5.2 unknown command"
                if reply:
                    self.send(state["conn"], reply)
                if verb.upper() == "QUIT":
                    return
        finally:
            if state["conn"] is not conn:      # the TLS socket STARTTLS made
                state["rfile"].close()
                state["conn"].close()

    def on_EHLO(self, state, rest):
        state["ehlo"] = True
        extensions = ["STARTTLS"] if self.starttls and not state["tls"] else []
        extensions += ["AUTH " + " ".join(self.mechanisms), "8BITMIME"]
        self.send(state["conn"], "250-submit.example", *["250-" + e for e in extensions[:-1]])
        return "250 " + extensions[-1]

    def on_HELO(self, state, rest):
        return "250 submit.example"

    def on_STARTTLS(self, state, rest):
        self.send(state["conn"], "220 2.0.0 Ready to start TLS")
        state["conn"] = self.context.wrap_socket(state["conn"], server_side=True)
        state["rfile"] = state["conn"].makefile("rb")
        state.update(tls=True, ehlo=False, authed=False)   # RFC 3207 4.2: start again

    def on_AUTH(self, state, rest):
        mechanism, _, initial = rest.partition(" ")
        if not state["ehlo"] or state["authed"] or mechanism not in self.mechanisms:
            self.problems.append("AUTH %s out of place" % mechanism)
            return "503 5.5.1 bad sequence"
        try:
            accepted = getattr(self, "sasl_" + mechanism.replace("-", "_"))(state, initial)
        except (ValueError, UnicodeDecodeError) as exc:
            self.problems.append("malformed %s exchange: %s" % (mechanism, exc))
            return "501 5.5.2 malformed"
        self.auths.append((mechanism, state["tls"], accepted))
        state["authed"] = accepted
        return "235 2.7.0 Authentication successful" if accepted else \
            "535 5.7.8 Authentication credentials invalid"

    def ask(self, state, challenge):
        """Send a 334 challenge; the client's answer line."""
        self.send(state["conn"], "334 " + challenge)
        answer = self.readline(state["rfile"])
        if answer is None or answer == "*":
            raise ValueError("cancelled")
        return answer

    def sasl_PLAIN(self, state, initial):
        response = unb64(initial or self.ask(state, ""))
        return response == ("\0%s\0%s" % (self.LOGIN, self.PASSWORD)).encode()

    def sasl_LOGIN(self, state, initial):
        if initial:
            raise ValueError("this client sends no initial response with LOGIN")
        login = unb64(self.ask(state, b64(b"Username:")))
        password = unb64(self.ask(state, b64(b"Password:")))
        return (login, password) == (self.LOGIN.encode(), self.PASSWORD.encode())

    def sasl_CRAM_MD5(self, state, initial):
        if initial:
            raise ValueError("CRAM-MD5 has no initial response")
        challenge = ("<%s.%d@submit.example>" % (secrets.token_hex(8), os.getpid())).encode()
        login, _, digest = unb64(self.ask(state, b64(challenge))).decode().partition(" ")
        expected = hmac.new(self.PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
        if not re.fullmatch(r"[0-9a-f]{32}", digest):
            raise ValueError("the digest is not 32 lower-case hex digits: %r" % digest)
        return (login, digest) == (self.LOGIN, expected)

    def on_MAILFROM(self, state, rest):
        if not state["authed"]:
            return "530 5.7.0 Authentication required"
        if not rest.startswith("FROM:<") and not rest.startswith("<"):
            self.problems.append("MAIL without the RFC 5321 spelling: %r" % rest)
        state["envelope"] = [rest]
        return "250 2.1.0 Ok"

    def on_MAIL(self, state, rest):
        return self.on_MAILFROM(state, rest)

    def on_RCPT(self, state, rest):
        if "envelope" not in state:
            return "503 5.5.1 need MAIL"
        state["envelope"].append(rest)
        return "250 2.1.5 Ok"

    def on_DATA(self, state, rest):
        if "envelope" not in state:
            return "503 5.5.1 need RCPT"
        self.send(state["conn"], "354 go ahead")
        while self.readline(state["rfile"]) not in (".", None):
            pass
        self.delivered.append(state.pop("envelope"))
        return "250 2.0.0 Ok: queued"

    def on_QUIT(self, state, rest):
        return "221 2.0.0 Bye"


class ImplicitTLSPOP3Server(NoTopPOP3Server):
    """A POP3 server that speaks TLS from the first byte (POP3S, RFC 8314)."""

    def _serve(self, conn):
        conn.settimeout(support.DEADLINE)
        try:
            conn = server_tls_context().wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            conn.close()
            return
        super()._serve(conn)


class AuthTest(ClientTestCase):
    """The client side of SMTP AUTH (RFC 4954) and of implicit TLS (RFC 8314)."""

    def send(self, server, *options, login=ALICE, pop_port=None):
        self.addCleanup(server.close)
        return run_client(login + mail() + "c\n", server.port, pop_port or closed_port(),
                          "127.0.0.1", *options)

    def assertSent(self, server, result):
        self.assertClean(result)
        self.assertIn(SENT, result.lines)
        self.assertEqual(server.problems, [])
        self.assertEqual(len(server.delivered), 1)
        self.assertNotIn("wonderland", result.stdout)

    def test_530_to_mail_from_is_answered_with_cram_md5_on_the_same_connection(self):
        server = AuthSMTPServer()
        result = self.send(server)
        self.assertSent(server, result)
        self.assertEqual(server.auths, [("CRAM-MD5", False, True)])
        self.assertEqual([c.split(" ")[0] for c in server.commands if not c.startswith(("EHLO", "HELO"))][:2],
                         ["MAIL_FROM:", "AUTH"])
        self.assertEqual(server.delivered, [["FROM:<alice@example.org>", "TO:<bob@example.org>"]])
        self.assertEqual(sum(c.startswith("HELO") for c in server.commands), 1)   # one connection

    def test_auth_option_authenticates_from_the_start(self):
        server = AuthSMTPServer()
        result = self.send(server, "--auth")
        self.assertSent(server, result)
        self.assertEqual([c.split(" ")[0] for c in server.commands[:3]], ["EHLO", "AUTH", "MAIL"])
        self.assertNotIn("HELO", " ".join(server.commands))

    def test_plain_and_login_are_never_sent_in_clear_without_insecure(self):
        server = AuthSMTPServer(mechanisms=("PLAIN", "LOGIN"))
        result = self.send(server)
        self.assertClean(result)
        self.assertNotIn(SENT, result.stdout)
        errors = [line for line in result.lines if line.startswith("Error:")]
        self.assertEqual(len(errors), 1, result.stdout)
        self.assertRegex(errors[0], r"offers only PLAIN and LOGIN without TLS.*--insecure")
        self.assertEqual(server.auths, [])
        self.assertFalse(any(c.startswith("AUTH") for c in server.commands))
        self.assertEqual(result.stdout.count("a) Mail Sending"), 2)

    def test_insecure_allows_plain_in_clear_with_a_warning(self):
        server = AuthSMTPServer(mechanisms=("LOGIN", "PLAIN"))
        result = self.send(server, "--insecure")
        self.assertSent(server, result)
        self.assertEqual(server.auths, [("PLAIN", False, True)])
        self.assertRegex(result.stdout, r"Warning: --insecure: sending your password without TLS "
                                        r"\(AUTH PLAIN\)")

    def test_login_exchange_when_it_is_all_there_is(self):
        server = AuthSMTPServer(mechanisms=("LOGIN",))
        result = self.send(server, "--insecure", "--auth")
        self.assertSent(server, result)
        self.assertEqual(server.auths, [("LOGIN", False, True)])

    def test_a_wrong_password_gets_a_clear_error_and_the_menu(self):
        server = AuthSMTPServer()
        result = self.send(server, login="alice\nwrong\n")
        self.assertClean(result)
        self.assertNotIn(SENT, result.stdout)
        self.assertEqual(server.auths, [("CRAM-MD5", False, False)])
        self.assertIn("Error: the SMTP server 127.0.0.1 port %d did not accept the login 'alice' with "
                      "its password (AUTH CRAM-MD5): 535 5.7.8 Authentication credentials invalid"
                      % server.port, result.lines)
        self.assertEqual(server.delivered, [])
        self.assertEqual(result.stdout.count("a) Mail Sending"), 2)
        self.assertEqual(server.commands[-1], "QUIT")

    def test_plain_is_preferred_inside_starttls(self):
        server = AuthSMTPServer(starttls=True)
        result = self.send(server, "--cafile", TLS_CERT)
        self.assertSent(server, result)
        self.assertEqual(server.auths, [("PLAIN", True, True)])

    def test_login_is_the_fallback_inside_tls(self):
        server = AuthSMTPServer(mechanisms=("CRAM-MD5", "LOGIN"), starttls=True)
        result = self.send(server, "--cafile", TLS_CERT, "--auth")
        self.assertSent(server, result)
        self.assertEqual(server.auths, [("LOGIN", True, True)])

    def test_implicit_tls_on_both_connections(self):
        smtp = AuthSMTPServer(implicit=True)
        pop = ImplicitTLSPOP3Server([["From: bob@example.org", "Subject: Over TLS", "", "secret"]])
        self.addCleanup(pop.close)
        result = self.send(smtp, "--implicit-tls", "--cafile", TLS_CERT)
        self.assertSent(smtp, result)
        self.assertEqual(smtp.auths, [("PLAIN", True, True)])
        self.assertNotIn("STARTTLS", smtp.commands)
        read = run_client(ALICE + "b\nRETR 1\nQUIT\n", closed_port(), pop.port, "127.0.0.1",
                          "--implicit-tls", "--cafile", TLS_CERT)
        self.assertClean(read)
        self.assertIn("secret", message_lines(read, 1))
        self.assertNotIn("STLS", pop.received)
        self.assertNotIn("CAPA", pop.received)

    def test_implicit_tls_checks_the_certificate_with_the_system_defaults(self):
        server = AuthSMTPServer(implicit=True)
        result = self.send(server, "--implicit-tls")
        self.assertClean(result)
        self.assertNotIn(SENT, result.stdout)
        # One line that says what to do, not OpenSSL's bare CERTIFICATE_VERIFY_FAILED.
        self.assertRegex(result.stdout, r"Error: TLS with the SMTP server 127.0.0.1 port \d+ "
                                        r"failed: its certificate could not be verified "
                                        r"\(self[- ]signed certificate\); .*--cafile FILE "
                                        r"\(the server's certificate or its CA\)\n")
        self.assertEqual(server.delivered, [])

    def test_auth_option_with_a_server_without_auth_is_a_clear_error(self):
        server = StandardSMTPServer()
        result = self.send(server, "--auth")
        self.assertClean(result)
        self.assertIn("Error: the SMTP server 127.0.0.1 port %d offers no AUTH, so the client "
                      "cannot log in" % server.port, result.lines)



# --------------------------------------------------------------------------
# The pure parts, one by one
# --------------------------------------------------------------------------

class SafeFilenameTest(unittest.TestCase):
    """Attachment names cannot leave the folder, hide, steer a terminal or pass a length limit."""

    def name(self, text, content_type="application/octet-stream"):
        return client.safe_filename(text, 3, content_type)

    def test_path_parts_and_dots_are_dropped(self):
        self.assertEqual(self.name("../../evil.sh"), "evil.sh")
        self.assertEqual(self.name("..\\..\\windows\\evil.exe"), "evil.exe")
        self.assertEqual(self.name("/etc/passwd"), "passwd")
        self.assertEqual(self.name(".bashrc"), "bashrc")
        self.assertEqual(self.name("notes. . "), "notes")

    def test_nothing_left_gets_a_numbered_name(self):
        for text in (None, "", "..", "../", "...", " . ", "\x00\x1b"):
            with self.subTest(text=text):
                self.assertEqual(self.name(text, "application/pdf"), "attachment-3.pdf")
        self.assertEqual(self.name(None, "x-unknown/x-unknown"), "attachment-3.bin")

    def test_control_and_invisible_characters_are_dropped(self):
        self.assertEqual(self.name("a\x1b[31mb\r\n.txt"), "a[31mb.txt")
        self.assertEqual(self.name("invoice\u202efdp.exe"), "invoicefdp.exe")   # no right-to-left trick

    def test_windows_cannot_be_tricked_either(self):
        self.assertEqual(self.name('a<b>c:d"e|f?g*h.txt'), "a_b_c_d_e_f_g_h.txt")
        self.assertEqual(self.name("CON.txt"), "_CON.txt")
        self.assertEqual(self.name("lpt1"), "_lpt1")

    def test_long_names_are_cut_and_keep_their_extension(self):
        for stem in ("x" * 300, "\u00e4" * 300):
            with self.subTest(stem=stem[0]):
                name = self.name(stem + ".pdf")
                self.assertTrue(name.endswith(".pdf"), name)
                self.assertLessEqual(len(name.encode("utf-8")), client.MAX_FILENAME_BYTES)
        self.assertLessEqual(len(self.name("a." + "b" * 300).encode("utf-8")), client.MAX_FILENAME_BYTES)

    def test_write_new_file_takes_the_next_free_name(self):
        folder = temporary_folder(self)
        paths = [client.write_new_file(folder, "a.txt", b"%d" % i) for i in range(3)]
        self.assertEqual([os.path.basename(p) for p in paths], ["a.txt", "a-1.txt", "a-2.txt"])
        with open(paths[0], "rb") as f:
            self.assertEqual(f.read(), b"0")


class ReplyHeadersTest(unittest.TestCase):
    """Subject, addresses and threading headers of a reply."""

    def read(self, *header_lines):
        return client.ReadMail([line.encode("utf-8") for line in header_lines + ("", "body")])

    def test_re_is_added_once(self):
        for subject, expected in (("Lunch", "Re: Lunch"), ("Re: Lunch", "Re: Lunch"),
                                  ("RE: re:Lunch", "Re: Lunch"), ("Re[2]: Lunch", "Re: Lunch"),
                                  ("", "Re:"), ("Re: " + "s" * 160, "Re: " + "s" * 146),
                                  ("Are you there", "Re: Are you there")):
            with self.subTest(subject=subject):
                self.assertEqual(client.reply_subject(subject), expected)

    def test_from_is_the_login_at_the_domain_it_was_sent_to(self):
        mail = self.read("From: bob@example.org", "To: Team <team@other.example>, ALICE@Lab.Example",
                         "Subject: s")
        lines, threading = client.reply_draft(mail, "alice")
        self.assertEqual(lines, ["From: alice@Lab.Example", "To: bob@example.org", "Subject: Re: s"])
        self.assertEqual(threading, [])   # no Message-ID: nothing to thread on

    def test_references_grow_and_stay_bounded(self):
        earlier = " ".join("<%d@x.example>" % i for i in range(30))
        mail = self.read("From: bob@example.org", "To: alice@example.org", "Subject: s",
                         "Message-ID: <last@x.example>", "References: " + earlier)
        _, threading = client.reply_draft(mail, "alice")
        self.assertEqual(threading[0], ("In-Reply-To", ["<last@x.example>"]))
        references = threading[1][1]
        self.assertEqual(len(references), client.MAX_REFERENCES)
        self.assertEqual(references[-2:], ["<29@x.example>", "<last@x.example>"])

    def test_a_message_without_a_usable_sender_cannot_be_answered(self):
        mail = self.read("From: undisclosed-recipients:;", "To: alice@example.org", "Subject: s")
        with self.assertRaises(client.ReplyError):
            client.reply_draft(mail, "alice")


class TextTest(unittest.TestCase):
    """HTML to text, the terminal width and the choice of AUTH mechanism."""

    def test_html_text_keeps_link_texts_and_decodes_entities(self):
        self.assertEqual(client.html_to_text(
            "<p>Caf&eacute; &lt;open&gt;</p><ul><li>one<li><a href='mailto:x@y.example'>mail</a>"
            "</ul><p><a href='https://a.example'>https://a.example</a> <a href='#top'>top</a>"),
            ["Caf\u00e9 <open>", "", "* one", "* mail [x@y.example]", "", "https://a.example top"])

    def test_broken_html_never_raises(self):
        for markup in ("<", "<a href=", "<!", "<![CDATA[", "</p></p><<<>>>&#xffffffff;", "\x00<b>"):
            with self.subTest(markup=markup):
                self.assertIsInstance(client.html_to_text(markup), list)

    def test_subjects_are_cut_to_the_width_with_an_ellipsis(self):
        self.assertEqual(client.cut_to_width("abcdef", 6), "abcdef")
        self.assertEqual(client.cut_to_width("abcdef", 4), "abc\u2026")
        self.assertEqual(client.cut_to_width("\u65e5\u672c\u8a9e", 5), "\u65e5\u672c\u2026")
        self.assertEqual(client.cut_to_width("abc", 0), "\u2026")

    def test_mechanism_choice(self):
        choose = client.choose_mechanism
        self.assertEqual(choose(["PLAIN", "LOGIN", "CRAM-MD5"], False, False), "CRAM-MD5")
        self.assertEqual(choose(["PLAIN", "LOGIN", "CRAM-MD5"], True, False), "PLAIN")
        self.assertEqual(choose(["LOGIN", "CRAM-MD5"], True, False), "LOGIN")
        self.assertEqual(choose(["CRAM-MD5"], True, False), "CRAM-MD5")
        self.assertEqual(choose(["LOGIN"], False, True), "LOGIN")
        for offered in (["PLAIN"], ["LOGIN", "PLAIN"]):
            with self.assertRaisesRegex(client.ClientError, "--insecure"):
                choose(offered, False, False)
        with self.assertRaisesRegex(client.ClientError, "XOAUTH2"):
            choose(["XOAUTH2"], True, True)


class MangledMessagesTest(unittest.TestCase):
    """Hundreds of damaged copies of the test messages: reading them never raises."""

    JUNK = [b"=?", b"?=", b"=?utf-8?b?", b"=?utf\xe9-8?q?x?=", b"\x00", b"\xff\xfe", b"--", b";",
            b"boundary=", b"charset=", b'"', b"\n", b"\n\n", b" ", b"\t", b"=\n", b"=ZZ", b"<",
            b"&#x110000;", b"filename*=utf-8''%ff%00", b"message/rfc822", b"charset=idna",
            b"charset=zlib_codec", b"Content-Type: multipart/mixed; boundary=x\n",
            b"Content-Transfer-Encoding: base64\n"]

    def mangled(self, rng, data):
        data = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            where, what = rng.randrange(len(data) + 1), rng.random()
            if what < 0.4:
                data[where:where] = rng.choice(self.JUNK)
            elif what < 0.7:
                del data[where:where + rng.randint(1, 40)]
            else:
                data[where:where] = bytes([rng.randrange(256)])
        return bytes(data).replace(b"\r\n", b"\n").split(b"\n")

    def test_never_raises(self):
        rng = random.Random(2026)   # the same cases every run
        seeds = [build().as_bytes() for build in (quoted_printable_mail, base64_text_mail,
                                                  html_only_mail, two_attachments_mail)]
        seeds += [BROKEN_BASE64, UNKNOWN_CHARSET]
        for case in range(400):
            lines = self.mangled(rng, rng.choice(seeds))
            with self.subTest(case=case):
                mail = client.ReadMail(lines)
                mail.shown_lines()
                mail.searchable_lines()
                for attachment in mail.attachments:
                    attachment.describe()
                try:
                    client.reply_draft(mail, "alice")
                except client.ReplyError:
                    pass
                client.summarize(1, [client.decode_text(line) for line in lines])


# --------------------------------------------------------------------------
# HELP, the terminal listing, end of input
# --------------------------------------------------------------------------

class HelpAndInputTest(ClientTestCase):

    @classmethod
    def setUpClass(cls):
        cls.pop = NoTopPOP3Server([["From: bob@example.org", "To: alice@example.org",
                                    "Subject: " + "A very long subject " * 8, "Hi"]])

    @classmethod
    def tearDownClass(cls):
        cls.pop.close()

    def test_help_describes_every_command(self):
        result = run_client(ALICE + "b\nHELP\nQUIT\n", closed_port(), self.pop.port)
        self.assertClean(result)
        verbs = sorted(name[3:] for name in dir(client.MailManagement) if name.startswith("do_"))
        self.assertEqual(verbs, ["DELE", "HELP", "LIST", "QUIT", "RAW", "REPLY", "RETR", "RSET",
                                 "SAVE", "SEARCH", "STAT"])
        for verb in verbs:
            rows = [line for line in result.lines if re.match(r"  %s\b.*?\s{2,}\S" % verb, line)]
            self.assertTrue(rows, "HELP has no line describing %s" % verb)
        # In a pipe the listing is never cut.
        self.assertIn("A very long subject " * 7 + "A very long subject", result.stdout)

    def test_a_hostile_encoded_word_does_not_crash_the_listing(self):
        # Found by fuzzing: email.header raised CharsetError, a traceback for the whole listing.
        pop = NoTopPOP3Server([["From: bob@example.org", "Subject: =?utf\u00e9-8?q?K=C3=A4se?=",
                                "Hi"]])
        self.addCleanup(pop.close)
        result = run_client(ALICE + "b\nRETR 1\nSEARCH hi\nQUIT\n", closed_port(), pop.port)
        self.assertClean(result)
        self.assertIn("=?utf\u00e9-8?q?K=C3=A4se?=", result.stdout)
        self.assertEqual(listed(result), [1, 1])

    def test_end_of_input_while_typing_a_reply(self):
        for typed in ("REPLY 1\n", "REPLY 1\nhalf a line"):
            with self.subTest(typed=typed):
                result = run_client(ALICE + "b\n" + typed, closed_port(), self.pop.port)
                self.assertClean(result)
                self.assertNotIn(SENT, result.stdout)

    def test_a_terminal_listing_cuts_long_subjects(self):
        try:
            import pty
            import select
        except ImportError:
            self.skipTest("no pseudo-terminals here")
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        env = dict(os.environ, COLUMNS="60", LINES="24", PYTHONIOENCODING="utf-8")
        proc = subprocess.Popen(client_command(closed_port(), self.pop.port),
                                stdin=slave, stdout=slave, stderr=slave, env=env,
                                start_new_session=True)
        os.close(slave)
        self.addCleanup(proc.wait, support.DEADLINE)
        self.addCleanup(proc.kill)
        seen = b""
        for typed, wanted in ((b"alice\n", b"Password: "), (b"wonderland\n", b"Your choice: "),
                              (b"b\n", b"Command: "), (b"QUIT\n", b"says bye")):
            os.write(master, typed)
            while wanted not in seen:
                ready, _, _ = select.select([master], [], [], support.DEADLINE)
                self.assertTrue(ready, "terminal never showed %r: %r" % (wanted, seen))
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the client closed the terminal
                    chunk = b""
                self.assertTrue(chunk, "terminal closed before %r: %r" % (wanted, seen))
                seen += chunk
        self.assertEqual(proc.wait(support.DEADLINE), 0)
        rows = [line for line in seen.decode("utf-8").splitlines() if line.startswith("  1  ")]
        self.assertEqual(len(rows), 1, seen)
        self.assertTrue(rows[0].endswith("\u2026"), rows[0])
        self.assertEqual(len(rows[0]), 59)


if __name__ == "__main__":
    unittest.main()
