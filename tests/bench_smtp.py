"""Benchmark of mailserver_smtp.py: messages per second and latency under concurrent clients.

    python tests/bench_smtp.py [--seconds 3] [--runs 3] [--clients 1,10,50]

Starts the real server in a temporary mail root and drives N concurrent
clients over raw sockets; each connection delivers one 2 KB message
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
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402

LINE = b"x" * 66 + b"\r\n"
BODY = b"From: bench@example.org\r\nTo: user0@example.org\r\nSubject: bench\r\n" + LINE * 29


class Client:
    """One benchmark client: a loop of whole SMTP conversations, one message each."""

    def __init__(self, port, login, stop_at):
        self.port = port
        self.script = [
            b"HELO bench.example.org\r\n",
            b"MAIL_FROM: <bench@example.org>\r\n",
            b"RCPT_TO: <%s@example.org>\r\n" % login.encode(),
            b"DATA\r\n",
            BODY + b".\r\n",
            b"QUIT\r\n",
        ]
        self.stop_at = stop_at
        self.latencies = []
        self.errors = 0

    def run(self):
        while time.monotonic() < self.stop_at:
            started = time.monotonic()
            try:
                ok = self.one_message()
            except OSError:
                ok = False
            if ok:
                self.latencies.append(time.monotonic() - started)
            else:
                self.errors += 1

    def one_message(self):
        sock = socket.create_connection(("127.0.0.1", self.port))
        try:
            buffer = b""
            expected = (b"220", b"250", b"250", b"250", b"354", b"250", b"221")
            for step, code in enumerate(expected):
                while b"\n" not in buffer:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return False
                    buffer += chunk
                line, _, buffer = buffer.partition(b"\n")
                if not line.startswith(code):
                    return False
                if step < len(self.script):
                    sock.sendall(self.script[step])
            return True
        finally:
            sock.close()


def run_level(port, clients, users, seconds):
    stop_at = time.monotonic() + seconds
    workers = [Client(port, "user%d" % (i % users), stop_at) for i in range(clients)]
    threads = [threading.Thread(target=w.run) for w in workers]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    latencies = sorted(x for w in workers for x in w.latencies)
    errors = sum(w.errors for w in workers)
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
