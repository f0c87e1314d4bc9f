"""Both servers under abuse and faults: bounded memory, fair limits, deadlines, no escape, no duplicates."""

import contextlib
import errno
import io
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from support import DEFAULT_USERS, expect, read_mailbox, wait_for  # noqa: E402

import mailserver_smtp  # noqa: E402
import pop_server  # noqa: E402

SECOND_ADDRESS = "127.0.0.2"      # another client, as far as the servers can tell
MESSAGE = b"Subject: test\r\n\r\nhello\r\n"


def has_second_address():
    """True when this machine can connect from 127.0.0.2 (Linux routes all of 127/8 to lo)."""
    try:
        with socket.socket() as probe:
            probe.bind((SECOND_ADDRESS, 0))
    except OSError:
        return False
    return True


def whole_messages(data):
    """The stored messages of a mailbox, each with its '.' line; AssertionError if it ends torn."""
    messages, start = [], 0
    while start < len(data):
        end, _ = mailserver_smtp.message_end(data, start)
        expect(end > 0, "the mailbox ends in a torn message: %r" % data[start:][-60:])
        messages.append(data[start:end])
        start = end
    return messages


class FakeWireSocket:
    """A socket whose recv hands out given data in chunks of given sizes, in turn."""

    def __init__(self, data, sizes):
        self.data, self.sizes, self.turn = data, sizes, 0

    def recv(self, limit):
        size = self.sizes[self.turn % len(self.sizes)]
        self.turn += 1
        chunk, self.data = self.data[:size], self.data[size:]
        return chunk

    def sendall(self, data):
        pass

    def setsockopt(self, *args):
        pass


class StreamingTest(unittest.TestCase):
    """DATA is stored as it comes, chunk by chunk, exactly as if it had come whole."""

    def receive(self, wire_data, sizes, strict=True, max_size=10 ** 7):
        """Run read_data over wire_data cut into chunks of sizes; return (refusal reply, stored body, rest)."""
        wire = mailserver_smtp.Wire(FakeWireSocket(wire_data, sizes), 30)
        folder = tempfile.mkdtemp()
        self.addCleanup(support.remove_mail_root, folder)
        spool = mailserver_smtp.Spool(folder)
        try:
            mailserver_smtp.read_data(wire, strict, spool, max_size, 30)
            refused, body = None, b"".join(spool.lines())
        except mailserver_smtp.Refused as exc:
            refused, body = exc.reply, None
        spool.close()
        return refused, body, bytes(wire.buffer) + wire.sock.data

    def test_any_cut_of_the_wire_stores_the_same_body(self):
        """Chunks of 1, 2, 3, 5, 7 and 64 bytes store the same body as one chunk, with the rest left unread."""
        # As a client sends them: dot-stuffed, with a bare LF and a lone CR inside lines.
        lines = [b"Subject: cut", b"", b"...stuffed", b"..", b"bare\nlf", b"\r", b"end.", b"x" * 300]
        wire = b"".join(line + b"\r\n" for line in lines) + b".\r\nNEXT COMMAND\r\n"
        expected, _ = mailserver_smtp.stored_lines(b"".join(line + b"\r\n" for line in lines), True)
        for sizes in ([len(wire)], [1], [2], [3], [5], [7], [64], [1, 5, 2, 64]):
            with self.subTest(sizes=sizes):
                self.assertEqual(self.receive(wire, sizes), (None, expected, b"NEXT COMMAND\r\n"))

    def test_a_message_of_spool_size_goes_through_a_spool_file_whole(self):
        """A message larger than the in-memory part comes out of the spool file byte for byte."""
        line = b"0123456789" * 9 + b"\r\n"
        count = 2 * mailserver_smtp.SPOOL_THRESHOLD // len(line)
        wire = b"Subject: big\r\n" + line * count + b".\r\n"
        refused, body, rest = self.receive(wire, [65536, 1000, 1])
        self.assertIsNone(refused)
        self.assertEqual(body, b"Subject: big\n" + line.replace(b"\r\n", b"\n") * count)
        self.assertEqual(rest, b"")

    def test_a_bare_lf_session_ends_at_a_lone_dot_in_any_cut(self):
        """In a session typed with bare LF, a lone '.' line ends DATA wherever the chunks are cut."""
        wire = b"Subject: typed\nline\n..dot\n.\nQUIT\n"
        for sizes in ([len(wire)], [1], [2], [3]):
            with self.subTest(sizes=sizes):
                self.assertEqual(self.receive(wire, sizes, strict=False),
                                 (None, b"Subject: typed\nline\n..dot\n", b"QUIT\n"))

    def test_too_large_and_too_long_are_read_to_the_end_and_refused(self):
        """Past the size limit, or with a line over 1000 octets, the rest is read, thrown away, refused."""
        big = b"a" * 90 + b"\r\n"
        self.assertEqual(self.receive(big * 50 + b".\r\nNEXT\r\n", [7], max_size=1000),
                         (mailserver_smtp.Replies.MESSAGE_TOO_LARGE, None, b"NEXT\r\n"))
        long_line = b"b" * 5000 + b"\r\n"
        self.assertEqual(self.receive(long_line + b".\r\nNEXT\r\n", [64]),
                         (mailserver_smtp.Replies.LINE_TOO_LONG, None, b"NEXT\r\n"))


class MemoryTest(unittest.TestCase):
    """Memory per connection stays bounded whatever the message size."""

    def setUp(self):
        # A server of its own for each test: its peak memory (VmHWM) is then this test's.
        self.root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, self.root)
        self.server = support.ServerProcess(support.SMTP_SCRIPT, self.root, "--max-size", str(40 * 2 ** 20))
        self.addCleanup(self.server.close)

    @unittest.skipUnless(os.path.exists("/proc/self/status"), "needs Linux /proc")
    def test_three_messages_of_eight_mib_at_once_use_a_few_megabytes(self):
        """Three 8 MiB messages at once raise the server's peak memory by far less than one message."""
        line = b"y" * 98 + b"\r\n"
        body = b"Subject: large\r\n" + line * (8 * 1024 * 1024 // len(line))
        before = support.peak_rss_mb(self.server.proc.pid)
        clients = [support.smtp_session(self.server) for _ in range(3)]
        for client in clients:
            client.cmd_expecting("MAIL FROM:<big@example.org>", 250)
            client.cmd_expecting("RCPT TO:<alice@example.org>", 250)
            client.cmd_expecting("DATA", 354)
        senders = [threading.Thread(target=c.send, args=(body + b".\r\n",)) for c in clients]
        for sender in senders:
            sender.start()
        replies = [client.reply()[0] for client in clients]
        for sender in senders:
            sender.join()
        for client in clients:
            client.close()
        self.assertEqual(replies, [250, 250, 250])
        self.assertLess(support.peak_rss_mb(self.server.proc.pid) - before, 8, "MB more at the peak")
        self.assertEqual(len(whole_messages(read_mailbox(self.root, "alice"))), 3)
        self.assertEqual(os.listdir(os.path.join(self.root, ".spool")), [], "spool files have no name")

    @unittest.skipUnless(os.path.exists("/proc/self/status"), "needs Linux /proc")
    def test_a_message_of_eight_mib_in_bdat_chunks_uses_a_few_megabytes(self):
        """BDAT streams too: 8 MiB in 1 MiB chunks raise the peak memory by far less than the message."""
        chunk = (b"z" * 98 + b"\r\n") * (1024 * 1024 // 100)
        before = support.peak_rss_mb(self.server.proc.pid)
        with support.smtp_session(self.server, ehlo=True) as client:
            client.cmd_expecting("MAIL FROM:<big@example.org>", 250)
            client.cmd_expecting("RCPT TO:<bob@example.org>", 250)
            for number in range(8):
                client.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if number == 7 else b"") + chunk)
                self.assertEqual(client.reply()[0], 250)
        self.assertLess(support.peak_rss_mb(self.server.proc.pid) - before, 8, "MB more at the peak")
        self.assertEqual(len(whole_messages(read_mailbox(self.root, "bob"))), 1)


@unittest.skipUnless(has_second_address(), "needs 127.0.0.2 on the loopback")
class PerClientLimitTest(unittest.TestCase):
    """--max-per-client: one address cannot take every slot; other addresses are still served."""

    def start(self, script):
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        server = support.ServerProcess(script, root, "--max-connections", "4", "--max-per-client", "2")
        self.addCleanup(server.close)
        return server

    def crowd(self, server, first_line):
        """Fill 127.0.0.1's two slots; return the reply a third connection from there gets."""
        held = [server.connect() for _ in range(2)]
        for client in held:
            self.addCleanup(client.close)
            first_line(client)
        refused = [server.connect() for _ in range(3)]
        lines = [client.line() for client in refused]
        for client in refused:
            self.assertTrue(client.closed())
            client.close()
        self.assertEqual(len(set(lines)), 1)
        return lines[0]

    def test_smtp_refuses_the_third_connection_of_one_address_with_421_4_7_0(self):
        """A third SMTP connection from one address gets 421 4.7.0, logged once; another address gets 220."""
        server = self.start(support.SMTP_SCRIPT)
        reply = self.crowd(server, lambda client: client.reply())
        self.assertRegex(reply, r"^421 4\.7\.0 ")
        with server.connect(source=SECOND_ADDRESS) as other:
            self.assertEqual(other.reply()[0], 220)
            self.assertEqual(other.cmd("QUIT")[0], 221)
        server.wait_for_output(r"127\.0\.0\.1:\d+: refused, 2 connections open from 127\.0\.0\.1")
        self.assertEqual(server.output().count("refused"), 1, "logged once a minute, not per connection")

    def test_pop3_refuses_the_third_connection_of_one_address_with_sys_temp(self):
        """A third POP3 connection from one address gets -ERR [SYS/TEMP]; another address is greeted."""
        server = self.start(support.POP_SCRIPT)
        reply = self.crowd(server, lambda client: client.line())
        self.assertTrue(reply.startswith("-ERR [SYS/TEMP] "), reply)
        with server.connect(source=SECOND_ADDRESS) as other:
            self.assertTrue(other.line().startswith((pop_server.Replies.GREETING % "<")))

    def test_the_default_share_of_a_client_is_half_the_connections(self):
        """Without --max-per-client, one address gets half of --max-connections: the 3rd of 4 is refused."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        server = support.ServerProcess(support.SMTP_SCRIPT, root, "--max-connections", "4")
        self.addCleanup(server.close)
        self.assertRegex(self.crowd(server, lambda client: client.reply()), r"^421 4\.7\.0 ")

    def test_a_client_is_its_ipv4_address_or_its_ipv6_slash_64(self):
        """client_key: an IPv4 address, the /64 of an IPv6 one, and the IPv4 address in a mapped one."""
        key = mailserver_smtp.client_key
        self.assertEqual(key("192.0.2.7"), "192.0.2.7")
        self.assertEqual(key("2001:db8:1:2::7"), key("2001:db8:1:2:ffff::1"))
        self.assertEqual(key("2001:db8:1:2::7"), "2001:db8:1:2::/64")
        self.assertNotEqual(key("2001:db8:1:2::7"), key("2001:db8:1:3::7"))
        self.assertEqual(key("::ffff:192.0.2.7"), "192.0.2.7")


class TrickleClient(threading.Thread):
    """Sends data one piece every `every` seconds until the server closes the connection."""

    def __init__(self, client, pieces, every):
        super().__init__(daemon=True)
        self.client, self.pieces, self.every = client, pieces, every
        self.ended = None

    def run(self):
        try:
            for piece in self.pieces:
                self.client.send(piece)
                time.sleep(self.every)      # the slowness under test, not a synchronisation
        except OSError:
            pass
        self.ended = time.monotonic()


class DeadlineTest(support.BothServersTestCase):
    """A command line must be whole within --timeout of its first byte; a trickled DATA is cut."""

    TIMEOUT = 1.0

    @classmethod
    def setUpClass(cls):
        cls.root = support.make_mail_root()
        cls.servers = [support.ServerProcess(script, cls.root, "--timeout", str(cls.TIMEOUT))
                       for script in (support.SMTP_SCRIPT, support.POP_SCRIPT)]

    def cut_within(self, client, pieces, every, limit):
        """Trickle pieces; return what the server said once it hung up, which must be within limit s."""
        started = time.monotonic()
        TrickleClient(client, pieces, every).start()
        said = []
        try:
            while True:
                said.append(client.line())
        except (EOFError, OSError):
            pass
        self.assertLess(time.monotonic() - started, limit, "cut in time")
        return said

    def test_an_smtp_command_line_trickled_a_byte_at_a_time_is_cut(self):
        """A byte every 0.3 s never trips the idle timeout, but the line is cut after --timeout with 421."""
        smtp, _ = self.servers
        client = smtp.connect()
        self.assertEqual(client.reply()[0], 220)
        said = self.cut_within(client, [bytes([b]) for b in b"NOOP NOOP NOOP NOOP NOOP\r\n"], 0.3, 4)
        client.close()
        self.assertEqual(len(said), 1)
        self.assertRegex(said[0], r"^421 ")

    def test_a_pop3_command_line_trickled_a_byte_at_a_time_is_cut(self):
        """POP3 bounds each command line the same way: the session ends without a reply (RFC 1939)."""
        _, pop = self.servers
        client = pop.connect()
        self.assertTrue(client.line().startswith((pop_server.Replies.GREETING % "<")))
        self.assertEqual(self.cut_within(client, [bytes([b]) for b in b"NOOP NOOP NOOP NOOP\r\n"], 0.3, 4), [])
        client.close()

    def test_a_trickled_data_gets_421_4_4_2_and_nothing_is_stored(self):
        """DATA at a byte every 0.2 s is cut with 421 4.4.2 soon after --timeout; nothing is stored."""
        smtp, _ = self.servers
        client = support.smtp_session(smtp, ehlo=True)        # enhanced codes come after EHLO
        client.cmd_expecting("MAIL FROM:<slow@example.org>", 250)
        client.cmd_expecting("RCPT TO:<bob@example.org>", 250)
        client.cmd_expecting("DATA", 354)
        said = self.cut_within(client, [b"x"] * 100, 0.2, 4)
        client.close()
        self.assertEqual(len(said), 1)
        self.assertRegex(said[0], r"^421 4\.4\.2 ")
        self.assertEqual(read_mailbox(self.root, "bob"), b"")

    def test_a_person_typing_a_short_message_is_not_cut(self):
        """Lines typed at any pace are delivered when the whole message takes less than --timeout."""
        smtp, _ = self.servers
        client = support.smtp_session(smtp)
        client.cmd_expecting("MAIL FROM:<typist@example.org>", 250)
        client.cmd_expecting("RCPT TO:<alice@example.org>", 250)
        client.cmd_expecting("DATA", 354)
        typist = TrickleClient(client, [b"Subject: typed by hand\r\n", b"Dear Alice,\r\n",
                                        b"this took a while.\r\n", b".\r\n"], self.TIMEOUT / 5)
        typist.start()
        self.assertEqual(client.reply()[0], 250)
        client.close()
        self.assertIn(b"this took a while.\n", read_mailbox(self.root, "alice"))


class NoEscapeTest(support.BothServersTestCase):
    """A symlink or a non-file where a mailbox file belongs is refused; nothing is written anywhere."""

    def setUp(self):
        self.outside = tempfile.mkdtemp(prefix="outside-")
        self.addCleanup(support.remove_mail_root, self.outside)
        self.target = os.path.join(self.outside, "target")
        with open(self.target, "wb") as f:
            f.write(b"not mail\n")

    @contextlib.contextmanager
    def planted(self, login, name, kind):
        """A symlink to the target, a folder or a FIFO where login's file `name` belongs, for a while."""
        path = os.path.join(self.root, login, name)
        support.remove_file(path)
        if kind == "symlink":
            os.symlink(self.target, path)
        elif kind == "folder":
            os.mkdir(path)
        else:
            os.mkfifo(path)
        try:
            yield path
        finally:
            (os.rmdir if kind == "folder" else os.remove)(path)

    def test_smtp_refuses_a_planted_mailbox_lock_or_torn_file_with_451(self):
        """A symlinked, folder or FIFO mailbox, lock or .torn gets 451 4.3.0, the path logged, the target untouched."""
        smtp, _ = self.servers
        cases = [("my_mailbox", "symlink"), ("my_mailbox", "folder"), ("my_mailbox", "fifo"),
                 (".my_mailbox.lock", "symlink"), (".my_mailbox.lock", "folder")]
        for name, kind in cases:
            with self.subTest(name=name, kind=kind), self.planted("bob", name, kind) as path:
                with support.smtp_session(smtp, ehlo=True) as client:
                    reply = support.send_message(client, MESSAGE, recipients=("bob@example.org",))
                self.assertRegex(reply[1][0], r"^451 4\.3\.0 ")
                smtp.wait_for_output(r"delivery from .* failed: .*%s" % path)
                with open(self.target, "rb") as f:
                    self.assertEqual(f.read(), b"not mail\n")
        # A torn tail must go to .my_mailbox.torn: planted, the delivery is refused and nothing moves.
        with open(support.mailbox_path(self.root, "bob"), "wb") as f:
            f.write(b"From: a@x\nTo: bob@x\nSubject: t\nhalf")
        self.addCleanup(support.remove_file, support.mailbox_path(self.root, "bob"))
        with self.planted("bob", ".my_mailbox.torn", "symlink"):
            self.assertEqual(support.deliver(smtp, MESSAGE, recipients=("bob@example.org",)), 451)
        with open(self.target, "rb") as f:
            self.assertEqual(f.read(), b"not mail\n")
        self.assertTrue(read_mailbox(self.root, "bob").endswith(b"half"))

    def test_pop3_refuses_a_planted_mailbox_or_index_with_sys_temp(self):
        """A symlinked or folder mailbox or index gets -ERR [SYS/TEMP] at PASS; the target is untouched."""
        _, pop = self.servers
        for name, kind in [("my_mailbox", "symlink"), ("my_mailbox", "folder"),
                           (".my_mailbox.index", "symlink"), (".my_mailbox.pop.lock", "symlink")]:
            with self.subTest(name=name, kind=kind), self.planted("alice", name, kind) as path:
                with support.PopClient(pop) as client:
                    client.cmd("USER alice")
                    self.assertTrue(client.cmd("PASS wonderland").startswith("-ERR [SYS/TEMP] "))
                pop.wait_for_output(r"cannot open the mailbox of alice: .*%s" % path)
                with open(self.target, "rb") as f:
                    self.assertEqual(f.read(), b"not mail\n")

    def test_a_spool_folder_that_is_a_symlink_gets_451_and_nothing_is_written(self):
        """A ROOT/.spool made a symlink: a message too large for memory gets 451 4.3.0, the target stays empty."""
        smtp, _ = self.servers
        target = os.path.join(self.outside, "spool-target")
        os.mkdir(target)
        spool = os.path.join(self.root, ".spool")
        if os.path.isdir(spool) and not os.path.islink(spool):
            os.rmdir(spool)
        os.symlink(target, spool)
        self.addCleanup(os.remove, spool)
        large = b"Subject: large\r\n\r\n" + (b"s" * 98 + b"\r\n") * 4000      # over the in-memory part
        with support.smtp_session(smtp, ehlo=True) as client:
            reply = support.send_message(client, large, recipients=("bob@example.org",))
        self.assertRegex(reply[1][0], r"^451 4\.3\.0 ")
        self.assertEqual(os.listdir(target), [])
        self.assertEqual(read_mailbox(self.root, "bob"), b"")
        smtp.wait_for_output(r"cannot spool a message in .*\.spool")

    def test_a_user_folder_that_is_a_symlink_keeps_working(self):
        """A user folder the admin made a symlink works for both servers."""
        smtp, pop = self.servers
        real = os.path.join(self.outside, "carols-real-folder")
        os.mkdir(real)
        os.symlink(real, os.path.join(self.root, "carol"))
        self.addCleanup(os.remove, os.path.join(self.root, "carol"))
        with open(os.path.join(self.root, "userinfo.txt"), "a") as f:
            f.write("carol sesame\n")
        wait_for(lambda: support.rcpt_code(smtp, "carol@example.org") == 250)
        self.assertEqual(support.deliver(smtp, MESSAGE, recipients=("carol@example.org",)), 250)
        with support.PopClient(pop, "carol", "sesame") as client:
            self.assertEqual(client.cmd("STAT").split()[1], "1")
            client.cmd("QUIT")


def root_and_hooks(test):
    """A new mail root and a folder for a server's fault hooks (see support.hooked_env), both removed after test."""
    root, hooks = support.make_mail_root(), tempfile.mkdtemp(prefix="hooks-")
    test.addCleanup(support.remove_mail_root, root)
    test.addCleanup(support.remove_mail_root, hooks)
    return root, hooks


class NothingUnacknowledgedTest(unittest.TestCase):
    """A failed fsync cuts the mailboxes back before the 451, so a retry is stored once."""

    def setUp(self):
        self.root, hooks = root_and_hooks(self)
        env, self.flag = support.failing_fsync_env(hooks)
        self.smtp = support.ServerProcess(support.SMTP_SCRIPT, self.root, env=env)
        self.addCleanup(self.smtp.close)

    def fail_next_fsync(self):
        open(self.flag, "w").close()

    def test_a_retry_after_a_failed_fsync_is_stored_once(self):
        """451 after the failed fsync, the mailbox as before; the client's retry is the only copy."""
        self.assertEqual(support.deliver(self.smtp, b"Subject: first\r\n\r\nkept\r\n"), 250)
        before = read_mailbox(self.root, "alice")
        self.fail_next_fsync()
        self.assertEqual(support.deliver(self.smtp, b"Subject: retried\r\n\r\nonce\r\n"), 451)
        self.assertFalse(os.path.exists(self.flag), "the fault fired")
        self.assertEqual(read_mailbox(self.root, "alice"), before)
        self.assertEqual(support.deliver(self.smtp, b"Subject: retried\r\n\r\nonce\r\n"), 250)
        self.assertEqual(read_mailbox(self.root, "alice").count(b"Subject: retried\n"), 1)

    def test_a_failed_fsync_of_one_recipient_cuts_back_both(self):
        """A message for two: one fsync fails, both mailboxes are cut back, the retry reaches both once."""
        self.fail_next_fsync()
        both = ("alice@example.org", "bob@example.org")
        self.assertEqual(support.deliver(self.smtp, MESSAGE, recipients=both), 451)
        self.assertEqual((read_mailbox(self.root, "alice"), read_mailbox(self.root, "bob")), (b"", b""))
        self.assertEqual(support.deliver(self.smtp, MESSAGE, recipients=both), 250)
        self.assertEqual([len(whole_messages(read_mailbox(self.root, u))) for u in ("alice", "bob")], [1, 1])


@unittest.skipUnless(os.path.isdir("/proc/self/fd"), "needs /proc to tell a mailbox's write")
class StaleFileHandleTest(unittest.TestCase):
    """ESTALE (a shared file system's file renamed away) is an I/O error like any other: cut back, 451."""

    def test_a_stale_file_handle_at_the_append_gets_451_and_leaves_the_mailbox_as_it_was(self):
        """451 after ESTALE on the mailbox write, the mailbox as before; the retry is stored once."""
        root, hooks = root_and_hooks(self)
        env, flag = support.shared_fs_env(hooks)
        smtp = support.ServerProcess(support.SMTP_SCRIPT, root, env=env)
        self.addCleanup(smtp.close)
        self.assertEqual(support.deliver(smtp, b"Subject: first\r\n\r\nkept\r\n"), 250)
        before = read_mailbox(root, "alice")
        with open(flag, "wb") as f:
            f.write(b"estale")
        self.assertEqual(support.deliver(smtp, b"Subject: retried\r\n\r\nonce\r\n"), 451)
        self.assertFalse(os.path.exists(flag), "the fault fired")
        self.assertEqual(read_mailbox(root, "alice"), before)
        smtp.wait_for_output(r"delivery from \S+ to alice failed: \[Errno %d\]" % errno.ESTALE)
        self.assertEqual(support.deliver(smtp, b"Subject: retried\r\n\r\nonce\r\n"), 250)
        self.assertEqual(read_mailbox(root, "alice").count(b"Subject: retried\n"), 1)


def can_mount_tmpfs():
    """True when this process may mount a small tmpfs (root on Linux)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    probe = tempfile.mkdtemp(prefix="tmpfs-probe-")
    try:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe],
                          capture_output=True).returncode != 0:
            return False
        subprocess.run(["umount", probe], capture_output=True)
        return True
    except OSError:
        return False
    finally:
        os.rmdir(probe)


@unittest.skipUnless(can_mount_tmpfs(), "needs root to mount a small tmpfs")
class FullDiskTest(unittest.TestCase):
    """On a full disk every message gets 250 or 451, and the mailbox holds exactly the 250s, whole."""

    def test_a_full_disk_refuses_with_451_and_keeps_only_whole_acknowledged_messages(self):
        """Deliveries onto a 256 KiB tmpfs: the 250s are in the mailbox once each, nothing else."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        folder = os.path.join(root, "alice")
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", folder], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", folder])
        smtp = support.ServerProcess(support.SMTP_SCRIPT, root)
        self.addCleanup(smtp.close)
        body = b"Subject: %d\r\n\r\n" + (b"z" * 70 + b"\r\n") * 300      # about 21 KB each
        accepted, codes = [], []
        with support.smtp_session(smtp) as client:
            for number in range(30):
                code = support.send_message(client, body % number)[0]
                codes.append(code)
                if code == 250:
                    accepted.append(number)
        self.assertIn(451, codes, "the disk filled")
        self.assertEqual(set(codes), {250, 451})
        stored = whole_messages(read_mailbox(root, "alice"))
        subjects = [int(m.split(b"Subject: ")[1].split(b"\n")[0]) for m in stored]
        self.assertEqual(subjects, accepted)


def stored_for_alice(subject, filler=0):
    """A small message for alice in its stored form, as the server appends it (subject: bytes)."""
    body = b"Subject: " + subject + b"\n" + b"x" * filler + b"\nbody\n"
    header = mailserver_smtp.Header(io.BytesIO(body))
    layout = mailserver_smtp.stored_layout(header, len(body), b"carol@example.org", [b"alice@example.org"], b"T")
    return mailserver_smtp.StoredMessage(memoryview(body), layout)


def is_a_mailbox(fd):
    """Whether fd is open on a my_mailbox file."""
    return os.readlink("/proc/self/fd/%d" % fd).endswith("/my_mailbox")


@unittest.skipUnless(os.path.isdir("/proc/self/fd"), "needs /proc to tell a mailbox's fsync")
class BatchFaultTest(unittest.TestCase):
    """A fault that hits a batch of messages (group commit) fails each sender truthfully; none is stored twice or half."""

    def setUp(self):
        self.root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, self.root)
        self.path = support.mailbox_path(self.root, "alice")
        self.first_fsync_held = threading.Event()
        self.release = threading.Event()
        self.fail_next = False
        real_fsync = os.fsync

        def fsync(fd):
            if is_a_mailbox(fd) and not self.first_fsync_held.is_set():
                self.first_fsync_held.set()
                self.release.wait(support.DEADLINE)
            elif is_a_mailbox(fd) and self.fail_next:
                self.fail_next = False
                raise OSError(errno.EIO, "injected fsync failure")
            return real_fsync(fd)
        patcher = unittest.mock.patch.object(os, "fsync", fsync)
        patcher.start()
        self.addCleanup(patcher.stop)

    def deliver_three(self, messages):
        """Deliver the first message; while its fsync is held, queue the other two behind it; their outcomes."""
        outcomes = [None] * 3

        def run(index):
            try:
                mailserver_smtp.deliver({self.path: messages[index]})
            except OSError as exc:
                outcomes[index] = exc
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        threads[0].start()
        self.assertTrue(self.first_fsync_held.wait(support.DEADLINE))
        for thread in threads[1:]:
            thread.start()
        queue = mailserver_smtp.MailboxQueue.of(self.path)
        wait_for(lambda: len(queue.waiting) == 2)     # both wait behind the first: one batch
        self.release.set()
        for thread in threads:
            thread.join(support.DEADLINE)
        return outcomes

    def test_a_failed_fsync_fails_both_messages_of_the_batch_and_keeps_neither(self):
        """The batch's one fsync fails: both senders hear of it, the mailbox holds the first message alone."""
        first, second, third = (stored_for_alice(b"%d" % n) for n in range(3))
        self.fail_next = True
        outcomes = self.deliver_three([first, second, third])
        self.assertIsNone(outcomes[0])
        self.assertEqual([exc.errno for exc in outcomes[1:]], [errno.EIO, errno.EIO])
        self.assertEqual(read_mailbox(self.root, "alice"), b"".join(first.pieces()))
        mailserver_smtp.deliver({self.path: second})             # the retry is the only copy
        self.assertEqual(read_mailbox(self.root, "alice"), b"".join(first.pieces()) + b"".join(second.pieces()))

    @unittest.skipUnless(can_mount_tmpfs(), "needs root to mount a small tmpfs")
    def test_a_full_disk_in_a_batch_fails_both_messages_and_keeps_neither_half(self):
        """The disk fills in the batch's second message: both fail, nothing of either stays; the first alone fits."""
        folder = os.path.dirname(self.path)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", folder], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", folder])
        first, second, third = stored_for_alice(b"0"), stored_for_alice(b"1"), stored_for_alice(b"2", 200000)
        outcomes = self.deliver_three([first, second, third])
        self.assertIsNone(outcomes[0])
        self.assertEqual([exc.errno for exc in outcomes[1:]], [errno.ENOSPC, errno.ENOSPC])
        self.assertEqual(read_mailbox(self.root, "alice"), b"".join(first.pieces()))
        mailserver_smtp.deliver({self.path: second})
        self.assertEqual(read_mailbox(self.root, "alice"), b"".join(first.pieces()) + b"".join(second.pieces()))


@unittest.skipUnless(os.path.isdir("/proc/self/fd"), "needs /proc to tell a mailbox's write")
class CrashBetweenRecipientsTest(unittest.TestCase):
    """A delivery to alice and bob killed between the two leaves it in neither mailbox: all or none."""

    def test_kill_9_at_the_second_mailbox_write_rolls_the_first_back(self):
        """kill -9 at bob's write: no 250; after a restart alice has nothing (it went to .torn), the retry lands once each."""
        root, hooks = root_and_hooks(self)
        smtp = support.ServerProcess(support.SMTP_SCRIPT, root, env=support.killed_at_write_env(hooks, 2))
        self.addCleanup(smtp.close)
        both = ("alice@example.org", "bob@example.org")
        with support.smtp_session(smtp) as client:
            for line in ["MAIL FROM:<carol@example.org>"] + ["RCPT TO:<%s>" % r for r in both] + ["DATA"]:
                client.cmd(line)
            client.send(b"Subject: for two\r\n\r\nall or none\r\n.\r\n")
            self.assertTrue(client.closed(), "the server died before any reply")
        self.assertEqual(smtp.proc.wait(support.DEADLINE), -9)
        self.assertIn(b"all or none", read_mailbox(root, "alice"), "alice's copy was written before the kill")
        self.assertEqual(read_mailbox(root, "bob"), b"")
        pop = support.ServerProcess(support.POP_SCRIPT, root)
        self.addCleanup(pop.close)
        with support.PopClient(pop, "alice", "wonderland") as reader:
            self.assertEqual(reader.cmd("STAT"), "+OK 0 0")
            reader.cmd("QUIT")
        with open(os.path.join(root, "alice", mailserver_smtp.TORN_NAME), "rb") as f:
            self.assertIn(b"all or none", f.read())
        again = support.ServerProcess(support.SMTP_SCRIPT, root)
        self.addCleanup(again.close)
        self.assertEqual(support.deliver(again, b"Subject: for two\r\n\r\nall or none\r\n", recipients=both), 250)
        self.assertEqual([len(whole_messages(read_mailbox(root, u))) for u in ("alice", "bob")], [1, 1])
        records = [os.path.join(root, ".spool", n) for n in os.listdir(os.path.join(root, ".spool"))
                   if n.endswith(".commit")]
        self.assertEqual([mailserver_smtp.read_commit_record(r) for r in records if
                          mailserver_smtp.read_commit_record(r)], [],
                         "no record names a mailbox once both were made whole")


class LeftoversTest(unittest.TestCase):
    """What crashes leave (rewrite files, spool files) is removed at start and at login."""

    def test_pop3_removes_rewrite_leftovers_at_start_and_at_login(self):
        """A .my_mailbox.new and .my_mailbox.index.new go when POP3 starts, and again at login."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        names = (mailserver_smtp.NEW_MAILBOX_NAME, mailserver_smtp.NEW_INDEX_NAME)
        paths = [os.path.join(root, login, name) for login in DEFAULT_USERS for name in names]
        for path in paths:
            with open(path, "wb") as f:
                f.write(b"x" * 1000)
        pop = support.ServerProcess(support.POP_SCRIPT, root)
        self.addCleanup(pop.close)
        self.assertEqual([p for p in paths if os.path.exists(p)], [])
        for path in paths[:2]:
            with open(path, "wb") as f:
                f.write(b"left by a crash during this run")
        with support.PopClient(pop, "alice", "wonderland") as client:
            self.assertEqual([p for p in paths[:2] if os.path.exists(p)], [])
            client.cmd("QUIT")

    def test_smtp_keeps_commit_records_to_undo_and_removes_empty_ones_at_start(self):
        """At start an empty record of a dead server goes, one naming mailboxes stays, one cut short reads as empty."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        spool = os.path.join(root, ".spool")
        os.mkdir(spool, 0o700)
        records = {name: os.path.join(spool, name + ".commit") for name in ("empty", "pending", "torn")}
        contents = {"empty": b"", "pending": b"0 alice\n0 bob\nend\n", "torn": b"0 alice\n0 b"}
        for name, path in records.items():
            with open(path, "wb") as f:
                f.write(contents[name])
        smtp = support.ServerProcess(support.SMTP_SCRIPT, root)
        self.addCleanup(smtp.close)
        self.assertEqual(sorted(n for n in os.listdir(spool) if n.endswith(".commit")), ["pending.commit"])
        self.assertEqual(mailserver_smtp.read_commit_record(records["pending"]), {"alice": 0, "bob": 0})
        self.assertEqual(mailserver_smtp.read_commit_record(os.path.join(spool, "gone.commit")), {})

    def test_smtp_empties_its_spool_at_start(self):
        """Files left in ROOT/.spool are removed when the SMTP server starts."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        os.mkdir(os.path.join(root, ".spool"), 0o700)
        leftover = os.path.join(root, ".spool", "tmp1234")
        with open(leftover, "wb") as f:
            f.write(b"half a message")
        smtp = support.ServerProcess(support.SMTP_SCRIPT, root)
        self.addCleanup(smtp.close)
        self.assertFalse(os.path.exists(leftover))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(root, ".spool")).st_mode), 0o700)


if __name__ == "__main__":
    unittest.main()
