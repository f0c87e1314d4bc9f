"""Tests of mail_client.py for real-world mail: MIME reading, RAW, SAVE, SEARCH, REPLY.

Messages are built with email.message.EmailMessage and delivered through the real SMTP server.
"""

import importlib.util
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import unittest
from email.message import EmailMessage

try:
    from tests import support
    from tests import test_client as client_helpers
except ImportError:  # run from inside tests/
    import support
    import test_client as client_helpers

ALICE = client_helpers.ALICE
SENT = client_helpers.SENT
INCORRECT = client_helpers.INCORRECT
run_client = client_helpers.run_client
closed_port = client_helpers.closed_port
mail = client_helpers.mail
FakeServer = client_helpers.FakeServer
NoTopPOP3Server = client_helpers.NoTopPOP3Server
StandardSMTPServer = client_helpers.StandardSMTPServer

ROW = re.compile(r"\s*(\d+)  ")


def load_client_module():
    """mail_client.py as a module, for its pure functions (it imports nothing from the servers)."""
    spec = importlib.util.spec_from_file_location("mail_client_under_test", support.CLIENT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = load_client_module()


def run_client_in(folder, stdin, smtp_port, pop_port, *extra):
    """run_client, but started in folder (where SAVE writes by default)."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run(client_helpers.client_command(smtp_port, pop_port, "127.0.0.1", *extra),
                          input=stdin.encode("utf-8"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=support.DEADLINE, env=env, cwd=folder)
    return client_helpers.Result(proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                 proc.stderr.decode("utf-8", "replace"))


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
        self.check(["", "x"], [], ["", "x"])

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


class IndentedFirstBodyLineSearchTest(client_helpers.ClientTestCase):
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



class MimeThroughServersTest(support.BothServersTestCase, client_helpers.ClientTestCase):
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
        return run_client_in(folder, ALICE + "b\n" + "".join(c + "\n" for c in commands),
                             smtp_port or self.smtp.port, self.pop.port)

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
                             "SEARCH tlhIngan", "QUIT")
        self.assertClean(result)
        self.assertEqual(listed(result)[6:], [QP, B64, HTML, HTML, CHARSET])
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
    """HTML to text and the terminal width."""

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


# --------------------------------------------------------------------------
# HELP, the terminal listing, end of input
# --------------------------------------------------------------------------

class HelpAndInputTest(client_helpers.ClientTestCase):

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
        verbs = sorted(name[3:] for name in dir(client.Mailbox) if name.startswith("do_"))
        self.assertEqual(verbs, ["DELE", "HELP", "LIST", "QUIT", "RAW", "REPLY", "RETR", "RSET",
                                 "SAVE", "SEARCH", "STAT"])
        for verb in verbs:
            rows = [line for line in result.lines if re.match(r"  %s\b.*?\s{2,}\S" % verb, line)]
            self.assertTrue(rows, "HELP has no line describing %s" % verb)
        # In a pipe the listing is never cut.
        self.assertIn("A very long subject " * 7 + "A very long subject", result.stdout)

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
        proc = subprocess.Popen(client_helpers.client_command(closed_port(), self.pop.port),
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
