"""Tests of what both servers share: the mailbox format rules, the lock protocol, the wire."""

import ast
import errno
import io
import logging
import os
import sys
import tempfile
import unittest
import unittest.mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402

import mail_client  # noqa: E402
import mailserver_smtp  # noqa: E402

QUICK = 3.0    # seconds: a reply owed now must not wait for a read to time out


def stored_lines(root, login):
    """The messages of a mailbox file, each as its stored lines (without the final '.')."""
    return [message.split(b"\n")[:-1] for message in support.stored_messages(root, login)]


class PartBoundaryTest(unittest.TestCase):
    """mailserver_smtp.py's promise: pop_server.py needs only Part 1, and Part 1 knows nothing of Part 2."""

    BANNER = "#   PART 2: THE SMTP SERVER"
    PART_2_MODULES = "# Part 2's modules:"     # the comment over Part 2's group of imports, at the top

    @classmethod
    def setUpClass(cls):
        with open(os.path.join(support.REPO, "mailserver_smtp.py"), encoding="utf-8") as f:
            source = f.read()
        line_of = lambda text: source[:source.index(text)].count("\n") + 1
        cls.split, modules = line_of(cls.BANNER), line_of(cls.PART_2_MODULES)
        cls.tree = ast.parse(source)
        cls.part1, cls.part2 = set(), set()     # the names each part defines (or imports) at the top level
        for node in cls.tree.body:
            in_part2 = node.lineno >= cls.split or (node.lineno > modules and isinstance(node, ast.Import))
            (cls.part2 if in_part2 else cls.part1).update(cls.defined(node))

    @staticmethod
    def defined(node):
        """The top-level names a statement binds (modules imported included)."""
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            return {node.name}
        if isinstance(node, ast.Import):
            return {alias.asname or alias.name.split(".")[0] for alias in node.names}
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}

    def test_the_banner_splits_the_file_and_part_2_imports_its_own_modules(self):
        """The split is found; Part 2's modules are imported in their own group, Part 1's above it."""
        self.assertGreater(self.split, 100)
        for module in ("smtplib", "email", "sys"):
            self.assertIn(module, self.part2)
        for module in ("socket", "ssl", "threading", "os"):
            self.assertIn(module, self.part1)

    def test_no_part_1_definition_uses_a_part_2_name(self):
        """Nothing above the banner names a function, class, constant or module that only Part 2 defines."""
        only_part2 = self.part2 - self.part1
        used = [(n.lineno, n.id) for node in self.tree.body if node.lineno < self.split
                and not isinstance(node, ast.Import)
                for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in only_part2]
        self.assertEqual(used, [])

    def test_pop_server_imports_only_part_1_names(self):
        """pop_server.py takes from mailserver_smtp.py only what Part 1 defines."""
        with open(os.path.join(support.REPO, "pop_server.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        taken = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and node.module == "mailserver_smtp" for alias in node.names}
        taken |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id == "mailserver_smtp"}
        self.assertTrue(taken)
        self.assertEqual(sorted(taken - self.part1), [])


class HeaderRuleTest(support.BothServersTestCase):
    """SMTP's Received, POP3's TOP n 0 and the client's split_message agree on every header block."""

    # What a client sends after DATA, and the body lines the stored message must have
    # by the one header rule (mailserver_smtp.header_block).
    TABLE = [
        ("an indented first body line of the course format",
         [b"Subject: s", b"  indented first line", b"more"], [b"  indented first line", b"more"]),
        ("a body line with a colon right after the headers (a header, by the rule)",
         [b"Subject: s", b"Note: a colon line", b"plain body"], [b"plain body"]),
        ("no headers at all",
         [b"just a body", b"Subject: late"], [b"just a body", b"Subject: late"]),
        ("a full RFC 5322 message: folded Subject, a blank line, then the body",
         [b"From: carol@example.org", b"To: alice@example.org", b"Subject: folded", b"  continued",
          b"Date: Tue, 1 Dec 2026 10:00:00 +0000", b"", b"body line", b"  indented body"],
         [b"body line", b"  indented body"]),
        ("an indented line after a header that is not Subject, no blank line",
         [b"X-Tag: 1", b"  looks folded", b"body"], [b"  looks folded", b"body"]),
    ]

    def test_every_copy_of_the_header_rule_finds_the_same_body(self):
        """For each tricky message, the stored form, TOP n 0 and the client split at the same line."""
        smtp, pop = self.servers
        for number, (case, lines, body) in enumerate(self.TABLE, 1):
            with self.subTest(case):
                code = support.deliver(smtp, b"".join(line + b"\r\n" for line in lines))
                self.assertEqual(code, 250)
                stored = stored_lines(self.root, "alice")[-1]
                count, blank = mailserver_smtp.header_block(stored)
                self.assertEqual(stored[count + blank:], body, "header_block on the stored form")
                received = [i for i, line in enumerate(stored) if line.startswith(b"Received: ")]
                self.assertEqual(len(received), 1)
                self.assertLess(received[0], count, "Received: is inside the header block")
                with support.PopClient(pop, "alice", support.DEFAULT_USERS["alice"]) as client:
                    _, top = client.multi("TOP %d 0" % number)
                    _, whole = client.multi("RETR %d" % number)
                    client.cmd("QUIT")
                self.assertTrue(whole.startswith(top[:-3]), "TOP is a prefix of RETR")
                self.assertEqual(whole[len(top) - 3:-3].split(b"\r\n")[:-1], body, "POP3 TOP n 0")
                text = [line.decode("utf-8") for line in whole[:-3].split(b"\r\n")[:-1]]
                self.assertEqual(mail_client.split_message(text)[1], [line.decode() for line in body],
                                 "the client's split_message")


class DeliveryLockTest(support.OneServerTestCase):
    """A delivery that fails while taking its locks gives back every lock it took."""

    def test_a_second_lock_that_cannot_be_taken_leaves_the_first_mailbox_unlocked(self):
        """A message for alice and bob fails on bob's lock with 451; alice's next message gets 250."""
        bobs_lock = os.path.join(self.root, "bob", mailserver_smtp.DELIVERY_LOCK_NAME)
        os.mkdir(bobs_lock)                  # opening the lock file now fails (EISDIR)
        try:
            code = support.deliver(self.server, b"Subject: both\r\n\r\nfor two\r\n",
                                   recipients=("alice@example.org", "bob@example.org"))
        finally:
            os.rmdir(bobs_lock)
        self.assertEqual(code, 451)
        with support.smtp_session(self.server, timeout=QUICK) as client:
            self.assertEqual(support.send_message(client, b"Subject: alone\r\n\r\nfor one\r\n")[0], 250)
        self.assertEqual([m[2] for m in stored_lines(self.root, "alice")], [b"Subject: alone"])
        self.assertEqual(support.read_mailbox(self.root, "bob"), b"")


class PipelinedRepliesTest(support.BothServersTestCase):
    """Both servers send the replies they owe before they wait for the rest of a partial line (RFC 2920 3.2)."""

    def test_smtp_answers_whole_lines_before_a_partial_one_is_complete(self):
        """HELO x, NOOP, then half a line: both replies come at once; the rest of the line then gets its own."""
        smtp, _ = self.servers
        with smtp.connect(QUICK) as client:
            self.assertEqual(client.reply()[0], 220)
            client.send(b"HELO x\r\nNOOP\r\nNO")
            self.assertEqual(client.reply()[1], ["250 OK Hello x"])
            self.assertEqual(client.reply()[1], ["250 OK"])
            self.assertEqual(client.cmd("OP")[1], ["250 OK"])

    def test_pop3_answers_whole_lines_before_a_partial_one_is_complete(self):
        """CAPA, USER, then half of PASS: both replies come at once; the whole PASS then logs in."""
        _, pop = self.servers
        with support.PopClient(pop, timeout=QUICK) as client:
            client.send(b"CAPA\r\nUSER alice\r\nPASS wonder")
            self.assertEqual(client.line(), "+OK Capability list follows")
            client.body()
            self.assertEqual(client.line(), "+OK send PASS")
            self.assertTrue(client.cmd("land").startswith("+OK alice's maildrop"))
            client.cmd("QUIT")


class LockReleaseTest(unittest.TestCase):
    """Giving a lock back never fails what it guarded, and twice is harmless."""

    def test_a_failing_unlock_is_logged_and_the_lock_is_free_all_the_same(self):
        """flock(LOCK_UN) failing with EIO: release() raises nothing, logs it, and another holder gets the lock."""
        folder = tempfile.mkdtemp()
        self.addCleanup(support.remove_mail_root, folder)
        path = os.path.join(folder, "lock")
        lock = mailserver_smtp.FileLock(path)
        self.assertTrue(lock.acquire())
        real_flock = mailserver_smtp.fcntl.flock

        def flock(fd, operation):
            if operation == mailserver_smtp.fcntl.LOCK_UN:
                raise OSError(errno.EIO, "injected unlock failure")
            return real_flock(fd, operation)
        with unittest.mock.patch.object(mailserver_smtp.fcntl, "flock", flock):
            with self.assertLogs("mail", "WARNING") as logged:
                lock.release()
        self.assertIn("unlocking", logged.output[0])
        lock.release()                                  # a second release does nothing
        self.assertTrue(mailserver_smtp.FileLock(path).acquire(blocking=False))


class LoggingTest(unittest.TestCase):
    """A log that cannot be written costs nothing: no traceback, no failed session."""

    def test_a_failing_log_write_prints_no_traceback(self):
        """The handler's stream raising EIO: the record is dropped, stderr gets nothing."""
        root = logging.getLogger()
        saved = root.handlers[:], root.level, logging.raiseExceptions
        self.addCleanup(lambda: (setattr(root, "handlers", saved[0]), root.setLevel(saved[1]),
                                 setattr(logging, "raiseExceptions", saved[2])))
        root.handlers = []
        stderr = io.StringIO()
        with unittest.mock.patch.object(sys, "stderr", stderr):
            mailserver_smtp.configure_logging("smtp")
            broken = unittest.mock.Mock()
            broken.write.side_effect = OSError(errno.EIO, "injected log failure")
            root.handlers[0].setStream(broken)
            logging.getLogger("mail").warning("a line nobody can write")
        self.assertTrue(broken.write.called)
        self.assertEqual(stderr.getvalue(), "")


@unittest.skipUnless(hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > 1,
                     "needs more than one CPU")
class CPUTest(unittest.TestCase):
    """Servers started side by side run on different CPUs; --cpu chooses one."""

    def test_two_servers_side_by_side_run_on_two_cpus(self):
        """Two SMTP servers started at once each pin themselves to a CPU, not the same one."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        claims = tempfile.mkdtemp()          # a system-wide folder of claims of their own
        self.addCleanup(support.remove_mail_root, claims)
        env = dict(os.environ, TMPDIR=claims)
        servers = [support.ServerProcess(support.SMTP_SCRIPT, root, env=env) for _ in range(2)]
        for server in servers:
            self.addCleanup(server.close)
        cpus = [os.sched_getaffinity(server.proc.pid) for server in servers]
        self.assertEqual([len(c) for c in cpus], [1, 1])
        self.assertNotEqual(cpus[0], cpus[1])

    def test_cpu_option_pins_the_server_there(self):
        """--cpu N puts the server on CPU N."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        cpu = max(os.sched_getaffinity(0))
        server = support.ServerProcess(support.SMTP_SCRIPT, root, "--cpu", str(cpu))
        self.addCleanup(server.close)
        self.assertEqual(os.sched_getaffinity(server.proc.pid), {cpu})

    def test_a_cpu_that_does_not_exist_leaves_the_server_on_every_cpu(self):
        """--cpu 99999: a warning, and the server runs on every CPU it may use, serving as usual."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        server = support.ServerProcess(support.SMTP_SCRIPT, root, "--cpu", "99999")
        self.addCleanup(server.close)
        server.wait_for_output(r"WARNING staying on every CPU")
        self.assertEqual(os.sched_getaffinity(server.proc.pid), os.sched_getaffinity(0))
        self.assertEqual(support.deliver(server, b"Subject: still here\r\n\r\nhi\r\n"), 250)


if __name__ == "__main__":
    unittest.main()
