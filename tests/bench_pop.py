#!/usr/bin/env python3
"""Benchmark of pop_server.py: login+STAT, LIST, RETR of every message, concurrency, memory.

    python3 tests/bench_pop.py [--repeat 3] [--sizes 1000,10000,100000] [--big 64]

Generates mailboxes of 2 KB messages in a temporary mail root, runs the real
server as a subprocess and prints the median of several runs.  Not part of
the test suite (its name does not start with test_).
"""

import argparse
import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import support  # noqa: E402

MESSAGE_SIZE = 2048
PASSWORD = "benchpw"
CONCURRENT_USERS = 10
CONCURRENT_MESSAGES = 1000
RECV_SIZE = 262144


def make_message(number):
    """One stored message of MESSAGE_SIZE bytes, dot-stuffed like the SMTP server writes it."""
    head = ("From: sender%d@example.org\nTo: bench@example.org\nSubject: message %d\n"
            "Received: 2026-11-28 : 14 : 05\n" % (number % 97, number)).encode()
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\n"
    body = b"..a stuffed line\n"
    while len(head) + len(body) + len(line) + 2 <= MESSAGE_SIZE:
        body += line
    body += b"x" * (MESSAGE_SIZE - len(head) - len(body) - 3) + b"\n"
    return head + body + b".\n"


def write_mailbox(root, login, count):
    os.mkdir(os.path.join(root, login))
    with open(support.mailbox_path(root, login), "wb") as f:
        for start in range(0, count, 1000):
            f.write(b"".join(make_message(n) for n in range(start, min(count, start + 1000))))
    with open(os.path.join(root, "userinfo.txt"), "a") as f:
        f.write("%s %s\n" % (login, PASSWORD))


class Client:
    """A minimal, fast POP3 client: one socket, one receive buffer."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buf = bytearray()
        self.line()

    def _fill(self):
        data = self.sock.recv(RECV_SIZE)
        if not data:
            raise EOFError("server closed the connection")
        self.buf += data

    def line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        end = self.buf.index(b"\r\n")
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return line

    def cmd(self, text):
        self.sock.sendall(text.encode() + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise RuntimeError("%s -> %r" % (text, reply))
        return reply

    def multi(self, text):
        """Send a command with a multi-line reply; return the reply without its first line."""
        self.cmd(text)
        if self.buf.startswith(b".\r\n"):
            del self.buf[:3]
            return b""
        searched = 0
        while True:
            end = self.buf.find(b"\r\n.\r\n", searched)
            if end >= 0:
                body = bytes(self.buf[:end + 2])
                del self.buf[:end + 5]
                return body
            searched = max(0, len(self.buf) - 4)
            self._fill()

    def login(self, login):
        self.cmd("USER " + login)
        self.cmd("PASS " + PASSWORD)

    def close(self):
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.line()
        finally:
            self.sock.close()


def timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def login_stat(port, login):
    client = Client(port)
    client.login(login)
    count = int(client.cmd("STAT").split()[1])
    return client, count


def bench_user(port, login, count, repeat, retr):
    """Median seconds for login+STAT, LIST and (optionally) RETR of every message."""
    stats, lists, retrs = [], [], []
    for _ in range(repeat):
        seconds, (client, seen) = timed(lambda: login_stat(port, login))
        assert seen == count, (seen, count)
        stats.append(seconds)
        seconds, listing = timed(lambda: client.multi("LIST"))
        assert listing.count(b"\r\n") == count
        lists.append(seconds)
        if retr:
            def retrieve_all():
                for n in range(1, count + 1):
                    client.multi("RETR %d" % n)
            retrs.append(timed(retrieve_all)[0])
        client.close()
    return stats, lists, retrs


def bench_concurrent(port, logins):
    """Wall time for CONCURRENT_USERS sessions each retrieving all its messages at once."""
    barrier = threading.Barrier(len(logins) + 1)
    errors = []

    def session(login):
        try:
            client, count = login_stat(port, login)
            barrier.wait()
            for n in range(1, count + 1):
                client.multi("RETR %d" % n)
            client.close()
        except Exception as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=session, args=(login,)) for login in logins]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def write_big_mailbox(root, login, count, megabytes):
    """A mailbox of count messages of megabytes MB each, written a line block at a time."""
    os.mkdir(os.path.join(root, login))
    block = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\n" * 14000
    with open(support.mailbox_path(root, login), "wb") as f:
        for number in range(count):
            f.write(b"From: big@example.org\nTo: bench@example.org\nSubject: big %d\n"
                    b"Received: 2026-11-28 : 14 : 05\n" % number)
            for _ in range(megabytes * 2 ** 20 // len(block)):
                f.write(block)
            f.write(b".\n")
    with open(os.path.join(root, "userinfo.txt"), "a") as f:
        f.write("%s %s\n" % (login, PASSWORD))


def bench_big(root, megabytes):
    """Log in (twice) to a mailbox of four big messages and RETR one; print times and peak memory."""
    write_big_mailbox(root, "big", 4, megabytes)
    server = support.ServerProcess(support.POP_SCRIPT, root)
    try:
        first, (client, count) = timed(lambda: login_stat(server.port, "big"))
        retr, _ = timed(lambda: client.multi("RETR 1"))
        client.close()
        again, (client, _) = timed(lambda: login_stat(server.port, "big"))
        client.close()
        peak = support.peak_rss_mb(server.proc.pid)
    finally:
        server.close()
    print("\n%d messages of %d MB: 1st login %.2f s, login again %.3f s, RETR of one %.2f s "
          "(%.0f MB/s); peak server RSS %s" % (count, megabytes, first, again, retr, megabytes / retr,
                                                "%.1f MB" % peak if peak else "n/a"))


def median(values):
    return statistics.median(values) if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--sizes", default="1000,10000,100000", help="mailbox sizes in messages")
    parser.add_argument("--big", type=int, default=64, metavar="MB",
                        help="size of each of four big messages in another mailbox (0: none; default 64)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    root = support.make_mail_root({})
    try:
        print("generating mailboxes of %s messages of %d bytes in %s ..." % (
            ", ".join(map(str, sizes)), MESSAGE_SIZE, root), flush=True)
        for count in sizes:
            write_mailbox(root, "m%d" % count, count)
        crowd = ["c%d" % i for i in range(CONCURRENT_USERS)]
        for login in crowd:
            write_mailbox(root, login, CONCURRENT_MESSAGES)

        print("\n%-9s %12s %12s %12s %12s %12s" % (
            "messages", "1st login", "login+STAT", "LIST", "RETR all", "RETR msgs/s"))
        peaks = {}
        for count in sizes:
            # A fresh server per mailbox so its peak memory belongs to that mailbox alone.
            server = support.ServerProcess(support.POP_SCRIPT, root)
            try:
                first, (client, _) = timed(lambda: login_stat(server.port, "m%d" % count))
                client.close()
                retr = count <= 10000 or args.repeat == 1
                stats, lists, retrs = bench_user(server.port, "m%d" % count, count,
                                                 args.repeat, retr)
                if not retr:          # one full RETR pass of the big mailbox is enough
                    retrs = bench_user(server.port, "m%d" % count, count, 1, True)[2]
                peaks[count] = support.peak_rss_mb(server.proc.pid)
            finally:
                server.close()
            rate = count / median(retrs)
            print("%-9d %10.3f s %10.3f s %10.3f s %10.3f s %12.0f" % (
                count, first, median(stats), median(lists), median(retrs), rate), flush=True)

        server = support.ServerProcess(support.POP_SCRIPT, root)
        try:
            walls = [bench_concurrent(server.port, crowd) for _ in range(args.repeat)]
            crowd_peak = support.peak_rss_mb(server.proc.pid)
        finally:
            server.close()
        total = CONCURRENT_USERS * CONCURRENT_MESSAGES
        print("\n%d concurrent sessions x %d RETR: %.3f s wall, %.0f msgs/s in total" % (
            CONCURRENT_USERS, CONCURRENT_MESSAGES, median(walls), total / median(walls)))
        print("\npeak server RSS (VmHWM):")
        for count, peak in peaks.items():
            print("  %-7d messages: %s" % (count, "%.1f MB" % peak if peak else "n/a"))
        print("  %d concurrent: %s" % (CONCURRENT_USERS, "%.1f MB" % crowd_peak if crowd_peak else "n/a"))
        print("\nmedians of %d runs; '1st login' includes creating the UIDL sidecar" % args.repeat)
        if args.big:
            bench_big(root, args.big)
    finally:
        support.remove_mail_root(root)


if __name__ == "__main__":
    main()
