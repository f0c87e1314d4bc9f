"""Benchmark of mail for other domains: messages accepted, queued and relayed to a sink, end to end.

    python3 tests/bench_relay.py [--messages 2000] [--clients 10] [--size 2100] [--concurrency 4]
    python3 tests/bench_relay.py --dkim off,rsa,both --rounds 3     # signing off and on, alternating
    python3 tests/bench_relay.py --hostile 0.3 --rounds 3      # 30% of the destinations silent or tarpits
    python3 tests/bench_relay.py --target 127.0.0.1:2525 --target-pid PID --sink-port 2526 \
        --recipient sink@elsewhere.test      # the same load on another server, e.g. a private Postfix

Starts the real server (--local-domains example.org) in a temporary mail
root, and a sink on loopback: a minimal SMTP server in this process (one
thread, a selector) that answers 250 to everything and counts the messages
it gets.  --clients threads submit --messages messages of --size bytes
for <user@[127.0.0.1]> (the server sends them to the sink, as to an MX, on
--mx-port), each thread in one session.  Prints the rate at which the
server acknowledged them (each 250 after the queue file's fsync), the
end-to-end rate (the first submission to the sink's last message), and the
server's CPU time per message and peak resident memory (VmHWM).

--dkim MODES (comma-separated, default off) runs our server once per mode
and --rounds times over, alternating, each with a fresh root: off signs
nothing; rsa, ed25519 and both put the keys of tests/dkim/ into
ROOT/.dkim/example.org/, so every message is signed (CONTRACT.md section 9)
with RSA-2048, Ed25519, or one of each.  The medians per mode come last.

--hostile FRACTION: DOMAINS domains, each with an MX in a loopback DNS
responder (support.DNSResponder) pointing at the sink; for that fraction
of them the DNS never answers (every other one) or the MX is a tarpit
that sends its greeting one byte a second.  --clients clients submit for
--seconds, round-robin over all the domains; the sink counts what reaches
it for the healthy ones.  Each round runs clean (every domain healthy) and
hostile, alternating, and the healthy domains' deliveries per second of
the two are compared (the goal: 80% or more).  The server runs as in the
issue that asked for this: --retry-base 1, --relay-timeout 4.

--target HOST:PORT drives a server already running instead of ours (to
compare with another MTA under the same load): it must send --recipient
on to the sink, which then listens on --sink-port.  With --target-pid, the
CPU time and memory are those of that process and all its descendants
(Postfix is a master and its children): CPU used during the run, and the
largest sum of their resident (RSS) and proportional (PSS: shared pages
divided among their users) sizes, sampled every RSS_INTERVAL.  Not part of
the test suite.
"""

import argparse
import collections
import os
import selectors
import smtplib
import shutil
import socket
import statistics
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402

import mailserver_smtp  # noqa: E402

LINE = b"x" * 66 + b"\r\n"
HEAD = b"From: bench@example.org\r\nTo: sink@[127.0.0.1]\r\nSubject: bench\r\n\r\n"
RSS_INTERVAL = 0.2           # seconds between two looks at a process tree's memory
DKIM_KEYS = {"off": (), "rsa": ("rsa2048-pkcs8.pem",), "ed25519": ("ed25519-pkcs8.pem",),
             "both": ("rsa2048-pkcs8.pem", "ed25519-pkcs8.pem")}


class Sink:
    """An SMTP server that takes every message (250 to all), counting them; driven by one selector thread."""

    def __init__(self, port=0):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # a fixed port, run after run
        self.listener.bind(("127.0.0.1", port))
        self.domains = collections.Counter()   # recipient domain -> messages taken for it
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
                    self.selector.register(sock, selectors.EVENT_READ, {"buffer": b"", "data": False, "to": []})
                else:
                    self._readable(key.fileobj, key.data)

    def _readable(self, sock, state):
        try:
            chunk = sock.recv(65536)
        except ConnectionError:     # a client that resets rather than QUITs (a mail server's cache closing)
            chunk = b""
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
                self.domains.update(state["to"])
                state["to"] = []
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
            elif verb == b"RCPT":
                state["to"].append(line.rpartition(b"@")[2].rstrip(b">").decode("ascii", "replace").lower())
                replies.append(b"250 Ok\r\n")
            else:
                replies.append(b"250 Ok\r\n")
        if replies:
            sock.sendall(b"".join(replies))


class ProcessTree:
    """A server's processes (one, or a master and its children) as /proc shows them: CPU and memory."""

    def __init__(self, pid):
        self.pid = pid
        self.peak_rss = self.peak_pss = 0.0      # MB, the largest sums seen by sample()
        self.done = threading.Event()

    def pids(self):
        """The pid and those of its living descendants."""
        children = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                stat = read_stat(int(name))
                if stat:
                    children.setdefault(int(stat[1]), []).append(int(name))
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def cpu_seconds(self):
        """CPU time (user + system) used so far by the tree, its reaped children included (nan where unknown)."""
        total = 0.0
        for pid in self.pids():
            stat = read_stat(pid)
            if stat is None:
                continue             # ended meanwhile: its time is now its parent's cutime
            total += sum(int(field) for field in stat[11:15]) / os.sysconf("SC_CLK_TCK")
        return total if read_stat(self.pid) else float("nan")

    def sample(self):
        """Add the tree's memory now to the peaks; until stop(), every RSS_INTERVAL (a thread's body)."""
        while True:
            rss = pss = 0
            for pid in self.pids():
                sizes = memory_kb(pid)
                rss, pss = rss + sizes.get("Rss:", 0), pss + sizes.get("Pss:", 0)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss / 1024), max(self.peak_pss, pss / 1024)
            if self.done.wait(RSS_INTERVAL):
                return

    def stop(self):
        """End sample()."""
        self.done.set()


def read_stat(pid):
    """The fields of /proc/PID/stat after the command name (ppid first), or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def memory_kb(pid):
    """{"Rss:": kB, "Pss:": kB} of a process, from /proc/PID/smaps_rollup ({} if it is gone)."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            return {line.split()[0]: int(line.split()[1]) for line in f if line.startswith(("Rss:", "Pss:"))}
    except (OSError, ValueError, IndexError):
        return {}


def submit(target, count, body, recipient, results):
    """Send count messages in one session; record how long it took."""
    started = time.monotonic()
    with smtplib.SMTP(*target, timeout=60) as client:
        for _ in range(count):
            client.sendmail("bench@example.org", [recipient], body)
    results.append(time.monotonic() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--size", type=int, default=len(HEAD) + 29 * len(LINE))
    parser.add_argument("--concurrency", type=int, default=None,
                        help="the server's --relay-concurrency (default: the server's own default)")
    parser.add_argument("--target", metavar="HOST:PORT",
                        help="drive this running server instead of starting ours; it must relay to the sink")
    parser.add_argument("--target-pid", type=int, metavar="PID",
                        help="--target's process (e.g. Postfix's master): CPU and memory of it and its children")
    parser.add_argument("--sink-port", type=int, default=0, help="the sink's port (default: any free one)")
    parser.add_argument("--recipient", default="sink@[127.0.0.1]", help="the address every message is for")
    parser.add_argument("--dkim", default="off", help="signing modes to run: off, rsa, ed25519, both (default: off)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each --dkim mode, alternating (default: 1)")
    parser.add_argument("--hostile", type=float, metavar="FRACTION",
                        help="compare clean runs with runs where this fraction of the destinations is hostile")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each --hostile run (default: 20)")
    args = parser.parse_args()
    if args.hostile is not None:
        return hostile_rounds(args)
    modes = args.dkim.split(",")
    if any(mode not in DKIM_KEYS for mode in modes) or args.target and modes != ["off"]:
        parser.error("--dkim takes off, rsa, ed25519 and both (with our server only)")
    body = HEAD + LINE * max(1, (args.size - len(HEAD)) // len(LINE))
    sink = Sink(args.sink_port)
    if args.target:
        host, _, port = args.target.rpartition(":")
        run(args, body, sink, (host, int(port)), args.target_pid, None)
        return
    figures = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            figures[mode].append(run_ours(args, body, sink, mode))
    if len(modes) * args.rounds > 1:
        print("medians over %d rounds:" % args.rounds)
        for mode in modes:
            print("  dkim %-8s accepted %7.1f msgs/s, end to end %7.1f msgs/s, server CPU %6.2f ms/msg"
                  % ((mode,) + tuple(statistics.median(run[i] for run in figures[mode]) for i in range(3))))


def run_ours(args, body, sink, mode):
    """One run against our server in a fresh root, signing as mode says; (accepted, end to end, CPU ms)."""
    root = support.make_mail_root()
    for name in DKIM_KEYS[mode]:
        folder = os.path.join(root, ".dkim", "example.org")
        os.makedirs(folder, exist_ok=True)
        shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dkim", name),
                    os.path.join(folder, name.replace("-", "_")))
    server = support.ServerProcess(support.SMTP_SCRIPT, root, "--local-domains", "example.org",
                                   "--mx-port", str(sink.port), *concurrency_option(args),
                                   "--max-connections", str(4 * args.clients + 8))
    try:
        print("dkim %s:" % mode)
        return run(args, body, sink, ("127.0.0.1", server.port), server.proc.pid, root)
    finally:
        server.close()
        support.remove_mail_root(root)


def run(args, body, sink, target, pid, root):
    """Submit the messages, wait for all of them at the sink, print the figures."""
    tree = ProcessTree(pid) if pid else None
    if tree:
        threading.Thread(target=tree.sample, daemon=True).start()
        cpu_before = tree.cpu_seconds()
    per_client = args.messages // args.clients
    total = per_client * args.clients
    results = []
    sink_before = sink.count
    threads = [threading.Thread(target=submit, args=(target, per_client, body, args.recipient, results))
               for _ in range(args.clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    accepted = time.monotonic() - started
    support.wait_for(lambda: sink.count >= sink_before + total, timeout=600, interval=0.01)
    if root:
        support.wait_for(lambda: not support.queue_files(root), timeout=60, interval=0.01)
    end_to_end = sink.last - started
    print("%d messages of %d bytes, %d clients, to %s:%d%s"
          % (total, len(body), args.clients, target[0], target[1],
             "" if args.target else " (ours, --relay-concurrency %s)" % (args.concurrency or "default")))
    print("accepted (250):             %8.1f msgs/s" % (total / accepted))
    print("end to end (at the sink):   %8.1f msgs/s" % (total / end_to_end))
    cpu = None
    if tree:
        tree.stop()
        cpu = 1000 * (tree.cpu_seconds() - cpu_before) / total
        print("server CPU per message:     %8.2f ms" % cpu)
        print("server peak RSS (VmHWM):    %8.1f MB  (of pid %d alone)" % (support.peak_rss_mb(pid), pid))
        print("all its processes, peak:    %8.1f MB RSS, %.1f MB PSS  (%d now)"
              % (tree.peak_rss, tree.peak_pss, len(tree.pids())))
    return total / accepted, total / end_to_end, cpu


DOMAINS = 10                 # destinations of a --hostile run


def concurrency_option(args):
    """The --relay-concurrency to start our server with: --concurrency if given, else none (its default)."""
    return ("--relay-concurrency", str(args.concurrency)) if args.concurrency else ()


class Tarpit:
    """A mail exchanger that accepts and sends its greeting one byte a second, for ever: on 127.0.0.2:port."""

    def __init__(self, port):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.2", port))
        self.listener.listen(128)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            sock, _ = self.listener.accept()
            threading.Thread(target=self._trickle, args=(sock,), daemon=True).start()

    @staticmethod
    def _trickle(sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # no TIME_WAIT
        with sock:
            for byte in b"220 tarpit ESMTP\r\n" * 1000:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(1.0)          # the tarpit's pace


def hostile_rounds(args):
    """--hostile: clean and hostile runs, alternating; the healthy domains' deliveries per second of each."""
    sink = Sink(args.sink_port)
    tarpit = Tarpit(sink.port)
    hostile = set(range(round(DOMAINS * args.hostile)))
    print("%d domains, %d hostile (%s), %d clients, %g s a run, --relay-concurrency %d"
          % (DOMAINS, len(hostile), ", ".join("d%d: %s" % (d, "silent DNS" if d % 2 == 0 else "tarpit MX")
                                               for d in sorted(hostile)), args.clients, args.seconds,
             args.concurrency or mailserver_smtp.DEFAULT_RELAY_CONCURRENCY))
    rates = {"clean": [], "hostile": []}
    for _ in range(args.rounds):
        for kind in ("clean", "hostile"):
            rate = hostile_run(args, sink, hostile if kind == "hostile" else set(), hostile)
            rates[kind].append(rate)
            print("  %-8s healthy domains delivered %7.1f msgs/s" % (kind, rate), flush=True)
    clean, bad = statistics.median(rates["clean"]), statistics.median(rates["hostile"])
    print("medians: clean %.1f, hostile %.1f msgs/s to the healthy domains: %.0f%%"
          % (clean, bad, 100 * bad / clean))
    tarpit.listener.close()


def hostile_run(args, sink, hostile, uncounted):
    """One run for --seconds with the domains hostile hostile; deliveries per second to those not uncounted.

    Both kinds of run count the same domains: those healthy in a hostile run.
    """
    zone, drop = {}, set()
    for d in range(DOMAINS):
        zone[("d%d.test" % d, "MX")] = [(10, "mx.d%d.test" % d)]
        zone[("mx.d%d.test" % d, "A")] = ["127.0.0.2" if d in hostile and d % 2 else "127.0.0.1"]
        if d in hostile and d % 2 == 0:
            drop |= {"d%d.test" % d, "mx.d%d.test" % d}
    dns = support.DNSResponder(zone, drop=drop)
    root = support.make_mail_root()
    server = support.ServerProcess(support.SMTP_SCRIPT, root, "--local-domains", "example.org",
                                   "--dns-server", "%s:%d" % dns.address, "--mx-port", str(sink.port),
                                   *concurrency_option(args), "--retry-base", "1",
                                   "--relay-timeout", "4", "--max-connections", str(4 * args.clients + 8))
    healthy = ["d%d.test" % d for d in range(DOMAINS) if d not in uncounted]
    before = sum(sink.domains[d] for d in healthy)
    stop_at = time.monotonic() + args.seconds

    accepted = []

    def client(number):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
            sent = number
            while time.monotonic() < stop_at:
                smtp.sendmail("bench@example.org", ["u%d@d%d.test" % (sent, sent % DOMAINS)],
                              HEAD.replace(b"sink@[127.0.0.1]", b"u@d%d.test" % (sent % DOMAINS)))
                sent += args.clients
                accepted.append(1)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    delivered = sum(sink.domains[d] for d in healthy) - before
    elapsed = time.monotonic() - started
    rate = delivered / elapsed
    print("    accepted %.1f msgs/s (all domains), %d queued at the end, server CPU %.1f s"
          % (len(accepted) / elapsed, len(support.queue_files(root)), support.cpu_seconds(server.proc.pid)))
    server.close()
    dns.close()
    support.remove_mail_root(root)
    return rate


if __name__ == "__main__":
    main()
