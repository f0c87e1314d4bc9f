"""Contract tests: one test per CONTRACT.md sentence that the other test files leave unguarded.

Each test names the contract behaviour it guards and quotes (or paraphrases) the
sentence in its docstring. Servers are started once per TestCase class.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from support import (ALICE, ALICE_MAILBOX, BOB, LISTED_DATE, SENT, ClientTestCase,  # noqa: E402
                     FakeSMTPServer, NoTopPOP3Server, StartedServer, client_command, closed_port, deliver,
                     expect, mail, pop_can_login, pop_login, rcpt_code, reported_lines, run_client,
                     smtp_session, wait_for)

import mail_client  # noqa: E402
import pop_server  # noqa: E402

# The Received: stamp must be local time; run the SMTP server in a zone far from UTC
# (POSIX TZ syntax, no tz database needed: "TST-13:45" is UTC+13:45).
FAR_ZONE = "TST-13:45"
FAR_OFFSET = 13 * 3600 + 45 * 60
STAMP = "%Y-%m-%d : %H : %M"
SMALL_MAX = 1000   # --max-size of SMTPContractTest's server


def message_of(octets, dot_lines=0):
    """A message of exactly this many octets as RFC 1870 counts them (CRLF line ends, no
    stuffing dots), with dot_lines body lines that start with '.'; returned dot-stuffed for DATA."""
    message = b"Subject: size\r\n" + b"".join(b".%d\r\n" % i for i in range(dot_lines))
    message += b"x" * (octets - len(message) - 2) + b"\r\n"
    expect(len(message) == octets, "%d octets, not %d" % (len(message), octets))
    return message.replace(b"\r\n.", b"\r\n..")


# --------------------------------------------------------------------------
# Section 1: the mail root and userinfo.txt, through both servers
# --------------------------------------------------------------------------

# Line numbers matter: the malformed ones are reported by number.
USERINFO = (
    b"alice wonderland\n"              # 1
    b"bob builder\n"                   # 2
    b"carol \t  \tseashell\n"          # 3  several spaces and tabs between login and password
    b"#dave secret\n"                  # 4  a comment, though dave's folder exists
    b"\n"                              # 5  blank
    b"erin secret\n"                   # 6  no folder
    b".. secret\n"                     # 7  malformed: '..' is not a plain name
    b"../victim secret\n"              # 8  malformed: '/' in the login
    b"\xff\xfe\x00junk \x80\x81\n"     # 9  malformed: not a name at all (invalid UTF-8, NUL)
    b"lonelyword\n"                    # 10 malformed: no password
    b"frank\tfr\n"                     # 11 a single tab; after malformed lines: they were skipped
)
MALFORMED = [7, 8, 9, 10]
NOT_DOT_STRINGS = ("..@example.org", "../victim@example.org")   # RFC 5321 4.1.2: no leading or double dot
OUTSIDE_MESSAGE = (b"From: x@example.org\nTo: y@example.org\nSubject: outside\n"
                   b"Received: 2026-01-01 : 00 : 00\nnot yours\n.\n")


class MailRootTest(unittest.TestCase):
    """Contract section 1: which directory is the mail root, and who is a user."""

    @classmethod
    def setUpClass(cls):
        # outer/root is the mail root; outer/victim and outer/my_mailbox lie just outside it.
        cls.outer = tempfile.mkdtemp(prefix="contract-")
        cls.root = os.path.join(cls.outer, "root")
        cls.elsewhere = os.path.join(cls.outer, "elsewhere")   # an empty start directory
        for folder in ("root", "root/alice", "root/bob", "root/carol", "root/dave", "root/frank",
                       "victim", "elsewhere"):
            os.mkdir(os.path.join(cls.outer, folder))
        with open(os.path.join(cls.root, "userinfo.txt"), "wb") as f:
            f.write(USERINFO)
        for path in (os.path.join(cls.outer, "victim", "my_mailbox"), os.path.join(cls.outer, "my_mailbox")):
            with open(path, "wb") as f:
                f.write(OUTSIDE_MESSAGE)
        cls.servers = []
        try:
            # Started in the mail root, without --root ...
            cls.smtp = cls.start(support.SMTP_SCRIPT, cls.root)
            cls.pop = cls.start(support.POP_SCRIPT, cls.root)
            # ... and started elsewhere (an empty folder: no users there) with --root.
            cls.smtp_opt = cls.start(support.SMTP_SCRIPT, cls.elsewhere, "--root", cls.root)
            cls.pop_opt = cls.start(support.POP_SCRIPT, cls.elsewhere, "--root", cls.root)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def start(cls, script, cwd, *args):
        """Start a server in cwd with args, stopped with the class."""
        server = StartedServer(script, cwd, *args)
        cls.servers.append(server)
        return server

    @classmethod
    def tearDownClass(cls):
        for server in cls.servers:
            server.close()
        shutil.rmtree(cls.outer, ignore_errors=True)

    def setUp(self):
        for login in ("alice", "bob", "carol", "frank"):
            try:
                os.remove(support.mailbox_path(self.root, login))
            except FileNotFoundError:
                pass

    def both_smtp(self):
        """The SMTP servers, started in the root and with --root, with how each was started."""
        return (("started in the root", self.smtp), ("--root", self.smtp_opt))

    def both_pop(self):
        """The POP3 servers, started in the root and with --root, with how each was started."""
        return (("started in the root", self.pop), ("--root", self.pop_opt))

    def test_mail_root_is_the_start_directory_or_the_root_option(self):
        """'The mail root is the directory the servers are started in (or --root DIR).'"""
        for how, smtp in self.both_smtp():
            with self.subTest(smtp=how):
                self.assertEqual(deliver(smtp, b"Subject: via " + how.encode() + b"\r\nhi\r\n"), 250)
                self.assertIn(b"Subject: via " + how.encode() + b"\n",
                              support.read_mailbox(self.root, "alice"))
        self.assertEqual(os.listdir(self.elsewhere), [], "nothing is written in the start directory")
        for how, pop in self.both_pop():
            with self.subTest(pop=how):
                client, reply = pop_login(pop, "alice", "wonderland")
                with client:
                    self.assertTrue(reply.startswith("+OK"), reply)
                    self.assertEqual(client.cmd("STAT").split()[:2], ["+OK", "2"])
                    client.cmd("QUIT")

    def test_login_and_password_are_separated_by_one_or_more_spaces_or_tabs(self):
        """'userinfo.txt: one user a line: LOGIN<one or more spaces or tabs>PASSWORD'."""
        for how, smtp in self.both_smtp():
            with self.subTest(smtp=how):
                self.assertEqual(rcpt_code(smtp, "carol@example.org"), 250)
                self.assertEqual(rcpt_code(smtp, "frank@example.org"), 250)
        for how, pop in self.both_pop():
            with self.subTest(pop=how):
                self.assertTrue(pop_can_login(pop, "carol", "seashell"), "password after spaces and tabs")
                self.assertTrue(pop_can_login(pop, "frank", "fr"), "password after one tab")
                self.assertFalse(pop_can_login(pop, "carol", "\t  \tseashell".replace("\t", " ")))

    def test_comment_and_blank_lines_are_ignored(self):
        """'Blank lines and lines starting with # in userinfo.txt are ignored.'"""
        for how, smtp in self.both_smtp():
            with self.subTest(smtp=how):
                self.assertEqual(rcpt_code(smtp, "dave@example.org"), 550, "#dave is a comment")
        for how, pop in self.both_pop():
            with self.subTest(pop=how):
                self.assertFalse(pop_can_login(pop, "dave", "secret"))
                self.assertFalse(pop_can_login(pop, "#dave", "secret"))
        for server in self.servers:
            wait_for(lambda: reported_lines(server))
            for number in (4, 5):
                self.assertNotIn(number, reported_lines(server), "comments and blanks are not malformed")

    def test_a_user_needs_both_a_userinfo_line_and_a_folder(self):
        """'A login is a user only if it is in userinfo.txt AND its folder exists.'"""
        for how, smtp in self.both_smtp():
            with self.subTest(smtp=how):
                self.assertEqual(rcpt_code(smtp, "erin@example.org"), 550, "line but no folder")
                self.assertEqual(rcpt_code(smtp, "dave@example.org"), 550, "folder but no line")
                self.assertEqual(rcpt_code(smtp, "bob@example.org"), 250, "line and folder")
                with smtp_session(smtp) as client:
                    self.assertEqual(client.cmd("VRFY erin")[0], 550, "VRFY agrees: erin is no user")
                    self.assertEqual(client.cmd("VRFY dave")[0], 550, "VRFY agrees: dave is no user")
                    self.assertEqual(client.cmd("VRFY carol")[0], 250)
        for how, pop in self.both_pop():
            with self.subTest(pop=how):
                self.assertFalse(pop_can_login(pop, "erin", "secret"), "line but no folder")
                self.assertTrue(pop_can_login(pop, "bob", "builder"), "line and folder")
        self.assertFalse(os.path.exists(os.path.join(self.root, "erin")), "no folder is made for erin")

    def test_malformed_lines_are_reported_once_with_their_number_and_skipped(self):
        """'A malformed line is reported once with its line number and skipped; it never crashes a server.'"""
        for server in self.servers:
            # Several lookups, in several sessions, must not report the lines again.
            for _ in range(3):
                if server in (self.smtp, self.smtp_opt):
                    self.assertEqual(rcpt_code(server, "frank@example.org"), 250, "line 11 still counts")
                else:
                    self.assertTrue(pop_can_login(server, "frank", "fr"), "line 11 still counts")
            server.wait_for_output(r"userinfo\.txt line 10 ")
            self.assertEqual(reported_lines(server), MALFORMED, server.output())
            self.assertTrue(server.alive())
            self.assertNotIn("Traceback", server.output())

    def test_no_login_in_userinfo_reaches_outside_the_mail_root(self):
        """'Logins are plain names (never /, ..): no address can make a server touch a file outside the mail root.'"""
        victim = os.path.join(self.outer, "victim", "my_mailbox")
        parent_box = os.path.join(self.outer, "my_mailbox")
        for how, smtp in self.both_smtp():
            with self.subTest(smtp=how):
                self.assertEqual(rcpt_code(smtp, "victim@example.org"), 550, "a plain name, but no user")
                # Which code the two malformed addresses get: the next test; here, that they are refused.
                for address in NOT_DOT_STRINGS:
                    self.assertEqual(support.data_code_after(smtp, address), 503, address)
        for how, pop in self.both_pop():
            with self.subTest(pop=how):
                for login in ("..", "../victim", "victim"):
                    self.assertFalse(pop_can_login(pop, login, "secret"), login)
        for path in (victim, parent_box):
            with open(path, "rb") as f:
                self.assertEqual(f.read(), OUTSIDE_MESSAGE, path)
        self.assertEqual(sorted(os.listdir(self.outer)), ["elsewhere", "my_mailbox", "root", "victim"])
        self.assertEqual(sorted(os.listdir(os.path.join(self.outer, "victim"))), ["my_mailbox"])

    def test_an_address_whose_local_part_is_no_dot_string_gets_501(self):
        """Section 2 'bad syntax 501': '..' and '../victim' are no RFC 5321 Dot-string, so no address."""
        for how, smtp in self.both_smtp():
            for address in NOT_DOT_STRINGS:
                self.assertEqual(rcpt_code(smtp, address), 501, "%s (%s)" % (address, how))


# --------------------------------------------------------------------------
# Sections 1 and 2: what the SMTP server stores, and serving clients at once
# --------------------------------------------------------------------------

class MailRootMistakesTest(unittest.TestCase):
    """Section 8: 'A server started without userinfo.txt, or with a listed user who has no folder, says so in its
    log at start and whenever the file changes.'"""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="mailroot-")
        self.addCleanup(shutil.rmtree, self.root, True)

    def start(self, script):
        server = StartedServer(script, self.root, "--root", self.root)
        self.addCleanup(server.close)
        return server

    def test_a_missing_userinfo_is_said_at_start_and_once(self):
        """No userinfo.txt: one warning at start, not one per connection."""
        for script in (support.SMTP_SCRIPT, support.POP_SCRIPT):
            with self.subTest(script=os.path.basename(script)):
                server = self.start(script)
                server.wait_for_output(r"userinfo\.txt is missing: no users")
                if script == support.SMTP_SCRIPT:
                    for _ in range(3):
                        self.assertEqual(rcpt_code(server, "alice@example.org"), 550)
                else:
                    for _ in range(3):
                        self.assertFalse(pop_can_login(server, "alice", "x"))
                self.assertEqual(server.output().count("is missing"), 1, server.output())

    def test_the_course_mode_on_a_network_address_says_every_domain_is_local(self):
        """Without --local-domains on every interface: one line says that every domain is local, and how to change it."""
        server = StartedServer(support.SMTP_SCRIPT, self.root, "--root", self.root, host="0.0.0.0")
        self.addCleanup(server.close)
        server.wait_for_output(r"WARNING every domain is local .* from anyone who can reach any interface; "
                               r"give --local-domains")
        for args in ((), ("--local-domains", "example.org")):
            quiet = StartedServer(support.SMTP_SCRIPT, self.root, "--root", self.root, *args,
                                  host="127.0.0.1" if not args else "0.0.0.0")
            self.addCleanup(quiet.close)
            self.assertEqual(rcpt_code(quiet, "postmaster"), 550)   # the server is up and has read its users
            self.assertNotIn("every domain is local", quiet.output())

    def test_a_user_without_a_folder_and_a_mailbox_without_a_user_are_said_when_the_file_changes(self):
        """At start and after each change: a listed user with no folder, a folder with a mailbox but no line."""
        path = os.path.join(self.root, "userinfo.txt")
        with open(path, "wb") as f:
            f.write(b"alice wonderland\nerin secret\n")
        os.mkdir(os.path.join(self.root, "alice"))
        os.mkdir(os.path.join(self.root, "dave"))
        open(os.path.join(self.root, "dave", "my_mailbox"), "wb").close()
        os.mkdir(os.path.join(self.root, "notes"))       # a folder with no mailbox: not taken for a user
        servers = [self.start(support.SMTP_SCRIPT), self.start(support.POP_SCRIPT)]
        for server in servers:
            server.wait_for_output(r"lists user 'erin', but .* has no folder 'erin'")
            server.wait_for_output(r"folder 'dave' holds a mailbox, but userinfo\.txt has no line for it")
        with open(path, "wb") as f:
            f.write(b"alice wonderland\nerin secret\nfrank other\n")
        self.assertEqual(rcpt_code(servers[0], "alice@example.org"), 250)
        self.assertTrue(pop_can_login(servers[1], "alice", "wonderland"))
        for server in servers:
            server.wait_for_output(r"lists user 'frank', but")
            wait_for(lambda: server.output().count("lists user 'erin'") == 2)
            self.assertEqual(rcpt_code(servers[0], "alice@example.org"), 250)
            self.assertEqual(server.output().count("lists user 'erin'"), 2, "once per change, not per connection")
            self.assertNotIn("'notes'", server.output())


class SMTPContractTest(support.OneServerTestCase):
    """The SMTP server, run in a time zone far from UTC."""

    server_args = ("--max-size", str(SMALL_MAX))
    server_env = dict(os.environ, TZ=FAR_ZONE)

    def setUp(self):
        support.remove_mailboxes(self.root)

    def mailbox(self, login="alice"):
        """The raw bytes of a user's mailbox."""
        return support.read_mailbox(self.root, login)

    def test_received_is_the_servers_local_time(self):
        """'Received: is added by the SMTP server at delivery, local time, YYYY-MM-DD : HH : MM.'"""
        before = time.time()
        self.assertEqual(deliver(self.server, b"Subject: when\r\nbody\r\n"), 250)
        after = time.time()
        found = re.search(rb"\nReceived: (\d{4}-\d\d-\d\d : \d\d : \d\d)\n", self.mailbox())
        self.assertTrue(found, self.mailbox())
        local = {time.strftime(STAMP, time.gmtime(t + FAR_OFFSET)).encode() for t in (before, after)}
        utc = {time.strftime(STAMP, time.gmtime(t)).encode() for t in (before, after)}
        self.assertFalse(local & utc)   # the check below can tell local time from UTC
        self.assertIn(found.group(1), local, "the server runs with TZ=%s" % FAR_ZONE)

    def test_only_the_missing_headers_come_from_the_envelope(self):
        """'A message with no From/To/Subject gets them from the SMTP envelope' (each one that is missing)."""
        self.assertEqual(deliver(self.server, b"Subject: only a subject\r\nbody\r\n",
                                 sender="carol@example.org",
                                 recipients=("alice@example.org", "bob@example.org")), 250)
        data = self.mailbox()
        # 'an added To: names only the recipient of that copy, so no copy shows who else (Bcc) got the message'
        self.assertRegex(data, rb"\AFrom: carol@example.org\nTo: alice@example.org\n"
                               rb"Subject: only a subject\nReceived: [^\n]+\nbody\n\.\n\Z")
        self.assertRegex(support.read_mailbox(self.root, "bob"), rb"\AFrom: carol@example.org\nTo: bob@example.org\n"
                               rb"Subject: only a subject\nReceived: [^\n]+\nbody\n\.\n\Z")
        os.remove(support.mailbox_path(self.root, "alice"))
        self.assertEqual(deliver(self.server, b"From: dan@example.net\r\nSubject: has from\r\nbody\r\n",
                                 sender="bounce@example.org"), 250)
        lines = self.mailbox().split(b"\n")
        self.assertIn(b"From: dan@example.net", lines)
        self.assertIn(b"To: alice@example.org", lines)
        self.assertEqual([l for l in lines if l.startswith(b"From:")], [b"From: dan@example.net"],
                         "a From: the message has is kept, not replaced or doubled")

    def test_eight_bit_header_bytes_are_kept_as_received(self):
        """'Bytes are kept as received (UTF-8 and other 8-bit text survive unchanged)' -- in headers too."""
        subject = b"Subject: caf\xc3\xa9 \xe9t\xe9 \xff\xfe"
        self.assertEqual(deliver(self.server, subject + b"\r\nX-Latin: \xe0\xe8\r\nbody\r\n"), 250)
        data = self.mailbox()
        self.assertIn(b"\n" + subject + b"\nReceived: ", data)
        self.assertIn(b"\nX-Latin: \xe0\xe8\n", data)

    def advertised_size(self):
        """The SIZE that EHLO advertises (checked to be the --max-size given)."""
        with smtp_session(self.server) as client:
            code, lines = client.cmd("EHLO contract.test")
        sizes = [int(line[9:]) for line in lines if line[4:9] == "SIZE "]
        self.assertEqual(sizes, [SMALL_MAX])
        return sizes[0]

    def test_a_message_of_the_advertised_size_is_accepted(self):
        """'EHLO advertises SIZE <max>': a message of exactly max octets is accepted."""
        size = self.advertised_size()
        self.assertEqual(deliver(self.server, message_of(size)), 250)
        self.assertIn(b"x" * 100, self.mailbox())

    # Found by this file (04:37) and fixed in 599f598: the DATA size check left out the CRLF
    # ending the last line, so messages of max+1 and max+2 octets were accepted and stored.
    def test_a_message_larger_than_the_advertised_size_gets_552_and_is_not_stored(self):
        """'EHLO advertises SIZE <max>; a larger message gets 552 and is not stored.'"""
        size = self.advertised_size()
        for octets in (size + 1, size + 2):
            with self.subTest(octets=octets):
                self.assertEqual(deliver(self.server, message_of(octets)), 552)
                self.assertEqual(self.mailbox(), b"")

    # Found by this file (04:37) and fixed in 599f598: the stuffing dots of the wire form were
    # counted, so a message of exactly max octets with three dot-leading lines got 552.
    def test_stuffing_dots_do_not_count_towards_the_advertised_size(self):
        """'EHLO advertises SIZE <max>' (RFC 1870 size: CRLF counted, stuffing dots not): max octets pass."""
        size = self.advertised_size()
        self.assertEqual(deliver(self.server, message_of(size, dot_lines=3)), 250)
        self.assertIn(b"\n..0\n..1\n..2\n", self.mailbox())

    def test_replies_end_with_crlf_also_in_a_bare_lf_session(self):
        """'Lines end with CRLF on the wire. A session typed by hand with bare LF (e.g. nc) works too.'"""
        for eol in (b"\r\n", b"\n"):
            with self.subTest(eol=eol), self.server.connect() as client:
                raw = [client.file.readline()]
                for command in (b"EHLO contract.test", b"NOOP", b"MAIL FROM:<a@example.org>", b"BOGUS",
                                b"QUIT"):
                    client.send(command + eol)
                    raw.append(client.file.readline())
                    while raw[-1][3:4] == b"-":
                        raw.append(client.file.readline())
                self.assertEqual([line[:3] for line in raw if line[3:4] == b" "],
                                 [b"220", b"250", b"250", b"250", b"500", b"221"])
                self.assertGreater(len(raw), 7, "EHLO gave a multi-line reply")
                for line in raw:
                    self.assertTrue(line.endswith(b"\r\n") and not line.endswith(b"\r\r\n"), line)
                    self.assertNotIn(b"\r", line[:-2])

    def test_a_dot_right_after_354_ends_the_message(self):
        """'DATA -> 354 Enter mail, end with "." on a line by itself; C: ...lines... then "." -> reply.'"""
        sessions = []
        for eol in (b"\r\n", b"\n"):                  # a CRLF client, and a hand-typed bare-LF one
            client = self.server.connect(timeout=2)
            self.addCleanup(client.close)
            self.assertEqual(client.reply()[0], 220)
            for command, code in ((b"HELO t", 250), (b"MAIL FROM:<carol@example.org>", 250),
                                  (b"RCPT TO:<alice@example.org>", 250), (b"DATA", 354)):
                client.send(command + eol)
                self.assertEqual(client.reply()[0], code, command)
            client.send(b"." + eol)
            sessions.append((eol, client))
        deadline = time.monotonic() + 2
        for eol, client in sessions:                   # both wait at once: at most 2 s in all
            with self.subTest(eol=eol):
                client.sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    code = client.reply()[0]
                except socket.timeout:
                    self.fail("no reply to the lone '.' line")
                self.assertEqual(code, 250, "an empty message, stored (see the next test)")
                client.sock.settimeout(support.DEADLINE)
                client.send(b"NOOP" + eol)
                self.assertEqual(client.reply()[0], 250, "the session goes on")

    def test_an_empty_message_is_stored_with_one_empty_body_line(self):
        """Section 1: each message is stored as From, To, Subject, Received, '<body: one or more lines>', '.'."""
        with smtp_session(self.server) as client:
            self.assertEqual(client.cmd("MAIL FROM:<carol@example.org>")[0], 250)
            self.assertEqual(client.cmd("RCPT TO:<alice@example.org>")[0], 250)
            client.send(b"DATA\n.\n")
            self.assertEqual(client.reply()[0], 354)
            self.assertEqual(client.reply()[0], 250)
            self.assertEqual(client.cmd("NOOP")[0], 250)
        self.assertRegex(self.mailbox(), rb"\AFrom: carol@example.org\nTo: alice@example.org\nSubject: \n"
                                         rb"Received: [^\n]+\n\n\.\n\Z")

    def test_clients_are_served_at_once_not_one_after_another(self):
        """'Thread per connection, many clients at once.'"""
        slow = smtp_session(self.server)
        self.addCleanup(slow.close)
        self.assertEqual(slow.cmd("MAIL FROM:<slow@example.org>")[0], 250)
        self.assertEqual(slow.cmd("RCPT TO:<alice@example.org>")[0], 250)
        self.assertEqual(slow.cmd("DATA")[0], 354)
        slow.send(b"Subject: slow\r\nfirst half\r\n")
        # While the first client sits in the middle of DATA, a second one is served in full.
        fast = smtp_session(self.server, timeout=support.DEADLINE / 2)
        with fast:
            self.assertEqual(fast.cmd("MAIL FROM:<fast@example.org>")[0], 250)
            self.assertEqual(fast.cmd("RCPT TO:<bob@example.org>")[0], 250)
            self.assertEqual(fast.cmd("DATA")[0], 354)
            fast.send(b"Subject: fast\r\nquick\r\n.\r\n")
            self.assertEqual(fast.reply()[0], 250)
        self.assertIn(b"quick\n", self.mailbox("bob"))
        slow.send(b"second half\r\n.\r\n")
        self.assertEqual(slow.reply()[0], 250)
        self.assertIn(b"first half\nsecond half\n.\n", self.mailbox("alice"))


# --------------------------------------------------------------------------
# Section 3: one session per user
# --------------------------------------------------------------------------

class POPLockTest(unittest.TestCase):
    """'A second session for a user who is already logged in gets -ERR (maildrop locked).'"""

    @classmethod
    def setUpClass(cls):
        cls.root = support.make_mail_root()
        with open(support.mailbox_path(cls.root, "alice"), "wb") as f:
            f.write(OUTSIDE_MESSAGE)
        cls.first = support.ServerProcess(support.POP_SCRIPT, cls.root)
        try:
            cls.second = support.ServerProcess(support.POP_SCRIPT, cls.root)   # same mail root
        except BaseException:
            cls.first.close()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.first.close()
        cls.second.close()
        support.remove_mail_root(cls.root)

    def check_locked(self, server, user):
        """While alice is logged in on the first server, user on server gets -ERR; after her QUIT, +OK."""
        holder, reply = pop_login(self.first, "alice", "wonderland")
        with holder:
            self.assertTrue(reply.startswith("+OK"), reply)
            other, reply = pop_login(server, user, "wonderland")
            with other:
                self.assertTrue(reply.startswith("-ERR"), reply)
                self.assertTrue(holder.cmd("QUIT").startswith("+OK"))
                # Refused because of the lock, not for any other reason: now it is free.
                other.cmd("USER " + user)
                self.assertTrue(other.cmd("PASS wonderland").startswith("+OK"))
                other.cmd("QUIT")

    def test_second_session_with_the_login_in_another_case_is_locked(self):
        """A second session gets -ERR also when it spells the login in another case."""
        self.check_locked(self.first, "ALICE")

    def test_second_session_on_another_server_process_is_locked(self):
        """A second session gets -ERR also through another POP3 server on the same mail root."""
        self.check_locked(self.second, "alice")


class POPShutdownTest(support.OneServerTestCase):
    """'Messages marked with DELE disappear only when the session ends with QUIT' -- not when the server stops."""

    script = support.POP_SCRIPT

    def setUp(self):
        with open(support.mailbox_path(self.root, "alice"), "wb") as f:
            f.write(OUTSIDE_MESSAGE * 3)

    def test_marked_messages_stay_when_the_server_stops_mid_session(self):
        """DELE marks are dropped when the session ends without QUIT because the server is stopped."""
        client, reply = pop_login(self.server, "alice", "wonderland")
        with client:
            self.assertTrue(reply.startswith("+OK"), reply)
            client.send("DELE 1\r\nDELE 3\r\n")
            self.assertEqual([client.line(), client.line()], ["+OK message 1 deleted", "+OK message 3 deleted"])
            self.assertEqual(self.server.terminate(), 0)
            self.assertTrue(client.closed())
        self.assertEqual(support.read_mailbox(self.root, "alice"), OUTSIDE_MESSAGE * 3)


# --------------------------------------------------------------------------
# Section 4: the client
# --------------------------------------------------------------------------

class Refusing502SMTPServer(FakeSMTPServer):
    """The contract's SMTP dialogue, but MAIL_FROM: (the course spelling) gets 502."""

    REPLIES = dict(FakeSMTPServer.REPLIES, **{"MAIL_FROM:": ("502 Command not recognized",)})


class HangUpOnWrongPassword(NoTopPOP3Server):
    """A POP3 server that answers a wrong password with -ERR and hangs up."""

    def session(self, conn, rfile):
        """Serve as NoTopPOP3Server does, remembering the connection for readline."""
        self.conn = conn          # the client under test holds one connection at a time
        super().session(conn, rfile)

    def readline(self, rfile):
        """The next line; a PASS with a wrong password is answered with -ERR and the connection closed."""
        line = super().readline(rfile)
        if line is not None and line.upper().startswith("PASS ") and line[5:] != "wonderland":
            self.send(self.conn, "-ERR [AUTH] invalid password; closing")
            raise OSError("hung up after a failed login")
        return line


def verbs(lines):
    """The SMTP command words of the recorded lines outside DATA."""
    result, in_data = [], False
    for line in lines:
        if in_data:
            in_data = line != "."
            continue
        result.append(support.command_word(line))
        in_data = result[-1] == "DATA"
    return result


class ClientContractTest(ClientTestCase):
    """mail_client.py as a subprocess with piped input, against scripted servers."""

    @classmethod
    def setUpClass(cls):
        cls.pop = NoTopPOP3Server([["From: bob@example.org", "To: alice@example.org",
                                    "Subject: Menu test", "Received: 2026-11-28 : 10 : 00", "Hi"]])
        cls.no_port = closed_port()

    @classmethod
    def tearDownClass(cls):
        cls.pop.close()

    def test_good_mail_is_sent_with_helo_mail_from_rcpt_to_data_quit(self):
        """'A good one is sent with HELO, MAIL_FROM, RCPT_TO, DATA, QUIT and prints Mail sent successfully.'"""
        server = FakeSMTPServer()
        self.addCleanup(server.close)
        result = run_client(ALICE + mail(to="bob@example.org, carol@example.com") + "c\n",
                            server.port, self.no_port)
        self.assertClean(result)
        self.assertIn("Mail sent successfully", result.lines)   # the contract's words, not SENT
        self.assertEqual(verbs(server.received), ["HELO", "MAIL_FROM:", "RCPT_TO:", "RCPT_TO:", "DATA", "QUIT"],
                         server.received)
        self.assertIn("MAIL_FROM: <alice@example.org>", server.received)
        self.assertIn("RCPT_TO: <carol@example.com>", server.received)

    def test_mail_from_refused_with_502_is_retried_with_rfc5321_spelling(self):
        """'If a server answers 500/502 to MAIL_FROM: the client retries with MAIL FROM: / RCPT TO:.'"""
        server = Refusing502SMTPServer()
        self.addCleanup(server.close)
        result = run_client(ALICE + mail() + "c\n", server.port, self.no_port)
        self.assertClean(result)
        self.assertIn(SENT, result.lines)
        self.assertIn("MAIL FROM:<alice@example.org>", server.received)
        self.assertIn("RCPT TO:<bob@example.org>", server.received)
        self.assertNotIn("RCPT_TO: <bob@example.org>", server.received)

    def test_menu_management_and_exit_choices_in_every_spelling(self):
        """'b / 2 Mail Management, c / 3 Exit (case-insensitive; the words work too).'"""
        for choice in ("b", "B", "2", "Mail Management", "mail management", "MANAGEMENT"):
            with self.subTest(choice=choice):
                result = run_client(ALICE + choice + "\nQUIT\n", self.no_port, self.pop.port)
                self.assertClean(result)
                self.assertIn(NoTopPOP3Server.GREETING, result.lines)
                self.assertIn("Menu test", result.stdout)
        for choice in ("c", "C", "3", "Exit", "exit", "EXIT"):
            with self.subTest(choice=choice):
                # Anything after the exit choice must not be read: "a" would open Mail Sending.
                result = run_client(ALICE + choice + "\na\n", self.no_port, self.no_port)
                self.assertClean(result)
                self.assertEqual(result.stdout.count("a) Mail Sending"), 1, result.stdout)
                self.assertNotIn("From:", result.stdout)

    def test_default_ports_are_2525_and_1110(self):
        """'Default ports: SMTP 2525, POP3 1110.'"""
        host = "127.0.0.2"   # a loopback address of its own, so running servers on 2525/1110 do not matter
        try:
            smtp = FakeSMTPServer(host, 2525)
        except OSError as exc:
            self.skipTest("cannot listen on %s port 2525: %s" % (host, exc))
        self.addCleanup(smtp.close)
        try:
            pop = NoTopPOP3Server([["From: bob@example.org", "Subject: Default", "x"]], host, 1110)
        except OSError as exc:
            self.skipTest("cannot listen on %s port 1110: %s" % (host, exc))
        self.addCleanup(pop.close)
        env = dict(os.environ, PYTHONIOENCODING="utf-8")
        proc = subprocess.run([sys.executable, support.CLIENT_SCRIPT, host, "--timeout", "5"],
                              input=(ALICE + mail() + "b\nQUIT\n").encode(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=support.DEADLINE, env=env, cwd=support.REPO)
        stdout = proc.stdout.decode("utf-8", "replace")
        self.assertEqual(proc.returncode, 0, stdout + proc.stderr.decode())
        self.assertIn(SENT, stdout)
        self.assertIn("HELO", verbs(smtp.received))
        self.assertIn(NoTopPOP3Server.GREETING, stdout)
        self.assertIn("USER alice", pop.received)

    def test_password_is_kept_in_memory_only(self):
        """'Asks Username: and Password: (the password ... is kept in memory only).'"""
        password = "Pw-only-in-memory-4711"
        home = tempfile.mkdtemp(prefix="client-home-")
        self.addCleanup(shutil.rmtree, home, True)
        env = dict(os.environ, HOME=home, USERPROFILE=home, TMPDIR=home, TEMP=home, TMP=home,
                   XDG_CONFIG_HOME=os.path.join(home, ".config"), XDG_CACHE_HOME=os.path.join(home, ".cache"),
                   XDG_DATA_HOME=os.path.join(home, ".local"), PYTHONIOENCODING="utf-8",
                   PYTHONDONTWRITEBYTECODE="1")
        typed = "alice\n%s\nb\nSTAT\nQUIT\n" % password
        proc = subprocess.run(client_command(self.no_port, self.pop.port),
                              input=typed.encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=support.DEADLINE, env=env, cwd=home)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(NoTopPOP3Server.GREETING.encode(), proc.stdout)
        self.assertIn("PASS " + password, self.pop.received, "the password did reach the server")
        self.assertNotIn(password.encode(), proc.stdout + proc.stderr, "never shown")
        written = []
        for folder, _, files in os.walk(home):
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    if password.encode() in f.read():
                        written.append(path)
        self.assertEqual(written, [], "the password was written to disk")

    def test_login_is_asked_again_even_after_the_server_hangs_up(self):
        """'On failure it ... asks for the username and password again' -- also after the server hangs up."""
        # Our server closes the connection after the fifth failed login; the client must start anew.
        server = HangUpOnWrongPassword([])
        self.addCleanup(server.close)
        wrong = "alice\nwrong\n"
        # Since issue 20 the login is tried at start, before the menu, the same way.
        result = run_client(wrong * 6 + ALICE + "b\nQUIT\n", self.no_port, server.port)
        self.assertClean(result)
        failures = [line for line in result.lines if line.startswith("Error: login failed: -ERR")]
        self.assertEqual(len(failures), 6, result.stdout)
        self.assertEqual(result.stdout.count(mail_client.USERNAME_PROMPT), 7)
        self.assertEqual(server.received.count("PASS wrong"), 6, "each try reached a server")
        self.assertIn("PASS wonderland", server.received)
        self.assertEqual(server.received[-1], "QUIT")
        self.assertEqual(result.lines[-1].strip(), NoTopPOP3Server.GOODBYE)

    def test_mailbox_commands_are_case_insensitive(self):
        """'STAT, LIST, RETR n, DELE n, RSET, QUIT (case-insensitive)' -- retr, dele, rset, quit in lower case."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        with open(support.mailbox_path(root, "alice"), "w", newline="\n") as f:
            f.write(ALICE_MAILBOX)
        pop = support.ServerProcess(support.POP_SCRIPT, root)
        self.addCleanup(pop.close)
        result = run_client(ALICE + "b\nretr 1\ndele 1\nrset\ndele 2\nquit\na\n", self.no_port, pop.port)
        self.assertClean(result)
        self.assertIn("----- Message 1 -----", result.lines)        # retr
        self.assertEqual(result.lines[-1].strip(), pop_server.Replies.GOODBYE)   # quit ends it
        stored = support.read_mailbox(root, "alice")
        self.assertIn(b"Subject: Lunch on Friday\n", stored)        # rset undid dele 1
        self.assertNotIn(b"Subject: Exam results\n", stored)        # dele 2 then quit removed it


class ClientThroughServersTest(support.BothServersTestCase, ClientTestCase):
    """A mail typed into mail_client.py, delivered by the real SMTP server, listed through the real POP3 server."""

    # Found by this file (04:35) and fixed in ea64315: the client sends the course format (no
    # blank line after Subject:), so a first body line starting with blanks looked like a folded
    # Subject: continuation and was stored before Received: and listed as part of the subject.
    def test_a_first_body_line_starting_with_blanks_stays_body(self):
        """Section 4.3: everything after Subject: is the body; section 1: stored as Subject, Received, body."""
        smtp, pop = self.servers
        sent = run_client(ALICE + mail(subject="Lunch", body=["    Indented greeting", "second"])
                          + "c\n", smtp.port, pop.port)
        self.assertClean(sent)
        self.assertIn(SENT, sent.lines)
        listed = run_client(BOB + "b\nQUIT\n", smtp.port, pop.port)
        self.assertClean(listed)
        self.assertRegex(support.read_mailbox(self.root, "bob"),
                         rb"\AFrom: alice@example.org\nTo: bob@example.org\nSubject: Lunch\n"
                         rb"Received: [^\n]+\n    Indented greeting\nsecond\n\.\n\Z")
        self.assertRegex(listed.stdout, r"\n\s*1  alice@example.org  %s  Lunch\n" % LISTED_DATE)


if __name__ == "__main__":
    unittest.main()
