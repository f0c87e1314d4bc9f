"""Checks on mail that comes in (CONTRACT.md section 10): SPF, DKIM, DMARC, Authentication-Results, the DNS cache.

SPF's rules are tested on check_spf with a zone in a dict, each case from
RFC 7208's text; the server's part (where checks apply, the replies, the
stored fields, DNS trouble) with a real server behind a "load balancer"
(PROXY headers give any client address) asking support.DNSResponder.
"""

import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from test_proxy import proxy_v1  # noqa: E402

import mailserver_smtp as smtp  # noqa: E402

DOMAIN = "mx.example.org"            # our --domain: the authserv-id
LOCAL = "example.org"                # our --local-domains
BALANCER = "127.0.0.1"               # the tests' address: every connection starts with a PROXY header


def zone_lookup(zone, log=None):
    """A lookup(name, type, deadline) over {(name, type): [records] or "TIMEOUT"/"SERVFAIL"}, as DNSCache.query answers."""
    def lookup(name, rtype, deadline=None):
        name = name.lower().rstrip(".")
        if log is not None:
            log.append((name, rtype))
        value = zone.get((name, rtype))
        if value in ("TIMEOUT", "SERVFAIL"):
            raise smtp.DNSError(value, name)
        if value is None:
            if any(key[0] == name for key in zone):
                return []
            raise smtp.DNSError(smtp.DNS_NO_SUCH_DOMAIN, name, temporary=False)
        return list(value)
    return lookup


def spf(zone, ip="192.0.2.3", sender="strong-bad@email.example.com", helo="mx.example.org", log=None):
    """check_spf over a dict zone."""
    return smtp.check_spf(zone_lookup(zone, log), ip, sender, helo, DOMAIN)


def txt(domain, *texts):
    """A zone entry: domain's TXT records."""
    return {(domain, "TXT"): list(texts)}


def zone_of(*parts):
    """The union of zone entries."""
    zone = {}
    for part in parts:
        zone.update(part)
    return zone


class CheckedServerTestCase(unittest.TestCase):
    """A server with --local-domains behind a balancer, its DNS a DNSResponder of zone (counting queries)."""

    zone = {}
    extra_args = ()

    @classmethod
    def setUpClass(cls):
        cls.dns = support.DNSResponder(cls.zone)
        cls.root = support.make_mail_root()
        try:
            cls.server = support.ServerProcess(
                support.SMTP_SCRIPT, cls.root, "--local-domains", LOCAL, "--domain", DOMAIN,
                "--proxy-from", BALANCER, "--relay-networks", "192.0.2.250/32",
                "--dns-server", "%s:%d" % cls.dns.address, *cls.extra_args)
        except BaseException:
            cls.dns.close()
            support.remove_mail_root(cls.root)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        cls.dns.close()
        support.remove_mail_root(cls.root)

    def setUp(self):
        support.remove_mailboxes(self.root)

    def client(self, ip, helo="mail.example.com", ehlo=True):
        """A session from client address ip (in a PROXY header), greeted with EHLO (or HELO)."""
        client = self.server.connect()
        self.addCleanup(client.close)
        client.send(proxy_v1(ip, 40000))
        self.assertEqual(client.reply()[0], 220)
        client.cmd_expecting(("EHLO " if ehlo else "HELO ") + helo, 250)
        return client

    def send(self, ip, sender, body, recipients=("alice@example.org",), helo="mail.example.com"):
        """One transaction from ip: the replies to MAIL, each RCPT and (if a recipient is taken) the data."""
        client = self.client(ip, helo)
        replies = [client.cmd("MAIL FROM:<%s>" % sender)]
        replies += [client.cmd("RCPT TO:<%s>" % rcpt) for rcpt in recipients]
        if any(code == 250 for code, _ in replies[1:]):
            client.cmd_expecting("DATA", 354)
            client.send(body + b".\r\n")
            replies.append(client.reply())
        client.cmd("QUIT")
        return replies

    def stored(self, login="alice"):
        """The messages in a user's mailbox, as bytes."""
        return support.stored_messages(self.root, login)
