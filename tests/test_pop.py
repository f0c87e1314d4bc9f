"""Tests of pop_server.py: contract section 3 through real sockets and poplib, plus the mailbox code."""

import os
import poplib
import re
import smtplib
import socket
import sys
import tempfile
import threading
import time
import types
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from support import PopClient  # noqa: E402

import mailserver_smtp  # noqa: E402
import pop_server  # noqa: E402

PASSWORD = "open-Sesame_42"   # mixed case: passwords are compared exactly
RECEIVED = "Received: 2026-11-28 : 14 : 05"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def stored(subject, body=(b"hello",), sender="alice@example.org", headers=None):
    """A message as the mailbox stores it: dot-stuffed lines ending in \\n, then '.'."""
    if headers is None:
        headers = [b"From: " + sender.encode(), b"To: bob@example.org",
                   b"Subject: " + subject.encode("utf-8"), RECEIVED.encode()]
    lines = list(headers) + [line if isinstance(line, bytes) else line.encode("utf-8")
                             for line in body]
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\n" for line in stuffed) + b".\n"


def wire(message):
    """What RETR must send after the +OK line for a stored message."""
    return message[:-2].replace(b"\n", b"\r\n") + b".\r\n"


def octets(message):
    """The RFC 1939 size of a stored message: CRLF line ends, byte-stuffing undone."""
    lines = message[:-2].split(b"\n")[:-1]
    return sum(len(line[1:] if line.startswith(b".") else line) + 2 for line in lines)


def append_delivered(root, login, data):
    """Append to a mailbox the way the SMTP server does: under the delivery lock, fsync'd."""
    path = support.mailbox_path(root, login)
    with mailserver_smtp.delivery_lock(path):
        with open(path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


class MailRootCase(support.OneServerTestCase):
    """A mail root and one POP3 server for a whole TestCase class; fresh users per test."""

    script = support.POP_SCRIPT
    users = {}          # each test adds its own with new_user
    added = 0

    def new_user(self, content=None, password=PASSWORD):
        """Add a user (with a mailbox holding content, when given) and return its login."""
        type(self).added += 1
        login = "user%d" % type(self).added
        os.mkdir(os.path.join(self.root, login))
        if content is not None:
            with open(support.mailbox_path(self.root, login), "wb") as f:
                f.write(content)
        with open(os.path.join(self.root, "userinfo.txt"), "a") as f:
            f.write("%s\t%s\n" % (login, password))
        return login

    def mailbox(self, login):
        """The raw bytes of a user's mailbox."""
        return support.read_mailbox(self.root, login)

    def login(self, login, password=PASSWORD):
        """A raw client logged in as login (AssertionError unless the login succeeds)."""
        return PopClient(self.server, login, password)

    def wait_unlocked(self, login):
        """Wait until a new session of login can start (the old one has ended), then end it."""
        def free():
            pop, reply = support.pop_login(self.server, login, PASSWORD)
            with pop:
                if reply.startswith("+OK"):
                    pop.cmd("QUIT")
                    return True
                self.assertIn("[IN-USE]", reply)
                return False
        support.wait_for(free)


MESSAGES = [
    stored("plain", [b"line one", b"line two"]),
    stored("dots", [b".starts with a dot", b"..two dots", b".", b"middle", b"end."]),
    stored("8-bit", ["caf\u00e9 \u2603".encode("utf-8"), b"\xff\xfe latin-1 \xe9", b"", b"after blank"]),
    stored("long", [b"x" * 5000, b"tail"]),
    stored("", [b""]),
]


# --------------------------------------------------------------------------
# The dialogue of contract section 3
# --------------------------------------------------------------------------

class DialogueTest(MailRootCase):
    """Greeting, USER/PASS, STAT, LIST, RETR, DELE, RSET, NOOP, QUIT, as the contract shows."""

    server_args = ("--verbose",)

    def test_greeting(self):
        """A new connection is greeted with the contract's "+OK POP3 server is ready <timestamp@domain>"."""
        with PopClient(self.server) as pop, PopClient(self.server) as other:
            # The contract's words, not pop_server.Replies.GREETING: changing the constant must fail here.
            self.assertRegex(pop.greeting, r"\A\+OK POP3 server is ready <[^<>@ ]+@[^<>@ ]+>\Z")
            self.assertNotEqual(pop.greeting, other.greeting, "RFC 1939 7: a new timestamp each time")

    def test_user_pass_then_stat_counts_every_message(self):
        """After USER and PASS, STAT gives the count and RFC 1939 octets of every message."""
        login = self.new_user(b"".join(MESSAGES))
        with PopClient(self.server) as pop:
            self.assertTrue(pop.cmd("USER " + login).startswith("+OK"))
            self.assertTrue(pop.cmd("PASS " + PASSWORD).startswith("+OK"))
            self.assertEqual(pop.cmd("STAT"), "+OK %d %d" % (
                len(MESSAGES), sum(octets(m) for m in MESSAGES)))

    def test_wrong_password_then_user_may_be_tried_again(self):
        """A wrong password gets -ERR, leaves the session unauthenticated, and USER may be tried again."""
        login = self.new_user(MESSAGES[0])
        with PopClient(self.server) as pop:
            pop.cmd("USER " + login)
            self.assertTrue(pop.cmd("PASS wrong").startswith("-ERR"))
            self.assertTrue(pop.cmd("STAT").startswith("-ERR"))
            self.assertTrue(pop.cmd("USER " + login).startswith("+OK"))
            self.assertTrue(pop.cmd("PASS " + PASSWORD).startswith("+OK"))
            self.assertEqual(pop.cmd("STAT"), "+OK 1 %d" % octets(MESSAGES[0]))

    def test_unknown_user_is_not_told_from_a_wrong_password(self):
        """An unknown or crafted login gets exactly the replies a wrong password gets."""
        login = self.new_user()
        replies = []
        for user, password in ((login, "wrong"), ("nosuchuser", PASSWORD), ("../etc", PASSWORD)):
            with PopClient(self.server) as pop:
                replies.append((pop.cmd("USER " + user), pop.cmd("PASS " + password)))
        self.assertEqual(len(set(replies)), 1, replies)
        self.assertTrue(replies[0][0].startswith("+OK"))
        self.assertTrue(replies[0][1].startswith("-ERR"))

    def test_user_name_is_case_insensitive_and_password_exact(self):
        """The login matches in any case; the password only exactly."""
        login = self.new_user()
        with PopClient(self.server) as pop:
            pop.cmd("USER " + login.upper())
            self.assertTrue(pop.cmd("PASS " + PASSWORD.upper()).startswith("-ERR"))
            pop.cmd("USER " + login.upper())
            self.assertTrue(pop.cmd("PASS " + PASSWORD).startswith("+OK"))

    def test_password_is_the_rest_of_the_pass_line(self):
        """A password with a space is the whole rest of the PASS line."""
        login = self.new_user(password="two words")
        with PopClient(self.server) as pop:
            pop.cmd("USER " + login)
            self.assertTrue(pop.cmd("PASS two").startswith("-ERR"))
            pop.cmd("USER " + login)
            self.assertTrue(pop.cmd("PASS two words").startswith("+OK"))

    def test_pass_before_user_is_refused(self):
        """PASS without a USER before it gets -ERR."""
        with PopClient(self.server) as pop:
            self.assertTrue(pop.cmd("PASS " + PASSWORD).startswith("-ERR"))

    def test_commands_before_login_get_err(self):
        """Mailbox commands before login get -ERR and change nothing; USER after login gets -ERR."""
        login = self.new_user(MESSAGES[0])
        with PopClient(self.server) as pop:
            for command in ("STAT", "LIST", "LIST 1", "RETR 1", "DELE 1", "RSET", "NOOP",
                            "TOP 1 0", "UIDL", "UIDL 1"):
                self.assertTrue(pop.cmd(command).startswith("-ERR"), command)
            pop.cmd("USER " + login)
            self.assertTrue(pop.cmd("PASS " + PASSWORD).startswith("+OK"))
            self.assertTrue(pop.cmd("USER " + login).startswith("-ERR"))
        self.assertEqual(self.mailbox(login), MESSAGES[0])

    def test_quit_before_login_says_goodbye_and_closes(self):
        """QUIT before login gets the contract's goodbye and the server closes the connection."""
        with PopClient(self.server) as pop:
            # The contract's words, not pop_server.Replies.GOODBYE: changing the constant must fail here.
            self.assertEqual(pop.cmd("QUIT"), "+OK Thanks for using POP3 server")
            self.assertTrue(pop.closed())

    def test_list_gives_every_size_and_list_n_one(self):
        """LIST lists every message's size; LIST n gives one; a number past the last gets -ERR."""
        login = self.new_user(b"".join(MESSAGES))
        with self.login(login) as pop:
            first, body = pop.multi("LIST")
            self.assertTrue(first.startswith("+OK"))
            expected = "".join("%d %d\r\n" % (i + 1, octets(m)) for i, m in enumerate(MESSAGES))
            self.assertEqual(body, (expected + ".\r\n").encode())
            for i, m in enumerate(MESSAGES):
                self.assertEqual(pop.cmd("LIST %d" % (i + 1)), "+OK %d %d" % (i + 1, octets(m)))
            self.assertTrue(pop.cmd("LIST %d" % (len(MESSAGES) + 1)).startswith("-ERR"))

    def test_retr_sends_stored_lines_with_crlf_and_the_dot(self):
        """RETR n sends "+OK <octets> octets", the stored lines with CRLF (byte-stuffed) and "."."""
        login = self.new_user(b"".join(MESSAGES))
        with self.login(login) as pop:
            for i, m in enumerate(MESSAGES):
                first, body = pop.multi("RETR %d" % (i + 1))
                self.assertEqual(first, "+OK %d octets" % octets(m))
                self.assertEqual(body, wire(m))

    def test_octet_counts_match_what_retr_sends(self):
        """LIST and RETR sizes count exactly the octets RETR sends, stuffing dots left out."""
        login = self.new_user(b"".join(MESSAGES))
        with self.login(login) as pop:
            for i in range(len(MESSAGES)):
                size = int(pop.cmd("LIST %d" % (i + 1)).split()[2])
                first, body = pop.multi("RETR %d" % (i + 1))
                lines = body.split(b"\r\n")[:-2]          # drop the dot line
                unstuffed = [line[1:] if line.startswith(b".") else line for line in lines]
                self.assertEqual(size, sum(len(line) + 2 for line in unstuffed))
                self.assertEqual(first, "+OK %d octets" % size)

    def test_dele_marks_only_and_hides_the_message(self):
        """DELE n marks a message: it is gone from STAT, LIST, UIDL, RETR and TOP, but still in the file."""
        login = self.new_user(b"".join(MESSAGES[:3]))
        with self.login(login) as pop:
            self.assertEqual(pop.cmd("DELE 2"), "+OK message 2 deleted")
            self.assertEqual(pop.cmd("STAT"), "+OK 2 %d" % (octets(MESSAGES[0]) + octets(MESSAGES[2])))
            for command in ("DELE 2", "RETR 2", "LIST 2", "TOP 2 0", "UIDL 2"):
                self.assertTrue(pop.cmd(command).startswith("-ERR"), command)
            _, body = pop.multi("LIST")
            self.assertEqual(body, ("1 %d\r\n3 %d\r\n.\r\n" % (
                octets(MESSAGES[0]), octets(MESSAGES[2]))).encode())
            _, body = pop.multi("UIDL")
            self.assertEqual([line.split()[0] for line in body.splitlines()[:-1]], [b"1", b"3"])
            self.assertEqual(self.mailbox(login), b"".join(MESSAGES[:3]))   # only marked

    def test_dele_then_quit_removes_exactly_the_marked_messages(self):
        """QUIT removes exactly the marked messages, leaves no temporary file and keeps the file's mode."""
        login = self.new_user(b"".join(MESSAGES))
        os.chmod(support.mailbox_path(self.root, login), 0o640)
        with self.login(login) as pop:
            pop.cmd("DELE 1")
            pop.cmd("DELE 4")
            self.assertEqual(pop.cmd("QUIT"), pop_server.Replies.GOODBYE)
            self.assertTrue(pop.closed())
        self.assertEqual(self.mailbox(login), MESSAGES[1] + MESSAGES[2] + MESSAGES[4])
        leftovers = [n for n in os.listdir(os.path.join(self.root, login)) if "new" in n]
        self.assertEqual(leftovers, [])
        if os.name == "posix":         # the rewritten file keeps the old file's permissions
            self.assertEqual(os.stat(support.mailbox_path(self.root, login)).st_mode & 0o777, 0o640)

    def test_dele_rset_quit_keeps_everything(self):
        """RSET undeletes every mark of the session, so QUIT then keeps every message."""
        login = self.new_user(b"".join(MESSAGES))
        with self.login(login) as pop:
            pop.cmd("DELE 1")
            pop.cmd("DELE 2")
            self.assertEqual(pop.cmd("RSET"), "+OK maildrop has %d messages (%d octets)" % (
                len(MESSAGES), sum(octets(m) for m in MESSAGES)))
            self.assertEqual(pop.cmd("STAT").split()[1], str(len(MESSAGES)))
            first, body = pop.multi("RETR 1")
            self.assertEqual(body, wire(MESSAGES[0]))
            pop.cmd("QUIT")
        self.assertEqual(self.mailbox(login), b"".join(MESSAGES))

    def test_dele_then_dropped_connection_deletes_nothing(self):
        """A connection dropped without QUIT deletes nothing it marked."""
        login = self.new_user(b"".join(MESSAGES))
        pop = self.login(login)
        pop.cmd("DELE 1")
        pop.cmd("DELE 2")
        pop.close()
        self.wait_unlocked(login)
        self.assertEqual(self.mailbox(login), b"".join(MESSAGES))

    def test_quit_without_deletions_does_not_rewrite(self):
        """QUIT with nothing marked leaves the mailbox file as it is (same inode)."""
        login = self.new_user(b"".join(MESSAGES))
        before = os.stat(support.mailbox_path(self.root, login)).st_ino
        with self.login(login) as pop:
            pop.cmd("RETR 1")
            pop.body()
            self.assertTrue(pop.cmd("QUIT").startswith("+OK"))
        self.assertEqual(os.stat(support.mailbox_path(self.root, login)).st_ino, before)

    def test_deleting_every_message_leaves_an_empty_mailbox(self):
        """Deleting every message leaves an empty mailbox that the next session sees as empty."""
        login = self.new_user(b"".join(MESSAGES[:2]))
        with self.login(login) as pop:
            pop.cmd("DELE 1")
            pop.cmd("DELE 2")
            self.assertEqual(pop.cmd("STAT"), "+OK 0 0")
            pop.cmd("QUIT")
        self.assertEqual(self.mailbox(login), b"")
        with self.login(login) as pop:
            self.assertEqual(pop.cmd("STAT"), "+OK 0 0")

    def test_absent_mailbox_file_is_an_empty_maildrop(self):
        """A user without a my_mailbox file has an empty maildrop, not an error."""
        login = self.new_user()
        with self.login(login) as pop:
            self.assertEqual(pop.cmd("STAT"), "+OK 0 0")
            self.assertEqual(pop.multi("LIST")[1], b".\r\n")
            self.assertTrue(pop.cmd("RETR 1").startswith("-ERR"))
            self.assertTrue(pop.cmd("QUIT").startswith("+OK"))

    def test_noop(self):
        """NOOP in a session gets a bare +OK."""
        login = self.new_user()
        with self.login(login) as pop:
            self.assertEqual(pop.cmd("NOOP"), "+OK")

    def test_commands_are_case_insensitive(self):
        """Command words are taken in any case."""
        login = self.new_user(MESSAGES[0])
        with PopClient(self.server) as pop:
            self.assertTrue(pop.cmd("user " + login).startswith("+OK"))
            self.assertTrue(pop.cmd("Pass " + PASSWORD).startswith("+OK"))
            self.assertEqual(pop.cmd("stat"), "+OK 1 %d" % octets(MESSAGES[0]))

    def test_second_session_of_a_user_gets_in_use_at_once(self):
        """A second session of a logged-in user gets -ERR [IN-USE] at once; the first is unharmed."""
        login = self.new_user(MESSAGES[0])
        with self.login(login) as first:
            with PopClient(self.server) as second:
                second.cmd("USER " + login)
                started = time.monotonic()
                reply = second.cmd("PASS " + PASSWORD)
                self.assertLess(time.monotonic() - started, 2)
                self.assertTrue(reply.startswith("-ERR [IN-USE]"), reply)
                self.assertEqual(first.cmd("STAT"), "+OK 1 %d" % octets(MESSAGES[0]))
                first.cmd("QUIT")
                self.assertTrue(first.closed())
                # The same connection may log in once the first session is over.
                second.cmd("USER " + login)
                self.assertTrue(second.cmd("PASS " + PASSWORD).startswith("+OK"))

    def test_login_again_right_after_the_goodbye(self):
        """The maildrop lock is free by the time the goodbye of the previous session arrives."""
        login = self.new_user(MESSAGES[0])
        pop = self.login(login)
        try:
            for _ in range(30):
                successor = PopClient(self.server)
                successor.cmd("USER " + login)
                self.assertEqual(pop.cmd("QUIT"), pop_server.Replies.GOODBYE)
                pop.close()
                pop = successor
                # Sent the moment the goodbye arrived: the lock must already be free.
                self.assertTrue(pop.cmd("PASS " + PASSWORD).startswith("+OK"))
        finally:
            pop.close()

    def test_other_users_are_not_locked_out(self):
        """One user's session does not lock another user out."""
        one, two = self.new_user(MESSAGES[0]), self.new_user(MESSAGES[1])
        with self.login(one), self.login(two) as pop:
            self.assertEqual(pop.cmd("STAT"), "+OK 1 %d" % octets(MESSAGES[1]))

    def test_verbose_log_masks_the_password(self):
        """--verbose logs PASS with the password masked."""
        login = self.new_user()
        with self.login(login) as pop:
            pop.cmd("QUIT")
        self.server.wait_for_output(r"user %s, \d+ commands, 0 failed logins, quit" % login)
        output = self.server.output()
        self.assertIn("PASS ****", output)
        self.assertNotIn(PASSWORD, output)
        self.assertNotIn("Traceback", output)

    def test_poplib_is_a_working_client(self):
        """Python's poplib reads, lists, tops, uidls and deletes mail like any standard client."""
        # poplib refuses lines over 2048 octets, so the long-line message is left out here.
        messages = MESSAGES[:3] + MESSAGES[4:] + MESSAGES[:1]
        login = self.new_user(b"".join(messages))
        client = poplib.POP3(self.server.host, self.server.port, timeout=support.DEADLINE)
        try:
            self.assertTrue(client.getwelcome().startswith((pop_server.Replies.GREETING % "<").encode()))
            self.assertIn("UIDL", client.capa())
            client.user(login)
            client.pass_(PASSWORD)
            self.assertEqual(client.stat(), (len(messages), sum(octets(m) for m in messages)))
            _, listing, _ = client.list()
            self.assertEqual(listing, [b"%d %d" % (i + 1, octets(m)) for i, m in enumerate(messages)])
            for i, m in enumerate(messages):
                reply, lines, size = client.retr(i + 1)
                self.assertEqual(reply, b"+OK %d octets" % octets(m))
                unstuffed = [line[1:] if line.startswith(b".") else line
                             for line in m[:-2].split(b"\n")[:-1]]
                self.assertEqual(lines, unstuffed)
                self.assertEqual(sum(len(line) + 2 for line in lines), octets(m))
            _, top, _ = client.top(2, 1)
            self.assertEqual(top[-1], b".starts with a dot")
            _, uids, _ = client.uidl()
            self.assertEqual(len(set(u.split()[1] for u in uids)), len(messages))
            client.dele(3)
            self.assertEqual(client.quit(), pop_server.Replies.GOODBYE.encode())
        finally:
            client.close()
        self.assertEqual(self.mailbox(login), b"".join(messages[:2] + messages[3:]))

    def test_quit_answers_err_and_keeps_the_file_when_the_rewrite_fails(self):
        """A QUIT whose mailbox rewrite fails gets -ERR and leaves the mailbox untouched and unlocked."""
        login = self.new_user(b"".join(MESSAGES))
        blocker = os.path.join(self.root, login, ".my_mailbox.new")
        os.mkdir(blocker)               # the new mailbox cannot be created
        try:
            with self.login(login) as pop:
                pop.cmd("DELE 1")
                self.assertTrue(pop.cmd("QUIT").startswith("-ERR"))
                self.assertTrue(pop.closed())
        finally:
            os.rmdir(blocker)
        self.assertEqual(self.mailbox(login), b"".join(MESSAGES))
        self.wait_unlocked(login)


class ExtensionTest(MailRootCase):
    """CAPA, TOP, UIDL (RFC 2449, RFC 1939 optional commands) and pipelining."""

    def test_capa_in_both_states(self):
        """CAPA lists USER, TOP, UIDL, RESP-CODES and PIPELINING before and after login."""
        login = self.new_user()
        with PopClient(self.server) as pop:
            for _ in range(2):
                first, body = pop.multi("CAPA")
                self.assertTrue(first.startswith("+OK"))
                names = [line.split()[0] for line in body.decode().split("\r\n")[:-2]]
                for name in ("USER", "TOP", "UIDL", "RESP-CODES", "PIPELINING"):
                    self.assertIn(name, names)
                pop.cmd("USER " + login)
                pop.cmd("PASS " + PASSWORD)

    def test_top_sends_headers_and_n_body_lines(self):
        """TOP n k sends the header lines and the first k body lines, byte-stuffed."""
        message = stored("top", [b"one", b".two", b"three"])
        login = self.new_user(message)
        headers = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: top\r\n" \
                  + RECEIVED.encode() + b"\r\n"
        with self.login(login) as pop:
            self.assertEqual(pop.multi("TOP 1 0")[1], headers + b".\r\n")
            self.assertEqual(pop.multi("TOP 1 2")[1], headers + b"one\r\n..two\r\n.\r\n")
            self.assertEqual(pop.multi("TOP 1 99")[1], wire(message))

    def test_top_keeps_the_blank_line_of_an_rfc5322_message(self):
        """TOP of an RFC 5322 message keeps folded headers and the blank line ending them."""
        message = stored("", [b"body 1", b"body 2"], headers=[
            b"From: x@example.org", b"Subject: folded", b"  continued", b"X-Other: 1", b""])
        login = self.new_user(message)
        with self.login(login) as pop:
            self.assertEqual(pop.multi("TOP 1 0")[1],
                             b"From: x@example.org\r\nSubject: folded\r\n  continued\r\n"
                             b"X-Other: 1\r\n\r\n.\r\n")
            self.assertEqual(pop.multi("TOP 1 1")[1],
                             b"From: x@example.org\r\nSubject: folded\r\n  continued\r\n"
                             b"X-Other: 1\r\n\r\nbody 1\r\n.\r\n")

    def test_uidl_ids_are_unique_and_well_formed(self):
        """UIDL gives each message a distinct id of 1 to 70 printable characters; UIDL n gives one."""
        login = self.new_user(b"".join(MESSAGES + MESSAGES))
        with self.login(login) as pop:
            first, body = pop.multi("UIDL")
            self.assertTrue(first.startswith("+OK"))
            rows = [line.split() for line in body.decode().split("\r\n")[:-2]]
            self.assertEqual([int(r[0]) for r in rows], list(range(1, 2 * len(MESSAGES) + 1)))
            ids = [r[1] for r in rows]
            self.assertEqual(len(set(ids)), len(ids))
            for uid in ids:
                self.assertRegex(uid, r"\A[\x21-\x7e]{1,70}\Z")
            self.assertEqual(pop.cmd("UIDL 3"), "+OK 3 " + ids[2])

    def uids(self, login):
        """The UIDL ids of a login's messages, in one session ended with QUIT."""
        with self.login(login) as pop:
            _, body = pop.multi("UIDL")
            pop.cmd("QUIT")
        return [line.split()[1] for line in body.decode().split("\r\n")[:-2]]

    def test_uidl_is_the_same_in_every_session(self):
        """A message keeps its UIDL id across sessions; an appended one gets a new id."""
        login = self.new_user(b"".join(MESSAGES))
        first = self.uids(login)
        self.assertEqual(self.uids(login), first)
        append_delivered(self.root, login, MESSAGES[0])
        again = self.uids(login)
        self.assertEqual(again[:-1], first)
        self.assertNotIn(again[-1], first)

    def test_uidl_after_deleting_the_first_of_two_identical_messages(self):
        """Ids stay with their messages after deletions, and a used id is never given again."""
        twin = stored("twin", [b"same"])
        login = self.new_user(twin + twin + MESSAGES[0])
        before = self.uids(login)
        with self.login(login) as pop:
            pop.cmd("DELE 1")
            pop.cmd("QUIT")
        after = self.uids(login)
        self.assertEqual(after, before[1:])
        # A third identical message delivered later must not get a used id.
        append_delivered(self.root, login, twin)
        latest = self.uids(login)
        self.assertEqual(latest[:2], before[1:])
        self.assertNotIn(latest[2], before)

    def test_uidl_survives_a_lost_sidecar_without_reusing_ids(self):
        """Without its index sidecar a mailbox gets new ids, none of them an old one."""
        login = self.new_user(b"".join(MESSAGES[:2]))
        before = self.uids(login)
        os.remove(os.path.join(self.root, login, ".my_mailbox.index"))
        after = self.uids(login)
        self.assertEqual(len(set(after)), 2)
        self.assertFalse(set(before) & set(after))

    def test_pipelined_commands_are_answered_in_order(self):
        """Commands sent at once are answered one by one, in order."""
        login = self.new_user(b"".join(MESSAGES))
        with PopClient(self.server) as pop:
            commands = ["USER " + login, "PASS " + PASSWORD, "STAT", "LIST 2", "RETR 1",
                        "BOGUS", "DELE 1", "NOOP", "RETR 1", "QUIT"]
            pop.send("".join(c + "\r\n" for c in commands))
            self.assertTrue(pop.line().startswith("+OK"))
            self.assertTrue(pop.line().startswith("+OK"))
            self.assertTrue(pop.line().startswith("+OK %d " % len(MESSAGES)))
            self.assertEqual(pop.line(), "+OK 2 %d" % octets(MESSAGES[1]))
            self.assertEqual(pop.line(), "+OK %d octets" % octets(MESSAGES[0]))
            self.assertEqual(pop.body(), wire(MESSAGES[0]))
            self.assertTrue(pop.line().startswith("-ERR"))
            self.assertEqual(pop.line(), "+OK message 1 deleted")
            self.assertEqual(pop.line(), "+OK")
            self.assertTrue(pop.line().startswith("-ERR"))
            self.assertEqual(pop.line(), pop_server.Replies.GOODBYE)
            self.assertTrue(pop.closed())
        self.assertEqual(self.mailbox(login), b"".join(MESSAGES[1:]))

    def test_a_torn_last_message_is_set_aside_at_login_never_served(self):
        """A torn last message (no final ".") moves to .my_mailbox.torn at login and is never served."""
        torn = b"From: x@example.org\nSubject: cut\nhalf a bo"
        login = self.new_user(MESSAGES[0] + MESSAGES[1] + torn)
        with self.login(login) as pop:
            self.assertEqual(pop.cmd("STAT"), "+OK 2 %d" % (octets(MESSAGES[0]) + octets(MESSAGES[1])))
            self.assertEqual(pop.multi("RETR 2")[1], wire(MESSAGES[1]))
            self.assertTrue(pop.cmd("RETR 3").startswith("-ERR"))
            self.assertEqual(self.mailbox(login), MESSAGES[0] + MESSAGES[1])
            pop.cmd("DELE 1")
            self.assertTrue(pop.cmd("QUIT").startswith("+OK"))
        self.assertEqual(self.mailbox(login), MESSAGES[1])
        with open(os.path.join(self.root, login, ".my_mailbox.torn"), "rb") as f:
            self.assertEqual(f.read(), torn)
        self.server.wait_for_output(r"%s/my_mailbox ended in %d bytes of a message cut short" % (login, len(torn)))


class BadInputTest(MailRootCase):
    """Bad input gets -ERR; the session and the server go on."""

    def test_bad_commands_get_err_and_the_session_goes_on(self):
        """Bad numbers, unknown words, NUL, 8-bit and TLS/HTTP junk each get -ERR, and the session goes on."""
        login = self.new_user(b"".join(MESSAGES[:2]))
        bad = [b"RETR 99999999999999999999", b"LIST -1", b"TOP 1 -5", b"TOP 1", b"TOP x 1",
               b"RETR 0", b"RETR 3", b"RETR", b"RETR abc", b"RETR 1 2", b"DELE", b"DELE -1",
               "RETR \u0661".encode("utf-8"), b"UIDL 99999999999", b"LIST 1.0",
               b"XYZZY", b"", b"   ", b"\x00", b"ST\x00AT", b"\xff\xfe\xfd", b"RETR \xc3(",
               b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GET / HTTP/1.1"]
        with self.login(login) as pop:
            for command in bad:
                self.assertTrue(pop.cmd(command + b"\r\n").startswith("-ERR"), command)
                self.assertEqual(pop.cmd("NOOP"), "+OK")
            self.assertEqual(pop.cmd("STAT").split()[1], "2")
            pop.cmd("QUIT")
        self.assertEqual(self.mailbox(login), b"".join(MESSAGES[:2]))
        self.assertNotIn("Traceback", self.server.output())

    def test_lines_over_255_octets_get_err(self):
        """A command line over 255 octets (RFC 2449) gets -ERR; the session goes on."""
        login = self.new_user(MESSAGES[0])
        with self.login(login) as pop:
            self.assertEqual(pop.cmd("NOOP" + " " * 249), "+OK")             # 255 with CRLF
            self.assertTrue(pop.cmd("NOOP" + " " * 250).startswith("-ERR"))
            self.assertTrue(pop.cmd(b"RETR 1" + b"x" * 100000 + b"\r\n").startswith("-ERR"))
            self.assertEqual(pop.cmd("NOOP"), "+OK")
            self.assertTrue(pop.cmd("USER " + "a" * 300).startswith("-ERR"))
            self.assertEqual(pop.multi("RETR 1")[1], wire(MESSAGES[0]))

    def test_bare_lf_line_ends_work(self):
        """A session typed with bare LF line ends works."""
        login = self.new_user(MESSAGES[0])
        with PopClient(self.server) as pop:
            pop.send("USER %s\nPASS %s\nSTAT\n" % (login, PASSWORD))
            self.assertTrue(pop.line().startswith("+OK"))
            self.assertTrue(pop.line().startswith("+OK"))
            self.assertEqual(pop.line(), "+OK 1 %d" % octets(MESSAGES[0]))

    def test_client_that_vanishes_mid_command_leaves_the_server_working(self):
        """A client that disconnects in the middle of a command leaves the server and the lock working."""
        login = self.new_user(MESSAGES[0])
        for data in (b"USER " + login.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\nRETR",
                     b"\xff" * 1000, b"USER x"):
            with PopClient(self.server) as pop:
                pop.send(data)
        self.wait_unlocked(login)
        with self.login(login) as pop:
            self.assertEqual(pop.multi("RETR 1")[1], wire(MESSAGES[0]))


class LimitsTest(MailRootCase):
    """The idle timeout."""

    server_args = ("--timeout", "1")

    def test_idle_session_is_closed_and_deletes_nothing(self):
        """An idle session is closed after --timeout, deletes nothing it marked, and is logged as timed out."""
        login = self.new_user(b"".join(MESSAGES[:2]))
        pop = self.login(login)
        pop.cmd("DELE 1")
        started = time.monotonic()
        self.assertTrue(pop.closed())         # blocks until the server gives up on us
        self.assertLess(time.monotonic() - started, support.DEADLINE)
        pop.close()
        self.wait_unlocked(login)
        self.assertEqual(self.mailbox(login), b"".join(MESSAGES[:2]))
        self.server.wait_for_output(r"user %s, \d+ commands, \d+ failed logins, timed out" % login)


class ConnectionLimitTest(MailRootCase):
    """The connection limit (with a long idle timeout, so no session ends by itself)."""

    server_args = ("--max-connections", "3", "--max-per-client", "3")

    def test_one_connection_too_many_gets_sys_temp_and_is_closed(self):
        """One connection over --max-connections gets -ERR [SYS/TEMP] and is closed; ended sessions free slots."""
        clients = [PopClient(self.server) for _ in range(3)]
        try:
            extra = self.server.connect()
            self.assertRegex(extra.line(), r"^-ERR \[SYS/TEMP\]")
            self.assertTrue(extra.closed())
            extra.close()
        finally:
            for pop in clients:
                pop.close()
        # Slots come back once the sessions end.
        def served():
            with PopClient(self.server) as pop:
                return pop.greeting.startswith("+OK")
        support.wait_for(lambda: self._try(served))

    @staticmethod
    def _try(check):
        try:
            return check()
        except (EOFError, OSError):
            return False


# --------------------------------------------------------------------------
# Crashes, signals, addresses
# --------------------------------------------------------------------------

class ProcessTest(unittest.TestCase):
    """Each test runs its own server processes."""

    def setUp(self):
        self.root = support.make_mail_root({"alice": PASSWORD})
        self.servers = []

    def tearDown(self):
        for server in self.servers:
            server.close()
        support.remove_mail_root(self.root)

    def start(self, *args, host="127.0.0.1"):
        """Start a POP3 server of this test's own, stopped after it."""
        server = support.ServerProcess(support.POP_SCRIPT, self.root, *args, host=host)
        self.servers.append(server)
        return server

    def test_kill_9_mid_session_leaves_no_lock_and_an_intact_mailbox(self):
        """A server killed mid-session leaves no stale lock and the mailbox as it was."""
        content = b"".join(MESSAGES)
        with open(support.mailbox_path(self.root, "alice"), "wb") as f:
            f.write(content)
        server = self.start()
        pop = PopClient(server, "alice", PASSWORD)
        pop.cmd("DELE 1")
        pop.cmd("DELE 2")
        server.kill()
        pop.close()
        again = self.start()
        with PopClient(again, "alice", PASSWORD) as pop:       # asserts the login is accepted at once
            self.assertEqual(pop.cmd("STAT").split()[1], str(len(MESSAGES)))
        self.assertEqual(support.read_mailbox(self.root, "alice"), content)

    def test_sigterm_exits_cleanly(self):
        """SIGTERM ends the server with exit code 0 and no traceback."""
        server = self.start()
        pop = PopClient(server, "alice", PASSWORD)
        self.assertEqual(server.terminate(), 0)
        pop.close()
        self.assertIn("listening on 127.0.0.1 port %d" % server.port, server.output())
        self.assertNotIn("Traceback", server.output())

    @support.skip_unless_ipv6
    def test_ipv6_loopback(self):
        """The server listens on ::1 and serves a session there."""
        server = self.start(host="::1")
        self.assertIn("listening on ::1 port", server.output())
        with PopClient(server, "alice", PASSWORD) as pop:
            self.assertEqual(pop.cmd("STAT"), "+OK 0 0")

    def test_help_and_bad_arguments(self):
        """--help lists the options; a bad port exits with 2 and no traceback."""
        import subprocess
        import sys
        done = subprocess.run([sys.executable, support.POP_SCRIPT, "--help"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=support.DEADLINE)
        self.assertEqual(done.returncode, 0)
        for option in (b"--host", b"--root", b"--timeout", b"--max-connections", b"--verbose"):
            self.assertIn(option, done.stdout)
        done = subprocess.run([sys.executable, support.POP_SCRIPT, "99999"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=support.DEADLINE)
        self.assertEqual(done.returncode, 2)
        self.assertNotIn(b"Traceback", done.stderr)


# --------------------------------------------------------------------------
# Delivery during a session, many users
# --------------------------------------------------------------------------

class ConcurrencyTest(MailRootCase):
    """SMTP delivering while a session deletes and quits; many users at once."""

    def test_mail_appended_during_a_deleting_session_survives(self):
        """Mail appended while a session deletes and quits is all kept after the rewrite."""
        original = [stored("old %d" % i, [b"body %d" % i]) for i in range(6)]
        login = self.new_user(b"".join(original))
        new = [stored("new %d" % i, [b"x" * (i * 37 % 500), b".dot %d" % i]) for i in range(60)]
        delivered = threading.Event()
        halfway = threading.Event()

        def deliver():
            for i, message in enumerate(new):
                append_delivered(self.root, login, message)
                if i == 20:
                    halfway.set()
            delivered.set()

        with self.login(login) as pop:
            self.assertEqual(pop.cmd("STAT").split()[1], "6")
            thread = threading.Thread(target=deliver)
            thread.start()
            try:
                self.assertTrue(halfway.wait(support.DEADLINE))
                for n in (1, 3, 6):
                    pop.cmd("DELE %d" % n)
                self.assertEqual(pop.cmd("STAT").split()[1], "3")    # the login snapshot
                self.assertTrue(pop.cmd("QUIT").startswith("+OK"))
            finally:
                thread.join(support.DEADLINE)
        self.assertTrue(delivered.is_set())
        kept = [original[1], original[3], original[4]]
        self.assertEqual(self.mailbox(login), b"".join(kept + new))

    def test_smtp_server_delivering_during_a_deleting_session(self):
        """Mail the real SMTP server delivers while a session deletes and quits is never lost."""
        login = self.new_user(b"".join(MESSAGES[:3]))
        smtp_server = support.ServerProcess(support.SMTP_SCRIPT, self.root)
        try:
            def send(count, tag):
                client = smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=support.DEADLINE)
                client.helo("test.example")
                for i in range(count):
                    client.sendmail("alice@example.org", ["%s@example.org" % login],
                                    "From: alice@example.org\r\nTo: %s@example.org\r\n"
                                    "Subject: %s %d\r\n\r\n.leading dot\r\nbody\r\n" % (login, tag, i))
                client.quit()

            send(2, "before")
            with self.login(login) as pop:
                count = int(pop.cmd("STAT").split()[1])
                self.assertEqual(count, 5)
                sender = threading.Thread(target=send, args=(15, "during"))
                sender.start()
                pop.cmd("DELE 1")
                pop.cmd("DELE 4")
                # Some mail lands during the session; the rest races with the rewrite.
                support.wait_for(lambda: b"Subject: during 2\n" in self.mailbox(login))
                self.assertTrue(pop.cmd("QUIT").startswith("+OK"))
                sender.join(support.DEADLINE)
            send(1, "after")
        finally:
            smtp_server.close()
        data = self.mailbox(login)
        self.assertTrue(data.startswith(MESSAGES[1] + MESSAGES[2]), data[:300])
        self.assertNotIn(MESSAGES[0], data)
        subjects = re.findall(rb"^Subject: (\w+ \d+)$", data, re.M)
        self.assertEqual(sorted(subjects), sorted(
            [b"before 1"] + [b"during %d" % i for i in range(15)] + [b"after 0"]))
        self.assertEqual(data.count(b"\n.\n") + data.startswith(b".\n"), 2 + 17)
        with self.login(login) as pop:
            self.assertEqual(pop.cmd("STAT").split()[1], "19")

    def test_twenty_users_at_once(self):
        """Twenty users logged in at once each read and delete their own mail."""
        logins = [self.new_user(b"".join(stored("%d-%d" % (u, i), [b"for %d" % u]) for i in range(5)))
                  for u in range(20)]
        barrier = threading.Barrier(20)
        failures = []

        def session(login):
            try:
                client = poplib.POP3(self.server.host, self.server.port, timeout=support.DEADLINE)
                client.user(login)
                client.pass_(PASSWORD)
                barrier.wait(support.DEADLINE)        # all twenty logged in together
                for i in range(5):
                    client.retr(i + 1)
                client.dele(2)
                client.quit()
            except Exception as exc:       # reported by the main thread
                failures.append((login, exc))

        threads = [threading.Thread(target=session, args=(login,)) for login in logins]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(support.DEADLINE)
        self.assertEqual(failures, [])
        for u, login in enumerate(logins):
            self.assertEqual(self.mailbox(login), b"".join(
                stored("%d-%d" % (u, i), [b"for %d" % u]) for i in (0, 2, 3, 4)))


# --------------------------------------------------------------------------
# The mailbox and its sidecar, driven directly (crash windows cannot be hit by timing)
# --------------------------------------------------------------------------

class MaildropFileTest(unittest.TestCase):
    """Index cache, unique ids and the QUIT rewrite of pop_server.Maildrop."""

    def setUp(self):
        self.root = support.make_mail_root({"alice": PASSWORD})
        self.path = support.mailbox_path(self.root, "alice")

    def tearDown(self):
        support.remove_mail_root(self.root)

    def write(self, data):
        """Replace alice's mailbox file with data."""
        with open(self.path, "wb") as f:
            f.write(data)

    def session(self):
        """alice's maildrop opened as a POP3 session opens it, closed after the test."""
        maildrop = pop_server.Maildrop(self.path)
        maildrop.open()
        self.addCleanup(maildrop.close)
        return maildrop

    def uids(self):
        """The ids of alice's messages, read in a session of their own."""
        maildrop = self.session()
        uids = [maildrop.uid(i) for i in range(maildrop.count())]
        maildrop.close()
        return uids

    def test_crash_before_the_mailbox_rename_keeps_file_and_ids(self):
        """A crash before the rewritten mailbox is renamed over leaves the file and its ids as they were."""
        twin = stored("twin", [b"same"])
        self.write(twin + twin + MESSAGES[0])
        before = self.uids()
        maildrop = self.session()
        real_replace = os.replace

        def crash(source, target):
            if target == self.path:
                raise OSError("simulated crash before the rename")
            return real_replace(source, target)

        pop_server.os.replace = crash
        try:
            with self.assertRaises(OSError):
                maildrop.commit(bytearray([1, 0, 0]))
        finally:
            pop_server.os.replace = real_replace
        self.assertEqual(support.read_mailbox(self.root, "alice"), twin + twin + MESSAGES[0])
        self.assertFalse(os.path.exists(os.path.join(self.root, "alice", ".my_mailbox.new")))
        # The sidecar already describes the new file, but the old one is still recognised.
        self.assertEqual(self.uids(), before)

    def test_commit_keeps_ids_and_the_index_of_kept_messages(self):
        """The QUIT rewrite keeps the kept messages' ids and index entries."""
        self.write(b"".join(MESSAGES))
        before = self.uids()
        maildrop = self.session()
        maildrop.commit(bytearray([0, 1, 0, 1, 0]))
        after = self.session()
        self.assertEqual([after.uid(i) for i in range(after.count())],
                         [before[0], before[2], before[4]])
        self.assertEqual(list(after.sizes), [octets(MESSAGES[i]) for i in (0, 2, 4)])
        self.assertEqual(b"".join(after.chunks(1)), MESSAGES[2][:-2])

    def test_the_index_cache_follows_appends_after_a_torn_tail_was_set_aside(self):
        """The index cache takes in appended messages after a torn tail went to .my_mailbox.torn."""
        torn = b"From: x@example.org\nSubject: cut\nhalf"
        self.write(MESSAGES[0] + torn)
        with self.assertLogs("mail", "WARNING"):
            first = self.uids()
        self.assertEqual(len(first), 1)
        self.assertEqual(support.read_mailbox(self.root, "alice"), MESSAGES[0])
        append_delivered(self.root, "alice", MESSAGES[1] + MESSAGES[2])
        maildrop = self.session()
        self.assertEqual(list(maildrop.sizes), [octets(m) for m in MESSAGES[:3]])
        self.assertEqual(b"".join(maildrop.chunks(1)), MESSAGES[1][:-2])
        self.assertEqual(maildrop.uid(0), first[0])
        self.assertEqual(len(set(maildrop.uid(i) for i in range(3))), 3)
        with open(os.path.join(self.root, "alice", ".my_mailbox.torn"), "rb") as f:
            self.assertEqual(f.read(), torn)

    def test_a_mailbox_rewritten_by_someone_else_is_indexed_again(self):
        """A mailbox replaced by another file is indexed again, its messages recognised by content."""
        self.write(MESSAGES[0] + MESSAGES[1])
        before = self.uids()
        self.write(MESSAGES[1] + MESSAGES[3])          # a new file, not an append
        maildrop = self.session()
        self.assertEqual(list(maildrop.sizes), [octets(MESSAGES[1]), octets(MESSAGES[3])])
        self.assertEqual(maildrop.uid(0), before[1])   # recognised by content
        self.assertNotIn(maildrop.uid(1), before)

    def test_a_mailbox_emptied_in_place_and_refilled_is_indexed_again(self):
        """A mailbox truncated in place and refilled with same-sized messages gets all new ids."""
        same_size = [stored("a%02d" % i, [b"body"]) for i in range(40)]
        self.write(b"".join(same_size))
        before = self.uids()
        with open(self.path, "r+b") as f:     # same inode, like ": > my_mailbox"
            f.truncate(0)
        # Same sizes, so the old message boundaries fall on new ones: only content tells.
        other = [stored("b%02d" % i, [b"body"]) for i in range(45)]
        append_delivered(self.root, "alice", b"".join(other))
        maildrop = self.session()
        self.assertEqual(list(maildrop.sizes), [octets(m) for m in other])
        self.assertFalse({maildrop.uid(i) for i in range(maildrop.count())} & set(before))

    def test_a_damaged_sidecar_starts_new_ids(self):
        """A damaged index sidecar is logged and replaced, with new ids."""
        self.write(MESSAGES[0] + MESSAGES[1])
        before = self.uids()
        sidecar = os.path.join(self.root, "alice", ".my_mailbox.index")
        with open(sidecar, "r+b") as f:
            f.seek(40)
            f.write(b"garbage\n\xff")
        with self.assertLogs("pop3", "WARNING"):
            after = self.uids()
        self.assertEqual(len(after), 2)
        self.assertFalse(set(before) & set(after))

    def test_index_reads_in_chunks_across_message_boundaries(self):
        """Indexing finds the same messages whatever the read chunk size."""
        data = b"".join(MESSAGES) + b".\n" + stored("x", [b"."]) + b"torn ."
        self.write(data)
        original = pop_server.READ_CHUNK
        try:
            for chunk in (1, 2, 3, 5, 64):
                pop_server.READ_CHUNK = chunk
                with open(self.path, "rb") as f:
                    starts, sizes, digests = pop_server.index_messages(f, 0, len(data))
                self.assertEqual(list(sizes), [octets(m) for m in MESSAGES] + [0, octets(stored("x", [b"."]))])
                self.assertEqual(starts[-1], len(data) - len(b"torn ."))
        finally:
            pop_server.READ_CHUNK = original


class ShutdownTest(unittest.TestCase):
    """Ctrl-C / SIGTERM lets a QUIT rewrite in progress finish, and starts no new one."""

    def test_shutdown_waits_for_a_rewrite_in_progress(self):
        """Shutdown waits for a rewrite in progress and refuses to start a new one."""
        root = support.make_mail_root({"alice": PASSWORD})
        self.addCleanup(support.remove_mail_root, root)
        server = pop_server.POP3Server(pop_server.parse_args(["0", "--root", root]))
        inside, release, finished = threading.Event(), threading.Event(), []

        class SlowMaildrop:
            """A maildrop whose rewrite lasts until the test releases it."""

            def commit(self, deleted):
                inside.set()
                release.wait(support.DEADLINE)
                finished.append(True)

        def quitting_session():
            """A session of server whose QUIT would now remove one message from a SlowMaildrop."""
            ours, theirs = socket.socketpair()
            self.addCleanup(ours.close)
            self.addCleanup(theirs.close)
            session = pop_server.POP3Session(server, ours, ("127.0.0.1", 1), server.listeners[0])
            session.maildrop, session.deleted = SlowMaildrop(), bytearray([1])
            return session

        rewriter = threading.Thread(target=quitting_session().update)
        rewriter.start()
        self.assertTrue(inside.wait(support.DEADLINE))
        no_second_signal = types.SimpleNamespace(hurried=False)
        stopper = threading.Thread(target=server.shutdown, args=(no_second_signal,))
        stopper.start()
        support.wait_for(lambda: server.stopping)
        self.assertTrue(stopper.is_alive())          # still waiting for the rewrite
        release.set()
        stopper.join(support.DEADLINE)
        rewriter.join(support.DEADLINE)
        self.assertFalse(stopper.is_alive())
        self.assertEqual(finished, [True])
        with self.assertRaises(OSError):              # no rewrite starts once stopping
            quitting_session().update()
        self.assertEqual(finished, [True])


class HookedServerCase(MailRootCase):
    """A MailRootCase whose server runs with the fault hooks of make_env (a support.*_env): self.flag arms them."""

    make_env = None

    @classmethod
    def setUpClass(cls):
        cls.hooks = tempfile.mkdtemp(prefix="hooks-")
        cls.server_env, cls.flag = cls.make_env(cls.hooks)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        support.remove_mail_root(cls.hooks)


class UnlockFailureTest(HookedServerCase):
    """An unlock that fails (EIO) after the QUIT rewrite: the deletions are done, so QUIT says +OK."""

    make_env = staticmethod(support.failing_unlock_env)

    def quit_failing_to_unlock(self, lock_name):
        """DELE 1 of a new user's three messages, then QUIT with the next unlock of lock_name failing.

        Returns the login and the reply to QUIT, once the server has closed the connection.
        """
        login = self.new_user(b"".join(MESSAGES[:3]))
        with self.login(login) as pop:
            pop.cmd("DELE 1")
            with open(self.flag, "w") as f:
                f.write(lock_name)
            reply = pop.cmd("QUIT")
            self.assertTrue(pop.closed())
        self.assertFalse(os.path.exists(self.flag), "the fault fired")
        return login, reply

    def assertEndedByQuit(self, login):
        """The session's one log line says it ended by QUIT, and no traceback: finish released nothing twice."""
        self.server.wait_for_output(r"user %s, \d+ commands, 0 failed logins, quit$" % login)
        self.assertNotIn("Traceback", self.server.output())

    def test_quit_says_goodbye_when_the_delivery_lock_fails_to_unlock(self):
        """EIO unlocking the delivery lock after the rewrite: QUIT says +OK, message 1 is gone, the lock is free."""
        login, reply = self.quit_failing_to_unlock(".my_mailbox.lock")
        self.assertEqual(reply, pop_server.Replies.GOODBYE)
        self.assertEqual(self.mailbox(login), MESSAGES[1] + MESSAGES[2])
        lock = mailserver_smtp.delivery_lock(support.mailbox_path(self.root, login))
        self.assertTrue(lock.acquire(blocking=False), "closing the lock file released it")
        lock.release()
        self.assertEndedByQuit(login)

    def test_quit_says_goodbye_when_the_session_lock_fails_to_unlock(self):
        """EIO unlocking the session lock at QUIT: QUIT says +OK, message 1 is gone, a new session logs in."""
        login, reply = self.quit_failing_to_unlock(".my_mailbox.pop.lock")
        self.assertEqual(reply, pop_server.Replies.GOODBYE)
        self.assertEqual(self.mailbox(login), MESSAGES[1] + MESSAGES[2])
        self.assertEndedByQuit(login)
        self.assertTrue(support.pop_can_login(self.server, login, PASSWORD))


class SharedFileSystemTest(HookedServerCase):
    """QUIT on a mail root shared by several machines (GlusterFS): a copy that misses mail deletes nothing.

    The faults are those of a client cache that lags behind another machine
    (FAULT_SHARED_FS in support.FAULTS): mail appended behind the copy's end, a size
    the copy can never reach, a stale file handle.
    """

    make_env = staticmethod(support.shared_fs_env)

    def quit_with_fault(self, fault):
        """DELE 1 of a new user's three messages, then QUIT with fault armed: (login, reply to QUIT)."""
        login = self.new_user(b"".join(MESSAGES[:3]))
        self.addCleanup(remove_if_there, self.flag)
        with self.login(login) as pop:
            pop.cmd("DELE 1")
            with open(self.flag, "wb") as f:
                f.write(fault)
            reply = pop.cmd("QUIT")
        return login, reply

    def assertNothingDeleted(self, login, reply):
        """QUIT said -ERR [SYS/TEMP], the mailbox is as it was, no new mailbox is left, and a new session works."""
        self.assertEqual(reply, pop_server.Replies.UPDATE_FAILED)
        self.assertTrue(reply.startswith("-ERR [SYS/TEMP] "))
        self.assertEqual(self.mailbox(login), b"".join(MESSAGES[:3]))
        self.assertFalse(os.path.exists(os.path.join(self.root, login, mailserver_smtp.NEW_MAILBOX_NAME)))
        self.server.wait_for_output("cannot update the mailbox of %s: " % login)
        remove_if_there(self.flag)
        with self.login(login) as pop:
            self.assertEqual(pop.cmd("STAT"), "+OK 3 %d" % sum(octets(m) for m in MESSAGES[:3]))
            pop.cmd("DELE 1")
            self.assertEqual(pop.cmd("QUIT"), pop_server.Replies.GOODBYE)
        self.assertEqual(self.mailbox(login), MESSAGES[1] + MESSAGES[2])

    def test_mail_appended_behind_the_end_the_copy_saw_is_kept(self):
        """A message that shows up only at the stat after the copy (a cached size): copied too, QUIT +OK."""
        login, reply = self.quit_with_fault(b"append " + MESSAGES[3])
        self.assertFalse(os.path.exists(self.flag), "the fault fired")
        self.assertEqual(reply, pop_server.Replies.GOODBYE)
        self.assertEqual(self.mailbox(login), MESSAGES[1] + MESSAGES[2] + MESSAGES[3])

    def test_a_size_by_path_the_copy_cannot_reach_deletes_nothing(self):
        """The path's stat says more bytes than can be read: -ERR [SYS/TEMP], the mailbox untouched."""
        login, reply = self.quit_with_fault(b"grow 100")
        size = len(b"".join(MESSAGES[:3]))
        self.server.wait_for_output("the copy ended at byte %d, the mailbox's size is %d by path and %d open"
                                    % (size, size + 100, size))
        self.assertNothingDeleted(login, reply)

    def test_a_path_that_names_another_file_deletes_nothing(self):
        """The path names another file than the one copied (a rename seen late): -ERR [SYS/TEMP], nothing deleted."""
        login, reply = self.quit_with_fault(b"inode")
        self.server.wait_for_output("the mailbox was replaced during the rewrite")
        self.assertNothingDeleted(login, reply)

    @unittest.skipUnless(os.path.isdir("/proc/self/fd"), "needs /proc to tell the new mailbox's fsync")
    def test_a_stale_file_handle_writing_the_new_mailbox_deletes_nothing(self):
        """ESTALE at the new mailbox's fsync is an I/O error like any other: -ERR [SYS/TEMP], nothing deleted."""
        login, reply = self.quit_with_fault(b"estale")
        self.assertFalse(os.path.exists(self.flag), "the fault fired")
        self.assertNothingDeleted(login, reply)


def remove_if_there(path):
    """Remove a file that may be gone already."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class LargeMessageTest(MailRootCase):
    """A message larger than the read chunk is streamed in pieces."""

    def test_retr_of_a_multi_megabyte_message(self):
        """RETR of a message larger than the read chunk sends it whole and exactly."""
        body = [b"%06d " % i + b"y" * 90 + (b"." if i % 7 == 0 else b"") for i in range(15000)]
        body[100] = b".dot-stuffed"
        message = stored("big", body)
        self.assertGreater(len(message), pop_server.READ_CHUNK)
        login = self.new_user(MESSAGES[0] + message)
        with self.login(login) as pop:
            first, received = pop.multi("RETR 2")
            self.assertEqual(first, "+OK %d octets" % octets(message))
            self.assertEqual(received, wire(message))
            self.assertEqual(pop.multi("RETR 1")[1], wire(MESSAGES[0]))

    def test_one_log_line_per_connection(self):
        """A quiet server logs one line per connection, and one for its login (contract section 5)."""
        login = self.new_user(MESSAGES[0])
        with self.login(login) as pop:
            port = pop.client.sock.getsockname()[1]
            pop.multi("RETR 1")
            pop.cmd("QUIT")
        self.server.wait_for_output(r":%d: user %s" % (port, login))
        mine = [line for line in self.server.output().splitlines() if ":%d" % port in line]
        self.assertEqual(len(mine), 2, mine)
        self.assertIn(": authentication succeeded for login %s, mechanism USER/PASS" % login, mine[0])


if __name__ == "__main__":
    unittest.main()
