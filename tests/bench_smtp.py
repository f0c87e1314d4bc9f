"""Benchmark of mailserver_smtp.py: messages per second and latency under concurrent clients.

    python tests/bench_smtp.py [--seconds 3] [--runs 3] [--clients 1,10,50]

Starts the real server in a temporary mail root and drives N concurrent
clients over raw sockets (one thread and a selector drive them all, so the
load generator costs little CPU); each connection delivers one 2 KB message
(220, HELO, MAIL_FROM, RCPT_TO, DATA, body, QUIT, each waiting for its
reply) to one of --users mailboxes.  Prints msgs/s and p50/p99 latency per level,
the median over the runs.  Not part of the test suite.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import selectors
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402

LINE = b"x" * 66 + b"\r\n"
BODY = b"From: bench@example.org\r\nTo: user0@example.org\r\nSubject: bench\r\n" + LINE * 29


class Conversation:
    """One client's current SMTP conversation: which reply it waits for, what it sends next."""

    EXPECTED = (b"220", b"250", b"250", b"250", b"354", b"250", b"221")

    def __init__(self, login):
        self.script = (
            b"HELO bench.example.org\r\n",
            b"MAIL_FROM: <bench@example.org>\r\n",
            b"RCPT_TO: <%s@example.org>\r\n" % login.encode(),
            b"DATA\r\n",
            BODY + b".\r\n",
            b"QUIT\r\n",
        )
        self.sock = None

    def start(self, port):
        self.sock = socket.socket()
        self.sock.setblocking(False)
        self.sock.connect_ex(("127.0.0.1", port))
        self.step = 0
        self.buffer = b""
        self.started = time.monotonic()

    def readable(self):
        """Handle arriving bytes; return True when the conversation is over, False to go on."""
        chunk = self.sock.recv(4096)
        if not chunk:
            raise ConnectionError("server closed early")
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            if not line.startswith(self.EXPECTED[self.step]):
                raise ConnectionError("unexpected reply %r" % line)
            if self.step == len(self.script):
                return True
            self.sock.send(self.script[self.step])    # small: fits the socket buffer
            self.step += 1
        return False


def run_level(port, clients, users, seconds):
    """Keep `clients` conversations going at once for `seconds`; return msgs/s, p50, p99, errors.

    One thread drives every connection through a selector, so the load
    generator stays cheap and leaves the CPU to the server under test.
    """
    selector = selectors.DefaultSelector()
    latencies = []
    errors = 0
    stop_at = time.monotonic() + seconds
    for i in range(clients):
        conversation = Conversation("user%d" % (i % users))
        conversation.start(port)
        selector.register(conversation.sock, selectors.EVENT_READ, conversation)
    started = time.monotonic()
    while selector.get_map():
        for key, _ in selector.select(timeout=support.DEADLINE):
            conversation = key.data
            try:
                done = conversation.readable()
            except OSError:
                done, errors = None, errors + 1
            if done is False:
                continue
            selector.unregister(conversation.sock)
            conversation.sock.close()
            now = time.monotonic()
            if done:
                latencies.append(now - conversation.started)
            if now < stop_at:
                conversation.start(port)
                selector.register(conversation.sock, selectors.EVENT_READ, conversation)
    elapsed = time.monotonic() - started
    latencies.sort()
    if not latencies:
        return 0.0, float("nan"), float("nan"), errors
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(latencies) / elapsed, p50 * 1000, p99 * 1000, errors


def start_server(root):
    """Start the server with its log in a file (as in real use), not in a pipe we must drain."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, support.SMTP_SCRIPT, "0", "--host", "127.0.0.1",
                             "--root", root, "--max-connections", "500"],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def port():
        log.seek(0)
        found = support.LISTENING.search(log.read().decode())
        return found and int(found.group(2))
    return proc, support.wait_for(port)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--runs", type=int, default=3, help="runs per level; the median is printed")
    parser.add_argument("--clients", default="1,10,50", help="comma-separated client counts")
    parser.add_argument("--users", type=int, default=10, help="mailboxes the clients deliver to")
    args = parser.parse_args()
    users = {"user%d" % i: "pw" for i in range(args.users)}
    root = support.make_mail_root(users)
    proc, port = start_server(root)
    try:
        print("%8s %10s %9s %9s %7s" % ("clients", "msgs/s", "p50 ms", "p99 ms", "errors"))
        for clients in [int(n) for n in args.clients.split(",")]:
            results = [run_level(port, clients, args.users, args.seconds) for _ in range(args.runs)]
            rates = [r[0] for r in results]
            print("%8d %10.0f %9.2f %9.2f %7d   runs: %s" % (
                clients, statistics.median(rates), statistics.median(r[1] for r in results),
                statistics.median(r[2] for r in results), sum(r[3] for r in results),
                " ".join("%.0f" % r for r in rates)), flush=True)
        stored = sum(support.read_mailbox(root, u).count(b"\n.\n") for u in users)
        print("messages stored: %d" % stored)
    finally:
        proc.terminate()
        proc.wait()
        support.remove_mail_root(root)


if __name__ == "__main__":
    main()
