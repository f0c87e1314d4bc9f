"""Behind a load balancer (CONTRACT.md section 7): PROXY protocol v1 and v2 headers, and certificates renewed in place."""

import os
import shutil
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from support import wait_for  # noqa: E402

import mailserver_smtp  # noqa: E402
import pop_server  # noqa: E402

DOMAIN = "mx.test"
BALANCER = "127.0.0.1"            # the tests' own address: the servers take it for a load balancer
UNLISTED = "127.0.0.2"            # another address, not in --proxy-from
RENEWED_CERT = os.path.join(support.REPO, "tests", "tls", "test-only-renewed-cert.pem")
RENEWED_KEY = os.path.join(support.REPO, "tests", "tls", "test-only-renewed-key.pem")


def has_unlisted_address():
    """True when this machine can connect from 127.0.0.2 (Linux routes all of 127/8 to lo)."""
    try:
        with socket.socket() as probe:
            probe.bind((UNLISTED, 0))
    except OSError:
        return False
    return True


def proxy_v1(source, port, destination="127.0.0.1", server_port=25):
    """A PROXY protocol v1 header (a text line) for a TCP client at source:port."""
    family = "TCP6" if ":" in source else "TCP4"
    if family == "TCP6" and ":" not in destination:
        destination = "::ffff:" + destination
    return ("PROXY %s %s %s %d %d\r\n" % (family, source, destination, port, server_port)).encode("ascii")


def proxy_v2(source, port, destination="127.0.0.1", server_port=25, command=0x21, tlvs=b""):
    """A PROXY protocol v2 header (binary) for a TCP client at source:port; command 0x20 is LOCAL."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    if family == socket.AF_INET6 and ":" not in destination:
        destination = "::ffff:" + destination
    addresses = (socket.inet_pton(family, source) + socket.inet_pton(family, destination)
                 + struct.pack("!HH", port, server_port) + tlvs)
    kind = 0x21 if family == socket.AF_INET6 else 0x11
    return mailserver_smtp.PROXY_V2_SIGNATURE + struct.pack("!BBH", command, kind, len(addresses)) + addresses


def proxy_v2_local():
    """A PROXY protocol v2 LOCAL header, as a balancer's health check sends it."""
    return mailserver_smtp.PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0)


def local_port(client):
    """The port a raw client's connection comes from."""
    return client.sock.getsockname()[1]


def closed_unanswered(client):
    """True when the server closed the connection without sending a byte (no greeting)."""
    try:
        return client.sock.recv(1) == b""
    except ConnectionResetError:       # closed with our bytes unread: still not a byte sent
        return True


class ProxyHeaderParsingTest(unittest.TestCase):
    """read_proxy_header and its parsers, in this process, on a socket pair: what is taken and what is refused."""

    OWN = ("127.0.0.1", 5555)     # the balancer's own address, as accept() gave it

    def read(self, data):
        """What read_proxy_header makes of data, and the bytes it left on the socket."""
        ours, theirs = socket.socketpair()
        with ours, theirs:
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)
            address = mailserver_smtp.read_proxy_header(ours, self.OWN, support.DEADLINE)
            left = b""
            while True:
                chunk = ours.recv(4096)
                if not chunk:
                    return address, left
                left += chunk

    def test_exactly_the_header_is_consumed(self):
        """v1 and v2 headers: the client's address, and every byte after the header still unread."""
        self.assertEqual(self.read(proxy_v1("192.0.2.1", 1) + b"EHLO a\r\n"), (("192.0.2.1", 1), b"EHLO a\r\n"))
        self.assertEqual(self.read(proxy_v2("192.0.2.2", 2, tlvs=b"\x04\x00\x01x") + b"\x16\x03\x01"),
                         (("192.0.2.2", 2), b"\x16\x03\x01"))

    def test_local_unknown_and_unspec_keep_the_balancers_address(self):
        """v2 LOCAL, v1 UNKNOWN and a v2 PROXY of family UNSPEC name no client: the balancer stays."""
        unspec = mailserver_smtp.PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x00, 0)
        for header in (proxy_v2_local(), b"PROXY UNKNOWN\r\n", unspec):
            with self.subTest(header=header):
                self.assertEqual(self.read(header)[0], self.OWN)

    def test_malformed_v1_lines_are_refused(self):
        """A port past 65535, a family that does not match, double spaces, a bare LF: each refused."""
        for line in (b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 25\r\n",
                     b"PROXY TCP4 2001:db8::1 2001:db8::2 4000 25\r\n",
                     b"PROXY TCP4  192.0.2.1 192.0.2.2 4000 25\r\n",
                     b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 25\n"):
            with self.subTest(line=line), self.assertRaises(mailserver_smtp.ProxyHeaderError):
                self.read(line)

    def test_a_v2_header_of_another_version_is_refused(self):
        """Version 1 in the binary header's version nibble: refused before its length is read."""
        with self.assertRaises(mailserver_smtp.ProxyHeaderError):
            self.read(mailserver_smtp.PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x11, 0x11, 65535))


class SMTPBehindBalancerTest(support.OneServerTestCase):
    """--proxy-from: the PROXY header's client is the client, for the log and the per-client limit."""

    server_args = ("--proxy-from", BALANCER + "/32", "--max-per-client", "1", "--domain", DOMAIN)

    def greeted(self, header, source=None):
        """A raw client that sent header and got the 220 greeting."""
        client = self.server.connect(source=source)
        client.send(header)
        self.addCleanup(client.close)
        self.assertEqual(client.reply()[0], 220)
        return client

    def test_a_v1_header_names_the_client_in_the_log(self):
        """A v1 header's source address and port are the session's peer in its log line."""
        client = self.greeted(proxy_v1("192.0.2.10", 40001))
        client.cmd_expecting("QUIT", 221)
        self.server.wait_for_output(r"connection from 192\.0\.2\.10:40001 closed")

    def test_a_v2_header_names_the_client_in_the_log(self):
        """A v2 header's source address and port (TLVs after it ignored) are the session's peer."""
        client = self.greeted(proxy_v2("192.0.2.11", 40002, tlvs=b"\x04\x00\x01x"))
        client.cmd_expecting("QUIT", 221)
        self.server.wait_for_output(r"connection from 192\.0\.2\.11:40002 closed")

    def test_a_v2_header_for_an_ipv6_client(self):
        """A v2 header over IPv6 (TCP6) names an IPv6 client, shown in brackets."""
        client = self.greeted(proxy_v2("2001:db8::7", 40003))
        client.cmd_expecting("QUIT", 221)
        self.server.wait_for_output(r"connection from \[2001:db8::7\]:40003 closed")

    def test_the_per_client_limit_counts_the_proxied_clients(self):
        """One balancer, three clients behind it at most one each: the second of 192.0.2.20 gets 421 4.7.0."""
        self.greeted(proxy_v1("192.0.2.20", 40010))
        self.greeted(proxy_v2("192.0.2.21", 40011))
        self.greeted(proxy_v1("2001:db8:1::20", 40012))
        with self.server.connect() as again:
            again.send(proxy_v2("192.0.2.20", 40013))
            self.assertEqual(again.line(), "421 4.7.0 %s Too many connections from your address" % DOMAIN)
            self.assertTrue(again.closed())
        self.server.wait_for_output(r"192\.0\.2\.20:40013: refused, 1 connections open from 192\.0\.2\.20")

    def test_a_v2_local_header_keeps_the_balancers_address(self):
        """LOCAL (a health check): greeted, and logged under the balancer's own address."""
        client = self.greeted(proxy_v2_local())
        port = local_port(client)
        client.cmd_expecting("QUIT", 221)
        self.server.wait_for_output(r"connection from 127\.0\.0\.1:%d closed" % port)

    def test_a_v1_unknown_header_keeps_the_balancers_address(self):
        """PROXY UNKNOWN (anything after it ignored): greeted, logged under the balancer's address."""
        client = self.greeted(b"PROXY UNKNOWN ignored words\r\n")
        port = local_port(client)
        client.cmd_expecting("QUIT", 221)
        self.server.wait_for_output(r"connection from 127\.0\.0\.1:%d closed" % port)

    def test_only_the_header_is_read_before_the_greeting(self):
        """A command sent at once behind the header is the first command line, answered after the 220."""
        client = self.greeted(proxy_v1("192.0.2.12", 40004) + b"HELO pipelined.test\r\n")
        self.assertEqual(client.reply()[0], 250)
        client.cmd_expecting("QUIT", 221)

    @unittest.skipUnless(has_unlisted_address(), "needs 127.0.0.2 on the loopback")
    def test_a_header_from_an_unlisted_address_is_a_command_line(self):
        """From an address not in --proxy-from the header is no header: greeted, then 500 for it."""
        client = self.greeted(b"", source=UNLISTED)
        self.assertEqual(client.cmd(proxy_v1("192.0.2.13", 40005).decode("ascii").rstrip())[0], 500)


class HeaderFaultsTest(support.BothServersTestCase):
    """From a listed address, a connection without a valid header is closed unanswered, with a log line."""

    TIMEOUT = 0.5

    @classmethod
    def setUpClass(cls):
        cls.root = support.make_mail_root()
        cls.servers = [support.ServerProcess(script, cls.root, "--proxy-from", BALANCER,
                                             "--timeout", str(cls.TIMEOUT))
                       for script in (support.SMTP_SCRIPT, support.POP_SCRIPT)]

    def assertClosedUnanswered(self, server, data, why, shut=False):
        """Send data (then end our side if shut): closed without a greeting, and the log says why."""
        with server.connect() as client:
            port = local_port(client)
            client.send(data)
            if shut:
                client.sock.shutdown(socket.SHUT_WR)
            self.assertTrue(closed_unanswered(client))
        server.wait_for_output(r"127\.0\.0\.1:%d: closed, no valid PROXY header: .*%s" % (port, why))

    def test_no_header_at_all_is_closed_after_the_timeout(self):
        """A client that waits for the greeting instead of sending a header is closed, never greeted."""
        smtp, _ = self.servers
        self.assertClosedUnanswered(smtp, b"", "timed out")

    def test_a_command_instead_of_a_header_is_closed(self):
        """A command line where the header is due: closed at once, unanswered."""
        smtp, _ = self.servers
        self.assertClosedUnanswered(smtp, b"EHLO client.test\r\n", "no PROXY header")

    def test_a_malformed_v1_header_is_closed(self):
        """A v1 header with an address that is none: closed, unanswered."""
        smtp, _ = self.servers
        self.assertClosedUnanswered(smtp, b"PROXY TCP4 192.0.2.300 127.0.0.1 4000 25\r\n", "bad address")

    def test_a_v1_header_longer_than_107_bytes_is_closed(self):
        """A v1 line that has no CRLF within 107 bytes: closed, unanswered, the rest never read."""
        smtp, _ = self.servers
        self.assertClosedUnanswered(smtp, b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n", "longer than 107")

    def test_a_v2_header_too_short_for_its_addresses_is_closed(self):
        """A v2 TCP4 header whose length leaves no room for the addresses: closed, unanswered."""
        smtp, _ = self.servers
        header = mailserver_smtp.PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 4) + b"\0" * 4
        self.assertClosedUnanswered(smtp, header, "too short")

    def test_a_v2_header_with_an_unknown_command_is_closed(self):
        """A v2 header whose command is neither LOCAL nor PROXY: closed, unanswered."""
        smtp, _ = self.servers
        self.assertClosedUnanswered(smtp, proxy_v2("192.0.2.1", 4000, command=0x22), "unknown v2")

    def test_a_header_cut_short_is_closed(self):
        """Half a v2 header, then the end of the connection: closed, unanswered, logged as cut short."""
        smtp, _ = self.servers
        self.assertClosedUnanswered(smtp, proxy_v2("192.0.2.1", 4000)[:20], "cut short", shut=True)

    def test_a_header_trickled_past_the_timeout_is_closed(self):
        """A v1 header at a byte every 0.1 s never trips an idle wait, but is cut after --timeout."""
        smtp, _ = self.servers
        header = proxy_v1("192.0.2.1", 4000)
        with smtp.connect() as client:
            port = local_port(client)
            stop = threading.Event()
            self.addCleanup(stop.set)
            threading.Thread(target=trickle, args=(client.sock, header, 0.1, stop), daemon=True).start()
            started = time.monotonic()
            self.assertTrue(closed_unanswered(client))
            self.assertLess(time.monotonic() - started, len(header) * 0.1 / 2, "cut before the header ended")
        smtp.wait_for_output(r"127\.0\.0\.1:%d: closed, no valid PROXY header: timed out" % port)

    def test_pop3_without_a_header_is_closed_unanswered(self):
        """The POP3 server, too, closes a balancer's connection that sends no header, without +OK."""
        _, pop = self.servers
        self.assertClosedUnanswered(pop, b"", "timed out")


def trickle(sock, data, every, stop):
    """Send data a byte every `every` seconds until it is sent, stop is set, or the server hangs up."""
    for byte in data:
        if stop.wait(every):
            return
        try:
            sock.send(bytes([byte]))
        except OSError:
            return


class POP3BehindBalancerTest(support.OneServerTestCase):
    """The POP3 server reads the same headers: its log and per-client limit see the proxied clients."""

    script = support.POP_SCRIPT
    server_args = ("--proxy-from", BALANCER, "--max-per-client", "1")

    def greeted(self, header, source=None):
        """A raw client that sent header and got the +OK greeting."""
        client = self.server.connect(source=source)
        self.addCleanup(client.close)
        client.send(header)
        self.assertTrue(client.line().startswith(pop_server.Replies.GREETING.split(" %s")[0] + " <"))
        return client

    def test_a_v1_header_names_the_client_in_the_log(self):
        """A POP3 session behind the balancer (send-proxy: v1) is logged under its client's address."""
        client = self.greeted(proxy_v1("192.0.2.30", 40020, server_port=110))
        client.send("USER alice\r\nPASS wonderland\r\nQUIT\r\n")
        self.assertEqual([client.line()[:3] for _ in range(3)], ["+OK"] * 3)
        self.server.wait_for_output(r"192\.0\.2\.30:40020: user alice, ")

    def test_the_per_client_limit_counts_the_proxied_clients(self):
        """A second connection of one proxied client gets -ERR [SYS/TEMP]; another client is greeted."""
        self.greeted(proxy_v2("192.0.2.31", 40021))
        with self.server.connect() as again:
            again.send(proxy_v1("192.0.2.31", 40022))
            self.assertEqual(again.line(), pop_server.Replies.BUSY_CLIENT)
        self.greeted(proxy_v1("192.0.2.32", 40023))

    @unittest.skipUnless(has_unlisted_address(), "needs 127.0.0.2 on the loopback")
    def test_a_header_from_an_unlisted_address_is_a_command_line(self):
        """From an address not in --proxy-from the header is no header: greeted, then -ERR for it."""
        client = self.greeted(b"", source=UNLISTED)
        client.send(proxy_v1("192.0.2.33", 40024))
        self.assertTrue(client.line().startswith("-ERR"))


class ProxyBeforeImplicitTLSTest(support.OneServerTestCase):
    """With --implicit-tls the PROXY header comes first, in clear, then the TLS handshake."""

    server_args = support.TLS_ARGS + ("--implicit-tls", "--proxy-from", BALANCER)

    def test_the_handshake_follows_the_header(self):
        """A v2 header, then TLS from the next byte: greeted inside TLS, logged under the proxied client."""
        with self.server.connect() as client:
            client.send(proxy_v2("192.0.2.40", 40030, server_port=465))
            client.wrap_tls()
            self.assertEqual(client.reply()[0], 220)
            client.cmd_expecting("QUIT", 221)
        self.server.wait_for_output(r"connection from 192\.0\.2\.40:40030 closed")


def served_certificate(server):
    """The certificate (DER) the server shows in a new implicit-TLS handshake, once the session has ended.

    The session's own last log line is waited for, so that what the server
    logged on the way is in its output too.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE   # which one is what we look at
    with server.connect() as client:
        port = local_port(client)
        client.wrap_tls(context)
        der = client.sock.getpeercert(binary_form=True)
        expect_greeting(client)
        client.cmd("QUIT")
    server.wait_for_output(r"connection from 127\.0\.0\.1:%d closed" % port)
    return der


def expect_greeting(client):
    """Read the SMTP greeting; AssertionError unless it is 220."""
    code, lines = client.reply()
    support.expect(code == 220, "greeting %r" % lines)


def der_of(path):
    """The certificate in a PEM file, as DER."""
    with open(path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


class CertificateRenewalTest(unittest.TestCase):
    """A certificate and key replaced on disk serve new connections; open sessions keep theirs."""

    def setUp(self):
        self.root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, self.root)
        self.folder = tempfile.mkdtemp(prefix="certs-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.cert, self.key = os.path.join(self.folder, "cert.pem"), os.path.join(self.folder, "key.pem")
        shutil.copy(support.TLS_CERT, self.cert)
        shutil.copy(support.TLS_KEY, self.key)
        self.server = support.ServerProcess(support.SMTP_SCRIPT, self.root, "--implicit-tls",
                                            "--tls-cert", self.cert, "--tls-key", self.key)
        self.addCleanup(self.server.close)
        self.assertEqual(served_certificate(self.server), der_of(support.TLS_CERT))

    def put(self, source, target):
        """Replace target by a copy of source the way an ACME client does: a new file renamed over it."""
        shutil.copy(source, target + ".new")
        os.replace(target + ".new", target)

    def test_a_renewed_pair_is_served_without_a_restart(self):
        """New files: a new handshake soon shows the new certificate; a session open before goes on."""
        with self.server.connect() as open_before:
            open_before.wrap_tls()
            expect_greeting(open_before)
            self.put(RENEWED_KEY, self.key)
            self.put(RENEWED_CERT, self.cert)
            wait_for(lambda: served_certificate(self.server) == der_of(RENEWED_CERT), interval=0.2)
            open_before.cmd_expecting("NOOP", 250)
            self.assertEqual(open_before.sock.getpeercert(binary_form=True), der_of(support.TLS_CERT))
        self.server.wait_for_output(r"TLS certificate .* reloaded")

    @unittest.skipUnless(hasattr(signal, "SIGHUP"), "no SIGHUP here")
    def test_sighup_makes_the_next_connection_look_at_once(self):
        """After SIGHUP the very next handshake uses the renewed pair, without waiting for the interval."""
        self.put(RENEWED_KEY, self.key)
        self.put(RENEWED_CERT, self.cert)
        self.server.proc.send_signal(signal.SIGHUP)
        self.assertEqual(served_certificate(self.server), der_of(RENEWED_CERT))
        self.assertTrue(self.server.alive())

    @unittest.skipUnless(hasattr(signal, "SIGHUP"), "no SIGHUP here")
    def test_a_broken_new_pair_is_logged_once_and_the_old_one_kept(self):
        """A new key that does not match the certificate: logged once, the old pair still served."""
        self.put(RENEWED_KEY, self.key)
        for _ in range(2):                      # two looks at the same broken pair
            self.server.proc.send_signal(signal.SIGHUP)
            self.assertEqual(served_certificate(self.server), der_of(support.TLS_CERT))
        self.server.wait_for_output(r"new TLS certificate or key not loaded, keeping the old pair")
        self.assertEqual(self.server.output().count("not loaded"), 1)


if __name__ == "__main__":
    unittest.main()
