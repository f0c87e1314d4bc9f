"""Benchmark of mailserver_smtp.py: messages and megabytes per second, latency, peak memory.

    python3 tests/bench_smtp.py [--seconds 3] [--runs 3] [--clients 1,10,50] [--size 2100]
    python3 tests/bench_smtp.py --clients 10 --size 1048576      # throughput of 1 MiB messages
    python3 tests/bench_smtp.py --memory                         # 20 clients x 9 MiB at once
    python3 tests/bench_smtp.py --recipients 2                   # each message for two mailboxes
    python3 tests/bench_smtp.py --auth                           # EHLO, AUTH PLAIN, own sender (checked)
    python3 tests/bench_smtp.py --aliases 1000                   # to aliases, from a 1,000-line aliases.txt
    python3 tests/bench_smtp.py --listeners 3                    # one process, clients spread over 3 ports
    python3 tests/bench_smtp.py --processes 3                    # three processes on one root, the same load
    python3 tests/bench_smtp.py --checks                         # mail from outside: SPF, DKIM, DMARC

Starts the real server in a temporary mail root and drives N concurrent
clients over raw sockets (one thread and a selector drive them all, so the
load generator costs little CPU); each connection delivers one message of
--size bytes (220, HELO, MAIL_FROM, RCPT_TO, DATA, body, QUIT, each waiting
for its reply) to one of --users mailboxes.  Prints msgs/s, MB/s and
p50/p99 latency per level, the median over the runs, and the server's peak
resident memory (VmHWM).  --memory instead sends 20 messages of 9 MiB at
once and prints the peak memory.  --checks makes the server check mail from
outside (CONTRACT.md section 10): it runs with --local-domains behind a
"balancer" (each connection starts with a PROXY header for 192.0.2.1) and
asks a loopback DNS server (support.DNSResponder) that publishes SPF and
DMARC for the sender's domain; it first prints the latency of one session
with a cold cache and one with a warm cache, then the levels (warm cache).
Not part of the test suite.
"""

import argparse
import base64
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402

LINE = b"x" * 66 + b"\r\n"
HEAD = b"From: bench@example.org\r\nTo: user0@example.org\r\nSubject: bench\r\n"
CHECKED_SENDER = b"bench@example.com"          # --checks: the sender's domain publishes SPF and DMARC
CHECKED_ZONE = {("example.com", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"],
                ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject"]}
PROXY_HEADER = b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 25\r\n"
DEFAULT_SIZE = len(HEAD) + 29 * len(LINE)       # about 2 KB, the figure quoted since round 1
MEMORY_CLIENTS = 20
MEMORY_SIZE = 9 * 1024 * 1024


def body_of(size):
    """A message body of about size bytes: three headers, then 68-byte lines."""
    return HEAD + LINE * max(1, (size - len(HEAD)) // len(LINE))


class Conversation:
    """One client's current SMTP conversation: which reply it waits for, what it sends next."""

    def __init__(self, logins, body, selector, auth=False, checks=False):
        if auth:       # a submission: logged in as the first login, sending as itself (the sender check)
            own = logins[0].encode()
            login = b"AUTH PLAIN %s\r\n" % base64.b64encode(b"\0%s\0pw" % own)
            greeting = (b"EHLO bench.example.org\r\n", login, b"MAIL FROM:<%s@example.org>\r\n" % own)
            body = body.replace(b"From: bench@", b"From: Bench <%s@" % own, 1).replace(b"\r\n", b">\r\n", 1)
            expected = (b"220", b"250", b"235", b"250")
        elif checks:   # from outside, behind a balancer: a sender whose SPF and DMARC pass
            greeting = (b"HELO bench.example.com\r\n", b"MAIL_FROM: <%s>\r\n" % CHECKED_SENDER)
            body = body.replace(b"From: bench@example.org", b"From: " + CHECKED_SENDER, 1)
            expected = (b"220", b"250", b"250")
        else:
            greeting = (b"HELO bench.example.org\r\n", b"MAIL_FROM: <bench@example.org>\r\n")
            expected = (b"220", b"250", b"250")
        self.script = (
            *greeting,
            *[b"RCPT_TO: <%s@example.org>\r\n" % login.encode() for login in logins],
            b"DATA\r\n",
            body + b".\r\n",
            b"QUIT\r\n",
        )
        self.EXPECTED = expected + (b"250",) * len(logins) + (b"354", b"250", b"221")
        self.selector = selector
        self.sock = None
        self.prefix = PROXY_HEADER if checks else b""

    def start(self, port):
        self.sock = socket.socket()
        self.sock.setblocking(False)
        self.sock.connect_ex(("127.0.0.1", port))
        self.step = 0
        self.buffer = b""
        self.out = memoryview(self.prefix)
        self.started = time.monotonic()
        self.selector.register(self.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.prefix else 0), self)

    def readable(self):
        """Handle arriving bytes; return True when the conversation is over, False to go on."""
        chunk = self.sock.recv(4096)
        if not chunk:
            raise ConnectionError("server closed early")
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            if line[3:4] == b"-":            # a line of a multiline reply (EHLO's): its last one counts
                continue
            if not line.startswith(self.EXPECTED[self.step]):
                raise ConnectionError("unexpected reply %r" % line)
            if self.step == len(self.script):
                return True
            self.out = memoryview(self.script[self.step])
            self.step += 1
            self.writable()
        return False

    def writable(self):
        """Send what the socket takes of the pending command or message; wait to send the rest."""
        try:
            self.out = self.out[self.sock.send(self.out):]
        except BlockingIOError:
            pass
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
        self.selector.modify(self.sock, events, self)

    def finish(self):
        self.selector.unregister(self.sock)
        self.sock.close()


def drive(selector, ended):
    """Run every conversation in selector until all are over; ended(conversation, True/None) at each end.

    One thread drives every connection through a selector, so the load
    generator stays cheap and leaves the CPU to the server under test.
    True means the conversation went through, None that it failed.
    """
    while selector.get_map():
        for key, events in selector.select(timeout=60):
            conversation = key.data
            try:
                if events & selectors.EVENT_WRITE:
                    conversation.writable()
                done = conversation.readable() if events & selectors.EVENT_READ else False
            except OSError:
                done = None
            if done is not False:
                conversation.finish()
                ended(conversation, done)


def run_level(ports, clients, users, seconds, body, recipients=1, auth=False, checks=False, aliases=0):
    """Keep `clients` conversations going at once for `seconds`, client i on ports[i % len(ports)];
    return msgs/s, p50, p99, errors.

    aliases: the recipients are that many aliases (alias<k> leads to user<k mod users>), not the users.
    """
    selector = selectors.DefaultSelector()
    latencies, errors = [], []
    stop_at = time.monotonic() + seconds

    def ended(conversation, done):
        now = time.monotonic()
        if done:
            latencies.append(now - conversation.started)
        else:
            errors.append(conversation)
        if now < stop_at:
            conversation.start(conversation.port)

    for i in range(clients):
        logins = ["alias%d" % ((i * 37 + k) % aliases) if aliases else "user%d" % ((i + k) % users)
                  for k in range(recipients)]
        conversation = Conversation(logins, body, selector, auth, checks)
        conversation.port = ports[i % len(ports)]
        conversation.start(conversation.port)
    started = time.monotonic()
    drive(selector, ended)
    elapsed = time.monotonic() - started
    latencies.sort()
    if not latencies:
        return 0.0, float("nan"), float("nan"), len(errors)
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(latencies) / elapsed, p50 * 1000, p99 * 1000, len(errors)


def start_server(root, *extra, listeners=1):
    """Start the server with its log in a file (as in real use), not in a pipe we must drain: (proc, ports)."""
    log = tempfile.TemporaryFile()
    listen = ["--listen", "127.0.0.1:0"] * (listeners - 1)
    proc = subprocess.Popen([sys.executable, support.SMTP_SCRIPT, "0", "--host", "127.0.0.1",
                             "--root", root, "--max-connections", "500", "--max-per-client", "500"]
                            + listen + list(extra), stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def ports():
        log.seek(0)
        found = [int(port) for _, port in support.LISTENING.findall(log.read().decode())]
        return len(found) >= listeners and found
    return proc, support.wait_for(ports)


def count_messages(path):
    """How many messages a mailbox file holds, read a chunk at a time."""
    count, tail = 0, b""
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                data = tail + chunk
                count += data.count(b"\n.\n") - tail.count(b"\n.\n")
                tail = data[-2:]
    except FileNotFoundError:
        pass
    return count


def measure_memory(port, pid):
    """Send MEMORY_CLIENTS messages of MEMORY_SIZE bytes at once; print the server's peak memory."""
    before = support.peak_rss_mb(pid)
    selector = selectors.DefaultSelector()
    body = body_of(MEMORY_SIZE)
    for i in range(MEMORY_CLIENTS):
        Conversation(["user%d" % i], body, selector).start(port)
    started, outcomes = time.monotonic(), []
    drive(selector, lambda conversation, done: outcomes.append(done))
    print("%d clients x %.1f MiB at once: %d delivered, %d errors, %.1f s; "
          "peak server RSS %.1f MB (%.1f MB before)" % (
              MEMORY_CLIENTS, len(body) / 2 ** 20, outcomes.count(True), outcomes.count(None),
              time.monotonic() - started, support.peak_rss_mb(pid), before))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--runs", type=int, default=3, help="runs per level; the median is printed")
    parser.add_argument("--clients", default="1,10,50", help="comma-separated client counts")
    parser.add_argument("--users", type=int, default=10, help="mailboxes the clients deliver to")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="bytes per message")
    parser.add_argument("--recipients", type=int, default=1, help="mailboxes each message goes to")
    parser.add_argument("--auth", action="store_true",
                        help="log in with AUTH PLAIN and send as the login (with --local-domains example.org)")
    parser.add_argument("--listeners", type=int, default=1, help="listeners of the one server (clients spread)")
    parser.add_argument("--processes", type=int, default=1, help="servers on the one root (clients spread)")
    parser.add_argument("--checks", action="store_true",
                        help="check mail from outside (SPF, DKIM, DMARC) against a loopback DNS server")
    parser.add_argument("--aliases", type=int, default=0, metavar="N",
                        help="write an aliases.txt of N lines and send to aliases instead of users")
    parser.add_argument("--memory", action="store_true",
                        help="measure peak memory with %d clients x 9 MiB instead" % MEMORY_CLIENTS)
    args = parser.parse_args()
    users = {"user%d" % i: "pw" for i in range(max(args.users, MEMORY_CLIENTS))}
    root = support.make_mail_root(users)
    with open(os.path.join(root, "aliases.txt"), "w") as f:
        f.writelines("alias%d: user%d\n" % (k, k % args.users) for k in range(args.aliases))
    dns = support.DNSResponder(CHECKED_ZONE) if args.checks else None
    extra = ("--local-domains", "example.org") if args.auth or args.checks else ()
    if dns:
        extra += ("--proxy-from", "127.0.0.1", "--relay-networks", "", "--dns-server", "%s:%d" % dns.address)
    servers = [start_server(root, *extra, listeners=args.listeners) for _ in range(args.processes)]
    procs, ports = [proc for proc, _ in servers], [port for _, found in servers for port in found]
    proc = procs[0]
    try:
        if args.memory:
            return measure_memory(ports[0], proc.pid)
        body = body_of(args.size)
        print("%d-byte messages" % len(body))
        if dns:
            cold, warm = (run_level(ports, 1, args.users, 0, body, checks=True)[1] for _ in range(2))
            print("one session with checks: %.2f ms with a cold DNS cache (%d queries), %.2f ms warm"
                  % (cold, len(dns.queries), warm))
        print("%8s %10s %8s %9s %9s %7s %11s" % ("clients", "msgs/s", "MB/s", "p50 ms", "p99 ms", "errors",
                                                 "CPU ms/msg"))
        for clients in [int(n) for n in args.clients.split(",")]:
            cpu = sum(map(support.cpu_seconds, (p.pid for p in procs)))
            results = [run_level(ports, clients, args.users, args.seconds, body, args.recipients, args.auth,
                                 args.checks, args.aliases) for _ in range(args.runs)]
            cpu = (sum(map(support.cpu_seconds, (p.pid for p in procs))) - cpu) / sum(
                r[0] * args.seconds for r in results)
            rates = [r[0] for r in results]
            rate = statistics.median(rates)
            print("%8d %10.0f %8.1f %9.2f %9.2f %7d %11.3f   runs: %s" % (
                clients, rate, rate * len(body) / 1e6, statistics.median(r[1] for r in results),
                statistics.median(r[2] for r in results), sum(r[3] for r in results), 1000 * cpu,
                " ".join("%.0f" % r for r in rates)), flush=True)
        stored = sum(count_messages(support.mailbox_path(root, u)) for u in users)
        print("messages stored: %d; peak server RSS %.1f MB" % (stored, support.peak_rss_mb(proc.pid)))
    finally:
        for each in procs:
            each.terminate()
            each.wait()
        support.remove_mail_root(root)
        if dns:
            dns.close()


if __name__ == "__main__":
    main()
