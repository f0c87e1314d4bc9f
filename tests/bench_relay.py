"""Benchmark of mail for other domains: messages accepted, queued and relayed to a sink, end to end.

    python3 tests/bench_relay.py [--messages 2000] [--clients 10] [--size 2100] [--concurrency 4]

Starts the real server (--local-domains example.org) in a temporary mail
root, and a sink on loopback: a minimal SMTP server in this process (one
thread, a selector) that answers 250 to everything and counts the messages
it gets.  --clients threads submit --messages messages of --size bytes
for <user@[127.0.0.1]> (the server sends them to the sink, as to an MX, on
--mx-port), each thread in one session.  Prints the rate at which the
server acknowledged them (each 250 after the queue file's fsync), the
end-to-end rate (the first submission to the sink's last message), and the
server's CPU time per message and peak resident memory (VmHWM).  Not part of the test suite.
"""

import argparse
import os
import selectors
import smtplib
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402

LINE = b"x" * 66 + b"\r\n"
HEAD = b"From: bench@example.org\r\nTo: sink@[127.0.0.1]\r\nSubject: bench\r\n\r\n"


class Sink:
    """An SMTP server that takes every message (250 to all), counting them; driven by one selector thread."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.count = 0
        self.last = None             # time.monotonic() of the last message
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            for key, _ in self.selector.select():
                if key.data is None:
                    sock, _ = self.listener.accept()
                    sock.setblocking(True)
                    sock.sendall(b"220 sink ESMTP\r\n")
                    self.selector.register(sock, selectors.EVENT_READ, {"buffer": b"", "data": False})
                else:
                    self._readable(key.fileobj, key.data)

    def _readable(self, sock, state):
        chunk = sock.recv(65536)
        if not chunk:
            self.selector.unregister(sock)
            sock.close()
            return
        state["buffer"] += chunk
        replies = []
        while True:
            if state["data"]:
                end = state["buffer"].find(b"\r\n.\r\n")
                if end < 0:
                    break
                state["buffer"], state["data"] = state["buffer"][end + 5:], False
                self.count += 1
                self.last = time.monotonic()
                replies.append(b"250 2.0.0 Ok\r\n")
                continue
            line, found, rest = state["buffer"].partition(b"\r\n")
            if not found:
                break
            state["buffer"] = rest
            verb = line[:4].upper()
            if verb == b"DATA":
                state["data"] = True
                state["buffer"] = b"\r\n" + state["buffer"]     # so a '.' on the first line ends it too
                replies.append(b"354 go on\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 bye\r\n")
            elif verb == b"EHLO":
                replies.append(b"250-sink\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n")
            else:
                replies.append(b"250 Ok\r\n")
        if replies:
            sock.sendall(b"".join(replies))


def submit(port, count, body, results):
    """Send count messages in one session; record how long it took."""
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for _ in range(count):
            client.sendmail("bench@example.org", ["sink@[127.0.0.1]"], body)
    results.append(time.monotonic() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--size", type=int, default=len(HEAD) + 29 * len(LINE))
    parser.add_argument("--concurrency", type=int, default=4, help="the server's --relay-concurrency")
    args = parser.parse_args()
    body = HEAD + LINE * max(1, (args.size - len(HEAD)) // len(LINE))
    sink = Sink()
    root = support.make_mail_root()
    server = support.ServerProcess(support.SMTP_SCRIPT, root, "--local-domains", "example.org",
                                   "--mx-port", str(sink.port), "--relay-concurrency", str(args.concurrency),
                                   "--max-connections", str(4 * args.clients + 8))
    try:
        per_client = args.messages // args.clients
        total = per_client * args.clients
        results = []
        threads = [threading.Thread(target=submit, args=(server.port, per_client, body, results))
                   for _ in range(args.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        accepted = time.monotonic() - started
        support.wait_for(lambda: sink.count >= total, timeout=600, interval=0.01)
        support.wait_for(lambda: not support.queue_files(root), timeout=60, interval=0.01)
        end_to_end = sink.last - started
        print("%d messages of %d bytes, %d clients, --relay-concurrency %d"
              % (total, len(body), args.clients, args.concurrency))
        print("accepted (250 after fsync): %8.1f msgs/s" % (total / accepted))
        print("end to end (at the sink):   %8.1f msgs/s" % (total / end_to_end))
        print("server CPU per message:     %8.2f ms" % (1000 * support.cpu_seconds(server.proc.pid) / total))
        print("server peak RSS:            %8.1f MB" % support.peak_rss_mb(server.proc.pid))
    finally:
        server.close()
        support.remove_mail_root(root)


if __name__ == "__main__":
    main()
