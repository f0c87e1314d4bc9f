"""Checks on mail that comes in (CONTRACT.md section 10): SPF, DKIM, DMARC, Authentication-Results, the DNS cache.

SPF's rules are tested on check_spf with a zone in a dict, each case from
RFC 7208's text; the server's part (where checks apply, the replies, the
stored fields, DNS trouble) with a real server behind a "load balancer"
(PROXY headers give any client address) asking support.DNSResponder.
"""

import base64
import functools
import os
import random
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

    @classmethod
    def setUpClass(cls):
        cls.dns = support.DNSResponder(cls.zone)
        cls.root = support.make_mail_root()
        try:
            cls.server = support.ServerProcess(
                support.SMTP_SCRIPT, cls.root, "--local-domains", LOCAL, "--domain", DOMAIN,
                "--proxy-from", BALANCER, "--relay-networks", "192.0.2.250/32",
                "--dns-server", "%s:%d" % cls.dns.address)
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


# --------------------------------------------------------------------------
# SPF (RFC 7208), on check_spf with a zone in a dict
# --------------------------------------------------------------------------

class SPFRecordsTest(unittest.TestCase):
    """RFC 7208 4.3 to 4.7: which domain is checked, which record counts, the default result."""

    def test_a_domain_without_a_record_is_none(self):
        """4.5: no SPF record (only other TXT, or no TXT at all, or NXDOMAIN) gives none."""
        self.assertEqual(spf(txt("email.example.com", "google-site-verification=x")).result, "none")
        self.assertEqual(spf({("email.example.com", "A"): ["192.0.2.1"]}).result, "none")
        self.assertEqual(spf({}).result, "none")

    def test_the_version_is_v_spf1_then_a_space_or_the_end(self):
        """4.5: 'v=spf10' is no SPF record; 'V=SpF1' is one (case-insensitive); 'v=spf1' alone is neutral."""
        self.assertEqual(spf(txt("email.example.com", "v=spf10 -all")).result, "none")
        self.assertEqual(spf(txt("email.example.com", "V=SpF1 -all")).result, "fail")
        self.assertEqual(spf(txt("email.example.com", "v=spf1")).result, "neutral")

    def test_two_records_are_a_permerror(self):
        """4.5: more than one record is a permerror, even two identical ones."""
        for second in ("v=spf1 +all", "v=spf1 -all"):
            self.assertEqual(spf(txt("email.example.com", "v=spf1 -all", second)).result, "permerror")

    def test_a_record_that_is_not_ascii_is_a_permerror(self):
        """3.1: a record is ASCII (the resolver gives octets as Latin-1); other TXT records do not matter."""
        self.assertEqual(spf(txt("email.example.com", "v=spf1 a:\xef\xbb\xbfx.example.com -all")).result,
                         "permerror")
        self.assertEqual(spf(txt("email.example.com", "v=spf1 -all", "\x96")).result, "fail")

    def test_a_domain_spf_cannot_check_is_none(self):
        """4.3: a single label, an empty label, a label over 63 octets, an address literal: none, no query."""
        log = []
        for sender in ("a@localhost", "a@x..example.com", "a@%s.example.com" % ("x" * 64), "a@[192.0.2.3]"):
            self.assertEqual(spf(txt("email.example.com", "v=spf1 -all"), sender=sender, log=log).result, "none")
        self.assertEqual(log, [])

    def test_no_local_part_stands_for_postmaster(self):
        """4.3: a sender without a local part is checked as postmaster@domain."""
        zone = zone_of(txt("example.net", "v=spf1 -all exp=why.example.net"), txt("why.example.net", "%{l}"))
        result = spf(zone, sender="@example.net")
        self.assertEqual((result.result, result.explanation), ("fail", "postmaster"))

    def test_the_null_sender_checks_helo(self):
        """2.4: for MAIL FROM:<> the HELO name is checked, as postmaster@HELO."""
        zone = zone_of(txt("helo.example.com", "v=spf1 ip4:192.0.2.3 -all"))
        result = spf(zone, sender="", helo="helo.example.com")
        self.assertEqual((result.result, result.identity, result.sender), ("pass", "helo", "postmaster@helo.example.com"))
        self.assertEqual(spf(zone, sender="", helo="not-a-fqdn").result, "none")

    def test_no_match_is_neutral(self):
        """4.7: a record whose mechanisms all fail to match gives neutral."""
        self.assertEqual(spf(txt("email.example.com", "v=spf1 ip4:198.51.100.1")).result, "neutral")

    def test_terms_are_separated_by_spaces_only(self):
        """4.6.1: one or more SP between terms and at the end; any other character is part of a term."""
        self.assertEqual(spf(txt("email.example.com", "v=spf1  ip4:192.0.2.3   -all ")).result, "pass")
        self.assertEqual(spf(txt("email.example.com", "v=spf1 ip4:192.0.2.3\t-all")).result, "permerror")

    def test_an_ipv4_mapped_client_is_its_ipv4_address(self):
        """5: ::ffff:192.0.2.3 is checked as 192.0.2.3."""
        self.assertEqual(spf(txt("email.example.com", "v=spf1 ip4:192.0.2.3 -all"), ip="::ffff:192.0.2.3").result,
                         "pass")


class SPFMechanismsTest(unittest.TestCase):
    """RFC 7208 4.6.2 and 5: each mechanism and qualifier."""

    def record(self, text, ip="192.0.2.3", extra=None):
        return spf(zone_of(txt("email.example.com", text), extra or {}), ip=ip)

    def test_qualifiers(self):
        """4.6.2: + pass (the default), - fail, ~ softfail, ? neutral."""
        for text, result in (("all", "pass"), ("+all", "pass"), ("-all", "fail"), ("~all", "softfail"),
                             ("?all", "neutral")):
            self.assertEqual(self.record("v=spf1 " + text).result, result, text)

    def test_ip4_and_ip6_with_prefixes(self):
        """5.6: the client's address in the network; the other family never matches; no prefix is the host."""
        self.assertEqual(self.record("v=spf1 ip4:192.0.2.0/24 -all").result, "pass")
        self.assertEqual(self.record("v=spf1 ip4:192.0.2.4 -all").result, "fail")
        self.assertEqual(self.record("v=spf1 ip4:0.0.0.0/0 -all").result, "pass")
        self.assertEqual(self.record("v=spf1 ip6:2001:db8::/32 -all", ip="2001:db8:1::5").result, "pass")
        self.assertEqual(self.record("v=spf1 ip6:2001:db8:8000::/33 -all", ip="2001:db8:7fff::1").result, "fail")
        self.assertEqual(self.record("v=spf1 ip6:2001:db8::5 -all", ip="2001:db8::5").result, "pass")
        self.assertEqual(self.record("v=spf1 ip6:::/0 -all").result, "fail")     # an IPv4 client
        self.assertEqual(self.record("v=spf1 ip4:0.0.0.0/0 -all", ip="2001:db8::5").result, "fail")

    def test_bad_networks_are_permerrors(self):
        """5.6: a prefix past 32/128, a leading zero, a bad address, a missing one: permerror."""
        for text in ("ip4:192.0.2.0/33", "ip4:192.0.2.0/024", "ip4:192.0.2.300", "ip4:192.0.02.1", "ip4",
                     "ip4:", "ip6:2001:db8::/129", "ip6:2001:db8:::1", "ip4:192.0.2.3//32", "ip6",
                     "ip4:192.0.2.0/" + "9" * 5000, "a//" + "1" * 5000):
            self.assertEqual(self.record("v=spf1 %s -all" % text).result, "permerror", text)

    def test_a(self):
        """5.3: the current domain's or the named domain's A (or AAAA) records, with dual CIDR lengths."""
        extra = {("email.example.com", "A"): ["192.0.2.3"], ("other.example.com", "A"): ["192.0.2.200"],
                 ("other.example.com", "AAAA"): ["2001:db8::200"]}
        self.assertEqual(self.record("v=spf1 a -all", extra=extra).result, "pass")
        self.assertEqual(self.record("v=spf1 a:other.example.com -all", extra=extra).result, "fail")
        self.assertEqual(self.record("v=spf1 a:other.example.com/24 -all", extra=extra).result, "pass")
        self.assertEqual(self.record("v=spf1 a:other.example.com//64 -all", ip="2001:db8::1", extra=extra).result,
                         "pass")
        self.assertEqual(self.record("v=spf1 a:other.example.com/24//128 -all", ip="2001:db8::1",
                                     extra=extra).result, "fail")
        self.assertEqual(self.record("v=spf1 a/33 -all", extra=extra).result, "permerror")
        self.assertEqual(self.record("v=spf1 a: -all", extra=extra).result, "permerror")

    def test_mx(self):
        """5.4: an address of one of the exchangers; more than 10 MX records is a permerror."""
        extra = {("email.example.com", "MX"): [(10, "mx1.example.com"), (20, "mx2.example.com")],
                 ("mx1.example.com", "A"): ["198.51.100.1"], ("mx2.example.com", "A"): ["192.0.2.3"]}
        self.assertEqual(self.record("v=spf1 mx -all", extra=extra).result, "pass")
        self.assertEqual(self.record("v=spf1 mx//64 -all", ip="2001:db8::1", extra=extra).result, "fail")
        many = {("email.example.com", "MX"): [(i, "mx%d.example.com" % i) for i in range(11)]}
        many.update({("mx%d.example.com" % i, "A"): ["192.0.2.3"] for i in range(11)})
        self.assertEqual(self.record("v=spf1 mx -all", extra=many).result, "permerror")
        many[("email.example.com", "MX")].pop()
        self.assertEqual(self.record("v=spf1 mx -all", extra=many).result, "pass")

    def test_ptr(self):
        """5.5: a validated name (its address leads back) that is the target or ends in it matches."""
        extra = {("3.2.0.192.in-addr.arpa", "PTR"): ["mail.example.com", "fake.example.com"],
                 ("mail.example.com", "A"): ["192.0.2.3"], ("fake.example.com", "A"): ["198.51.100.9"]}
        self.assertEqual(self.record("v=spf1 ptr -all", extra=extra).result, "fail")   # not email.example.com
        self.assertEqual(self.record("v=spf1 ptr:example.com -all", extra=extra).result, "pass")
        self.assertEqual(self.record("v=spf1 ptr:fake.example.com -all", extra=extra).result, "fail")
        broken = dict(extra)
        broken[("3.2.0.192.in-addr.arpa", "PTR")] = "SERVFAIL"      # 5.5: a PTR DNS error matches nothing
        self.assertEqual(self.record("v=spf1 ptr:example.com -all", extra=broken).result, "fail")

    def test_exists(self):
        """5.7: the expanded name has an A record, whatever the client's family."""
        extra = {("3.2.0.192.list.example.net", "A"): ["127.0.0.2"], ("x.example.net", "A"): ["127.0.0.2"]}
        self.assertEqual(self.record("v=spf1 -exists:%{ir}.list.example.net +all", extra=extra).result, "fail")
        self.assertEqual(self.record("v=spf1 exists:x.example.net -all", ip="2001:db8::1", extra=extra).result,
                         "pass")
        self.assertEqual(self.record("v=spf1 exists -all").result, "permerror")

    def test_include(self):
        """5.2: the included domain's pass matches; its fail, softfail, neutral do not; none is a permerror."""
        def check(included):
            return spf(zone_of(txt("email.example.com", "v=spf1 include:inc.example.net -all"),
                               txt("inc.example.net", included))).result
        self.assertEqual(check("v=spf1 ip4:192.0.2.3 -all"), "pass")
        for other in ("v=spf1 -all", "v=spf1 ~all", "v=spf1 ?all", "v=spf1"):
            self.assertEqual(check(other), "fail", other)
        self.assertEqual(check("not spf"), "permerror")
        self.assertEqual(check("v=spf1 nonsense"), "permerror")
        self.assertEqual(spf(zone_of(txt("email.example.com", "v=spf1 include:inc.example.net -all"),
                                     {("inc.example.net", "TXT"): "TIMEOUT"})).result, "temperror")

    def test_a_term_of_no_known_form_is_a_permerror_wherever_it_is(self):
        """4.6: syntax errors anywhere are found before the evaluation: an earlier match does not hide them."""
        for text in ("ip4:192.0.2.3 -all moo", "ip4:192.0.2.3 -all:foo", "ip4:192.0.2.3 all/8",
                     "ip4:192.0.2.3 include", "ip4:192.0.2.3 redirect:example.net", "ip4:192.0.2.3 a:foo.1",
                     "ip4:192.0.2.3 a:example.com%", "ip4:192.0.2.3 exists:%{x}.example.com",
                     "ip4:192.0.2.3 mx:example.com:25", "ip4:192.0.2.3 =all", "ip4:192.0.2.3 1up=foo",
                     "ip4:192.0.2.3 moo.cow/far_out=man:dog/cat"):
            self.assertEqual(self.record("v=spf1 " + text).result, "permerror", text)

    def test_damaged_records_give_a_result_never_an_exception(self):
        """Records damaged at random (characters, huge numbers, control octets) end in one of the 7 results."""
        chance = random.Random(7208)
        bases = ["v=spf1 a mx/24 ptr:%{d2} ip4:192.0.2.0/24 ip6:2001:db8::/32 include:i.example.net "
                 "exists:%{ir}.%{v}.x.example.com redirect=r.example.com exp=e.%{d}",
                 "v=spf1 -all exp=%{l1r-}.%{d}", "v=spf1 a:%{s}.x%{h}.y mx:%{o3r.-+,/_=}.z ~all"]
        pieces = list("%{}:/.-+,=_0123456789 aAzZ~?!\x00\x7f\xff") + ["9" * 5000]
        results = set()
        for _ in range(2000):
            record = list(chance.choice(bases))
            for _ in range(chance.randint(1, 4)):
                record.insert(chance.randrange(len(record) + 1), chance.choice(pieces))
                del record[chance.randrange(len(record))]
            text = "".join(record)
            zone = zone_of(txt("email.example.com", text), txt("i.example.net", "v=spf1 " + text[7:]),
                           txt("r.example.com", text), txt("e.email.example.com", "%{c} %{t} " + text))
            results.add(spf(zone).result)
        self.assertLessEqual(results, {"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"})
        self.assertIn("permerror", results)

    def test_unknown_modifiers_are_ignored(self):
        """6: name=value of an unknown modifier, with a valid name and macro-string, is ignored."""
        self.assertEqual(self.record("v=spf1 moo.cow-far_out=man:dog/cat ip4:192.0.2.3 -all").result, "pass")


class SPFModifiersTest(unittest.TestCase):
    """RFC 7208 6: redirect= and exp=."""

    def test_redirect_is_used_only_without_a_match(self):
        """6.1: redirect counts after all mechanisms; with an 'all' it is never looked at."""
        zone = zone_of(txt("email.example.com", "v=spf1 ip4:198.51.100.1 redirect=other.example.net"),
                       txt("other.example.net", "v=spf1 ip4:192.0.2.3 -all"),
                       txt("all.example.com", "v=spf1 redirect=loop.example.invalid ~all"))
        self.assertEqual(spf(zone).result, "pass")
        log = []
        self.assertEqual(spf(zone, sender="x@all.example.com", log=log).result, "softfail")
        self.assertEqual(log, [("all.example.com", "TXT")])

    def test_redirect_to_a_domain_without_a_record_is_a_permerror(self):
        """6.1: the result of redirect to a domain with no SPF record is permerror, not none."""
        zone = txt("email.example.com", "v=spf1 redirect=nothing.example.net")
        self.assertEqual(spf(zone).result, "permerror")

    def test_each_modifier_at_most_once(self):
        """6: two redirect= or two exp= are a permerror."""
        for text in ("v=spf1 redirect=a.example.net redirect=b.example.net", "v=spf1 -all exp=a.example.net exp=b.example.net"):
            self.assertEqual(spf(txt("email.example.com", text)).result, "permerror", text)

    def test_exp_explains_a_fail_with_macros(self):
        """6.2: the exp= TXT record, macros expanded, c, r and t allowed there (and only there)."""
        zone = zone_of(txt("email.example.com", "v=spf1 -all exp=explain.%{d}"),
                       txt("explain.email.example.com", "%{c} may not send for %{o} (%{r}, %{l}%_%%)"))
        self.assertEqual(spf(zone).explanation, "192.0.2.3 may not send for email.example.com "
                                               "(mx.example.org, strong-bad %)")
        zone[("email.example.com", "TXT")] = ["v=spf1 -all exp=%{c}.example.com"]
        self.assertEqual(spf(zone).result, "permerror")

    def test_exp_in_trouble_means_our_default(self):
        """6.2: no record, two records, a bad macro, a DNS error: the default explanation, the fail stays."""
        for explain in ({}, txt("why.example.com", "one", "two"), txt("why.example.com", "bad %x macro"),
                        {("why.example.com", "TXT"): "TIMEOUT"}):
            result = spf(zone_of(txt("email.example.com", "v=spf1 -all exp=why.example.com"), explain))
            self.assertEqual(result.result, "fail")
            self.assertEqual(result.explanation, "email.example.com does not designate 192.0.2.3 as permitted "
                                                 "sender of strong-bad@email.example.com")

    def test_exp_comes_from_the_deciding_record(self):
        """6.2: an included record's exp= is not used; after a redirect the target's exp= is, not the first's."""
        zone = zone_of(txt("email.example.com", "v=spf1 exp=first.example.com redirect=second.example.net"),
                       txt("second.example.net", "v=spf1 include:third.example.org -all exp=second-why.example.net"),
                       txt("third.example.org", "v=spf1 -all exp=third-why.example.org"),
                       txt("first.example.com", "first"), txt("second-why.example.net", "second %{d}"),
                       txt("third-why.example.org", "third"))
        self.assertEqual(spf(zone).explanation, "second second.example.net")

    def test_an_explanation_is_made_safe_for_a_reply(self):
        """Our rule: only printable ASCII, and at most 300 characters, of a domain's text reach a reply."""
        zone = zone_of(txt("email.example.com", "v=spf1 -all exp=why.example.com"),
                       txt("why.example.com", "line" + "x" * 400))
        self.assertEqual(len(spf(zone).explanation), smtp.SPF_MAX_EXPLANATION)


class SPFMacrosTest(unittest.TestCase):
    """RFC 7208 7: each macro letter and transformer, with the examples of 7.4."""

    def expand(self, text, ip="192.0.2.3", explain=False, zone=None):
        check = smtp.SPFCheck(zone_lookup(zone or {}), ip, "strong-bad@email.example.com", "helo.example.com",
                              DOMAIN, time.monotonic() + 5)
        return check.expand(text, "email.example.com", explain)

    def test_the_examples_of_section_7_4(self):
        """7.4's tables, for 192.0.2.3 and 2001:db8::cb01."""
        for macro, expansion in (
                ("%{s}", "strong-bad@email.example.com"), ("%{o}", "email.example.com"),
                ("%{d}", "email.example.com"), ("%{d4}", "email.example.com"), ("%{d3}", "email.example.com"),
                ("%{d2}", "example.com"), ("%{d1}", "com"), ("%{dr}", "com.example.email"),
                ("%{d2r}", "example.email"), ("%{l}", "strong-bad"), ("%{l-}", "strong.bad"),
                ("%{lr}", "strong-bad"), ("%{lr-}", "bad.strong"), ("%{l1r-}", "strong"),
                ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
                ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
                ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
                ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
                ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net")):
            self.assertEqual(self.expand(macro), expansion, macro)
        self.assertEqual(self.expand("%{ir}.%{v}._spf.%{d2}", ip="2001:db8::cb01"),
                         "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com")

    def test_the_other_letters(self):
        """7.2: h, c, r, t (the last three in explanations), p, and upper case URL-escaped (7.3)."""
        zone = {("3.2.0.192.in-addr.arpa", "PTR"): ["mx.email.example.com"],
                ("mx.email.example.com", "A"): ["192.0.2.3"]}
        self.assertEqual(self.expand("%{h}"), "helo.example.com")
        self.assertEqual(self.expand("%{c} %{r}", explain=True), "192.0.2.3 " + DOMAIN)
        self.assertEqual(self.expand("%{c}", ip="2001:db8::cb01", explain=True), "2001:db8::cb01")
        self.assertLessEqual(abs(int(self.expand("%{t}", explain=True)) - time.time()), 5)
        self.assertEqual(self.expand("%{p}", zone=zone), "mx.email.example.com")
        self.assertEqual(self.expand("%{p}"), "unknown")
        self.assertEqual(self.expand("%{S}"), "strong-bad%40email.example.com")
        self.assertEqual(self.expand("%%%_%-"), "% %20")

    def test_delimiters_split_and_dots_join(self):
        """7.3: every delimiter given splits; the parts are joined with dots."""
        self.assertEqual(self.expand("%{l-+}"), "strong.bad")
        self.assertEqual(self.expand("%{sr.}"), "com.example.strong-bad@email")
        self.assertEqual(self.expand("%{l2r-+}"), "bad.strong")
        self.assertEqual(self.expand("%{d" + "9" * 5000 + "}"), "email.example.com")   # more parts than there are

    def test_bad_macros(self):
        """7.1: an unknown letter, a lone %, a zero DIGIT, delimiters before 'r', c/r/t outside exp=: permerror."""
        for text in ("%{x}", "50%", "%{d0}", "%{s.r}", "%{c}", "%{d"):
            with self.assertRaises(smtp.SPFError, msg=text):
                self.expand(text)

    def test_a_long_expansion_loses_labels_on_the_left(self):
        """7.3: a name over 253 characters keeps its right-hand labels."""
        check = smtp.SPFCheck(zone_lookup({}), "192.0.2.3", ("x" * 60 + ".") * 3 + "a@b.example.com",
                              "h.example.com", DOMAIN, time.monotonic() + 5)
        name = check.target("%{l}.%{l}.example.com", "email.example.com")
        self.assertLessEqual(len(name), 253)
        self.assertTrue(name.endswith(".example.com") and not name.startswith("."))


class SPFLimitsTest(unittest.TestCase):
    """RFC 7208 4.6.4: 10 DNS-querying terms, 2 void lookups; loops; the deadline; DNS failures."""

    def includes(self, count):
        """A record with count includes of domains that pass nothing, then ip4 of the client."""
        zone = txt("email.example.com", "v=spf1 %s ip4:192.0.2.3 -all"
                   % " ".join("include:i%d.example.net" % i for i in range(count)))
        for i in range(count):
            zone.update(txt("i%d.example.net" % i, "v=spf1 -all"))
        return spf(zone).result

    def test_ten_terms_and_not_one_more(self):
        """Exactly 10 DNS-querying terms pass; the eleventh is a permerror."""
        self.assertEqual(self.includes(10), "pass")
        self.assertEqual(self.includes(11), "permerror")

    def test_every_querying_term_counts(self):
        """a, mx, ptr, exists, include and redirect count; ip4, ip6, all and exp= do not."""
        zone = zone_of({("email.example.com", "A"): ["198.51.100.7"],
                        ("email.example.com", "MX"): [(0, "email.example.com")],
                        ("3.2.0.192.in-addr.arpa", "PTR"): ["other.example.com"],
                        ("other.example.com", "A"): ["198.51.100.8"], ("a.example.com", "A"): ["127.0.0.2"]},
                       txt("i.example.net", "v=spf1 -all"), txt("r.example.com", "v=spf1 ip4:192.0.2.3"))

        def check(terms):
            zone[("email.example.com", "TXT")] = ["v=spf1 " + terms]
            return spf(zone).result
        for term in ("a", "mx", "ptr", "include:i.example.net"):
            self.assertEqual(check(" ".join([term] * 10) + " ip4:192.0.2.3"), "pass", term)
            self.assertEqual(check(" ".join([term] * 11) + " ip4:192.0.2.3"), "permerror", term)
        self.assertEqual(check("a " * 9 + "?exists:a.example.com"), "neutral")
        self.assertEqual(check("a " * 10 + "?exists:a.example.com"), "permerror")
        self.assertEqual(check("a " * 9 + "redirect=r.example.com"), "pass")
        self.assertEqual(check("a " * 10 + "redirect=r.example.com"), "permerror")
        self.assertEqual(check("a " * 10 + "ip4:198.51.100.1 " * 5 + "ip6:2001:db8::1 exp=e.example.com "
                               "ip4:192.0.2.3 -all"), "pass")

    def test_two_void_lookups_and_not_a_third(self):
        """Lookups answered with no record (empty, NXDOMAIN): two are fine, the third is a permerror."""
        two = "v=spf1 a:v1.example.com a:v2.example.com ip4:192.0.2.3 -all"
        self.assertEqual(spf(txt("email.example.com", two)).result, "pass")
        self.assertEqual(spf(txt("email.example.com", two.replace("ip4", "a:v3.example.com ip4"))).result,
                         "permerror")

    def test_include_loops_end_in_a_permerror(self):
        """An include of itself, or a redirect circle, runs into the term limit."""
        self.assertEqual(spf(txt("email.example.com", "v=spf1 include:email.example.com -all")).result,
                         "permerror")
        self.assertEqual(spf(zone_of(txt("email.example.com", "v=spf1 redirect=b.example.net"),
                                     txt("b.example.net", "v=spf1 redirect=email.example.com"))).result,
                         "permerror")

    def test_dns_failures_are_temperrors(self):
        """4.4 and 5: a timeout or SERVFAIL of the record or of a mechanism's lookup is a temperror."""
        for failure in ("TIMEOUT", "SERVFAIL"):
            self.assertEqual(spf({("email.example.com", "TXT"): failure}).result, "temperror")
            zone = zone_of(txt("email.example.com", "v=spf1 a:broken.example.com -all"),
                           {("broken.example.com", "A"): failure})
            self.assertEqual(spf(zone).result, "temperror")

    def test_the_whole_check_has_a_deadline(self):
        """Past the check's deadline the next lookup ends it with temperror."""
        result = smtp.check_spf(zone_lookup(txt("email.example.com", "v=spf1 -all")), "192.0.2.3",
                                "a@email.example.com", "h.example.com", DOMAIN, timeout=-1)
        self.assertEqual(result.result, "temperror")


# --------------------------------------------------------------------------
# DMARC (RFC 7489), on check_dmarc with a zone in a dict
# --------------------------------------------------------------------------

def spf_pass(domain):
    """An SPFResult that passed for domain."""
    return smtp.SPFResult("pass", "mailfrom", "bounce@" + domain, domain, "ip4:192.0.2.3")


def dkim_pass(domain):
    """A DKIMResult that passed for d=domain."""
    return smtp.DKIMResult("pass", "good signature", domain, "sel", "abcdefghij")


class DMARCTest(unittest.TestCase):
    """RFC 7489 3.1, 6.3 and 6.6: the record, the organizational domain, alignment, p=, sp= and pct=."""

    def dmarc(self, zone, author, spf=None, dkim=(), log=None):
        return smtp.check_dmarc(zone_lookup(zone, log), author, spf, list(dkim))

    def test_no_record_is_none(self):
        """6.6.3: no record at the domain nor at its organizational domain: none."""
        self.assertEqual(self.dmarc({}, "example.com")[0], "none")
        self.assertEqual(self.dmarc(txt("_dmarc.example.com", "v=spf1 -all"), "example.com")[0], "none")

    def test_the_record_must_start_with_v_dmarc1_and_have_p(self):
        """6.3, 6.6.3: v=DMARC1 first, exactly; no valid p= means no record, or p=none with a rua=."""
        for text in ("p=reject; v=DMARC1", "v=dmarc1; p=reject", "v=DMARC1; p=bogus", "v=DMARC1"):
            self.assertEqual(self.dmarc(txt("_dmarc.example.com", text), "example.com")[0], "none", text)
        self.assertEqual(self.dmarc(txt("_dmarc.example.com", "v=DMARC1; p=bogus; rua=mailto:d@example.com"),
                                    "example.com")[:2], ("fail", "none"))
        self.assertEqual(self.dmarc(txt("_dmarc.example.com", "v=DMARC1; p=reject", "v=DMARC1; p=none"),
                                    "example.com")[0], "none")      # two records: no policy

    def test_aligned_and_unaligned(self):
        """3.1: relaxed takes the same organizational domain, strict (adkim=s, aspf=s) the same domain."""
        relaxed = txt("_dmarc.example.com", "v=DMARC1; p=reject")
        strict = txt("_dmarc.example.com", "v=DMARC1; p=reject; adkim=s; aspf=s")
        for zone, identifier, result in ((relaxed, "example.com", "pass"), (relaxed, "mail.example.com", "pass"),
                                         (relaxed, "example.net", "fail"), (relaxed, "badexample.com", "fail"),
                                         (strict, "example.com", "pass"), (strict, "mail.example.com", "fail")):
            self.assertEqual(self.dmarc(zone, "example.com", dkim=[dkim_pass(identifier)])[0], result, identifier)
            self.assertEqual(self.dmarc(zone, "example.com", spf=spf_pass(identifier))[0], result, identifier)
        self.assertEqual(self.dmarc(relaxed, "news.example.com", spf=spf_pass("example.com"))[0], "pass")

    def test_only_a_passing_identifier_counts(self):
        """A failing signature or SPF result does not align, whatever its domain."""
        zone = txt("_dmarc.example.com", "v=DMARC1; p=reject")
        failed = smtp.DKIMResult("fail", "body hash did not verify", "example.com", "sel", "abc")
        softfail = smtp.SPFResult("softfail", "mailfrom", "a@example.com", "example.com", "~all")
        self.assertEqual(self.dmarc(zone, "example.com", spf=softfail, dkim=[failed])[:2], ("fail", "reject"))
        self.assertEqual(self.dmarc(zone, "example.com", spf=softfail, dkim=[failed, dkim_pass("example.com")])[0],
                         "pass")

    def test_policies(self):
        """6.3: p= for the domain, sp= for a subdomain under the organizational domain's record, pct= samples."""
        zone = txt("_dmarc.example.com", "v=DMARC1; p=quarantine; sp=reject")
        self.assertEqual(self.dmarc(zone, "example.com")[:2], ("fail", "quarantine"))
        self.assertEqual(self.dmarc(zone, "a.b.example.com")[:2], ("fail", "reject"))
        zone.update(txt("_dmarc.b.example.com", "v=DMARC1; p=none"))
        self.assertEqual(self.dmarc(zone, "b.example.com")[:2], ("fail", "none"))    # its own record: p=
        sampled = txt("_dmarc.example.com", "v=DMARC1; p=reject; pct=50")
        self.assertEqual(self.dmarc(sampled, "example.com")[:2], ("fail", "none"))
        self.assertEqual(self.dmarc(txt("_dmarc.example.com", "v=DMARC1; p=reject; pct=100"), "example.com")[:2],
                         ("fail", "reject"))
        for bad in ("9" * 5000, "\xb9", "-5", "101"):       # 6.3: an invalid value takes the default, 100
            self.assertEqual(self.dmarc(txt("_dmarc.example.com", "v=DMARC1; p=reject; pct=" + bad),
                                        "example.com")[:2], ("fail", "reject"), bad)

    def test_the_organizational_domain_is_found_by_the_walk(self):
        """Section 10's rule: the shortest ancestor of 2+ labels with a record; one query per name, 8 labels at most."""
        zone = txt("_dmarc.b.example.co.uk", "v=DMARC1; p=reject")
        log = []
        result = self.dmarc(zone, "mail.b.example.co.uk", spf=spf_pass("smtp.b.example.co.uk"), log=log)
        self.assertEqual(result[0], "pass")       # aligned through b.example.co.uk, not through co.uk
        self.assertEqual([name for name, _ in log], ["_dmarc.co.uk", "_dmarc.example.co.uk", "_dmarc.b.example.co.uk",
                                                     "_dmarc.mail.b.example.co.uk"])
        self.assertEqual(self.dmarc(zone, "b.example.co.uk", spf=spf_pass("example.co.uk"))[0], "fail")
        log = []
        deep = ".".join("l%d" % i for i in range(12)) + ".example.com"
        self.dmarc({}, deep, log=log)
        self.assertEqual(len(log), 7 + 1)          # names of 2 to 8 labels, then the domain itself
        self.assertEqual(len(set(log)), len(log))

    def test_a_dns_failure_is_a_temperror(self):
        """A DMARC lookup that fails (not NXDOMAIN) gives temperror: no policy is applied."""
        self.assertEqual(self.dmarc({("_dmarc.example.com", "TXT"): "SERVFAIL"}, "example.com")[:2],
                         ("temperror", "none"))


class AuthenticationResultsTest(unittest.TestCase):
    """RFC 8601 2.2: our field's form; which fields are ours (forged) and go."""

    def test_the_field(self):
        """One method a line; a dkim= per signature with header.b's first 8 characters (quoted if need be),
        and for a signature that did not pass, why in a comment."""
        spf = smtp.SPFResult("softfail", "mailfrom", "a@example.com", "example.com", "~all")
        dkim = [dkim_pass("example.com"), smtp.DKIMResult("fail", "body hash did not verify", "example.com", "s2",
                                                          "a/b+c=dEFGH")]
        self.assertEqual(smtp.authentication_results(DOMAIN, spf, dkim, "pass", "example.com"),
                         b"Authentication-Results: mx.example.org;\n\tspf=softfail smtp.mailfrom=example.com;\n"
                         b"\tdkim=pass header.d=example.com header.s=sel header.b=abcdefgh;\n"
                         b"\tdkim=fail header.d=example.com header.s=s2 header.b=\"a/b+c=dE\" "
                         b"(body hash did not verify);\n\tdmarc=pass header.from=example.com\n")
        self.assertIn(b"\tdkim=none;\n", smtp.authentication_results(DOMAIN, spf, [], "none", "example.com"))
        unread = smtp.DKIMResult("permerror", "no d= (tag; missing)", "", "", "")    # no empty property values
        self.assertIn(b"\tdkim=permerror (no d= tag; missing);\n",
                      smtp.authentication_results(DOMAIN, spf, [unread], "none", "example.com"))

    def test_our_authserv_id_in_any_case_and_spacing(self):
        """RFC 8601 2.2, 5: the first word after CFWS names the authserv-id; case and comments do not matter."""
        for value in (" mx.example.org; spf=pass", "MX.Example.ORG;spf=pass", " (forged) mx.example.org ; x",
                      "\tmx.example.org.; dkim=pass", " mx.example.org 1; none", "mx.example.org"):
            self.assertEqual(smtp.authserv_id_of(value).lower().rstrip("."), DOMAIN, value)
        for value in (" other.example.org; spf=pass", " mx.example.org.evil; spf=pass", "x mx.example.org;"):
            self.assertNotEqual(smtp.authserv_id_of(value).lower().rstrip("."), DOMAIN, value)


# --------------------------------------------------------------------------
# The DNS cache, against a real (loopback) DNS server
# --------------------------------------------------------------------------

class Clock:
    """A monotonic clock the test moves."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class DNSCacheTest(unittest.TestCase):
    """DNSCache: one cache for every type, TTLs with a floor and a ceiling, RFC 2308 negative caching, bounds."""

    def setUp(self):
        self.dns = support.DNSResponder({("example.com", "TXT"): ["v=spf1 -all"], ("example.com", "A"): ["192.0.2.1"],
                                         ("www.example.com", "CNAME"): ["example.com"],
                                         ("broken.example.com", "*"): "SERVFAIL"})
        self.addCleanup(self.dns.close)
        self.clock = Clock()
        self.cache = smtp.DNSCache(smtp.Resolver([self.dns.address], timeout=2, attempts=1), clock=self.clock)

    def asked(self, *queries):
        """Ask each (name, type) and return how many reached the DNS server."""
        before = len(self.dns.queries)
        for name, rtype in queries:
            try:
                self.cache.query(name, rtype)
            except smtp.DNSError:
                pass
        return len(self.dns.queries) - before

    def test_every_type_is_cached_for_its_ttl(self):
        """An answer is asked once while its TTL (300 s here) lasts, then again."""
        queries = [("example.com", "TXT"), ("example.com", "A"), ("www.example.com", "A")]
        self.assertEqual(self.asked(*queries), 3)
        self.clock.now += 299
        self.assertEqual(self.asked(*queries), 0)
        self.clock.now += 2
        self.assertEqual(self.asked(*queries), 3)
        self.assertEqual(self.cache.query("www.example.com", "A"), ["192.0.2.1"])

    def test_the_floor_and_the_ceiling(self):
        """A TTL of 0 is kept for the floor; a TTL of years for the ceiling only."""
        self.dns.ttl = 0
        self.assertEqual(self.asked(("example.com", "A")), 1)
        self.clock.now += smtp.DNS_TTL_FLOOR - 1
        self.assertEqual(self.asked(("example.com", "A")), 0)
        self.clock.now += 2
        self.dns.ttl = 10 ** 8
        self.assertEqual(self.asked(("example.com", "A")), 1)
        self.clock.now += smtp.DNS_TTL_CEILING + 1
        self.assertEqual(self.asked(("example.com", "A")), 1)

    def test_negative_answers_are_cached_by_their_soa(self):
        """RFC 2308 5: NXDOMAIN and no-data answers are kept for the SOA's negative TTL; without an SOA not at all."""
        queries = [("nothing.example.com", "TXT"), ("example.com", "MX")]
        self.assertEqual(self.asked(*queries), 2)
        self.assertEqual(self.asked(*queries), 2)
        self.dns.negative_ttl = 60
        self.assertEqual(self.asked(*queries), 2)
        self.clock.now += 59
        self.assertEqual(self.asked(*queries), 0)
        with self.assertRaises(smtp.DNSError) as raised:
            self.cache.query("nothing.example.com", "TXT")
        self.assertFalse(raised.exception.temporary)
        self.assertEqual(self.cache.query("example.com", "MX"), [])
        self.clock.now += 2
        self.assertEqual(self.asked(*queries), 2)

    def test_failures_are_remembered_briefly(self):
        """RFC 2308 7: a SERVFAIL is kept for a short while (DNS_FAILURE_TTL), then asked again."""
        self.assertEqual(self.asked(("broken.example.com", "TXT")), 1)
        self.assertEqual(self.asked(("broken.example.com", "TXT")), 0)
        self.clock.now += smtp.DNS_FAILURE_TTL + 1
        self.assertEqual(self.asked(("broken.example.com", "TXT")), 1)

    def test_bounded_by_entries_and_octets(self):
        """The least recently used answers go when there are too many, or too many octets."""
        cache = smtp.DNSCache(self.cache.resolver, entries=2, clock=self.clock)
        self.cache = cache
        self.assertEqual(self.asked(("example.com", "TXT"), ("example.com", "A"), ("example.com", "TXT"),
                                    ("www.example.com", "A")), 3)
        self.assertEqual(self.asked(("example.com", "TXT")), 0)   # used last: kept
        self.assertEqual(self.asked(("example.com", "A")), 1)     # the least recently used: gone
        self.dns.zone[("big.example.com", "TXT")] = ["x" * 200] * 10
        self.cache = smtp.DNSCache(self.cache.resolver, octets=1000, clock=self.clock)
        self.asked(("example.com", "A"), ("big.example.com", "TXT"))
        self.assertLessEqual(self.cache.octets, 1000)
        self.assertEqual(self.asked(("example.com", "A")), 1)     # pushed out by the large answer

    def test_a_silent_server_gives_a_temporary_error_by_the_deadline(self):
        """A query that gets no answer ends with a temporary DNSError at the deadline given."""
        self.dns.drop.add("example.com")
        cache = smtp.DNSCache(smtp.Resolver([self.dns.address], timeout=30, attempts=3))
        started = time.monotonic()
        with self.assertRaises(smtp.DNSError) as raised:
            cache.query("example.com", "TXT", deadline=started + 0.5)
        self.assertTrue(raised.exception.temporary)
        self.assertLess(time.monotonic() - started, 3)
        lookup = functools.partial(cache.query, deadline=time.monotonic() + 0.5)
        result = smtp.check_spf(lookup, "192.0.2.3", "a@example.com", "h.example.com", DOMAIN, timeout=0.5)
        self.assertEqual(result.result, "temperror")


# --------------------------------------------------------------------------
# The server: where the checks apply, what they refuse, what each copy is told
# --------------------------------------------------------------------------

import test_dkim  # noqa: E402  (the RFC 8463 keys, records and signed message)

SIGNED = "signed.example.net"        # a domain whose mail we sign here with the RFC 8463 keys
UDP_WATCH = """\
# Injected by the tests: every UDP socket the process makes is noted in the file UDP_WATCH names.
import os, socket
_log, _init = os.environ["UDP_WATCH"], socket.socket.__init__
def __init__(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.type == socket.SOCK_DGRAM:
        with open(_log, "a") as log:
            log.write("udp\\n")
socket.socket.__init__ = __init__
"""


def dkim_zone():
    """The RFC 8463 key records, at football.example.com and at SIGNED."""
    zone = {}
    for name, texts in test_dkim.RFC8463_ZONE.items():
        zone[(name, "TXT")] = texts
        zone[(name.replace("football.example.com", SIGNED), "TXT")] = texts
    return zone


def signed_message(header, body=b"Hello.\r\n", selectors=("test", "brisbane"), domain=SIGNED):
    """header + body with DKIM signatures of domain by the RFC 8463 keys (Part 3's signer)."""
    keys = test_dkim.rfc8463_keys()
    fields = smtp.dkim_sign([header + b"\r\n" + body], domain, [(s, keys[s]) for s in selectors])
    return fields + header + b"\r\n" + body


def results_field(message):
    """The lines of a stored message's Authentication-Results field (ours is the first)."""
    lines = message.split(b"\n")
    start = next(i for i, line in enumerate(lines) if line.lower().startswith(b"authentication-results:"))
    end = start + 1
    while lines[end][:1] in (b" ", b"\t"):
        end += 1
    return b"\n".join(lines[start:end]).decode()


def methods(message):
    """{method: [result words]} of the first Authentication-Results of a stored message."""
    found = {}
    for part in results_field(message).split(";")[1:]:
        words = part.split()
        found.setdefault(words[0].partition("=")[0], []).append(" ".join(words))
    return found


class ServerSPFTest(CheckedServerTestCase):
    """SPF at MAIL, refusal at RCPT, every other result taken and recorded."""

    zone = zone_of(
        txt("example.com", "v=spf1 ip4:192.0.2.1 ip6:2001:db8:1::/48 -all exp=why.example.com"),
        txt("why.example.com", "%{i} may not send mail for %{d}"),
        txt("softfail.example.net", "v=spf1 ~all"), txt("neutral.example.net", "v=spf1 ?all"),
        txt("broken.example.net", "v=spf1 ip4:192.0.2.1 -all bogus"),
        txt("split.example.net", ("v=spf1 ip4:192.0", ".2.1 -all")),
        txt("helo.example.net", "v=spf1 ip4:192.0.2.1 -all"),
        txt("odd.example.net", "v=spf1 a:foo:bar/baz.example.net a:per%%cent%_space.example.net -all"),
        {("failing.example.net", "TXT"): "SERVFAIL", ("foo:bar/baz.example.net", "A"): ["192.0.2.7"],
         ("per%cent space.example.net", "A"): ["192.0.2.8"]})

    def message(self, sender_domain="example.net"):
        return b"From: someone@%s\r\nSubject: checks\r\n\r\nHello.\r\n" % sender_domain.encode()

    def test_fail_is_refused_at_each_rcpt_with_the_explanation_but_not_for_postmaster(self):
        """550 5.7.23 with the exp= text, macros expanded, for every recipient but postmaster (RFC 5321 4.5.1)."""
        replies = self.send("192.0.2.9", "a@example.com", self.message(),
                            ("alice@example.org", "bob@example.org", "postmaster@example.org", "Postmaster"))
        self.assertEqual(replies[0][0], 250)
        for code, lines in replies[1:3]:
            self.assertEqual(lines, ["550 5.7.23 192.0.2.9 may not send mail for example.com"])
        self.assertEqual([code for code, _ in replies[3:]], [250, 250, 250])
        stored = self.stored("alice")              # alice is the postmaster (the first user)
        self.assertEqual(len(stored), 1)
        self.assertEqual(methods(stored[0])["spf"], ["spf=fail smtp.mailfrom=example.com"])
        self.assertIn(b"Received-SPF: fail (mx.example.org: domain of a@example.com does not designate 192.0.2.9 "
                      b"as permitted sender)", stored[0])
        self.assertEqual(self.stored("bob"), [])

    def test_a_helo_session_gets_the_words_without_the_code(self):
        """A session that began with HELO gets replies without enhanced codes (CONTRACT.md section 6)."""
        client = self.client("192.0.2.9", ehlo=False)
        client.cmd_expecting("MAIL FROM:<a@example.com>", 250)
        self.assertEqual(client.cmd("RCPT TO:<alice@example.org>")[1],
                         ["550 192.0.2.9 may not send mail for example.com"])

    def test_spf_is_evaluated_once_at_mail(self):
        """The record is asked for when MAIL comes, once for all the recipients."""
        client = self.client("192.0.2.1")
        client.cmd_expecting("MAIL FROM:<a@softfail.example.net>", 250)
        self.assertIn(("softfail.example.net", "TXT"), self.dns.queries)
        before = len(self.dns.queries)
        for rcpt in ("alice@example.org", "bob@example.org"):
            client.cmd_expecting("RCPT TO:<%s>" % rcpt, 250)
        self.assertEqual(len(self.dns.queries), before)

    def test_every_other_result_is_taken_and_recorded(self):
        """pass, softfail, neutral, none, permerror and temperror: 250, and the result in both fields."""
        for ip, sender, result in (("192.0.2.1", "a@example.com", "pass"),
                                   ("2001:db8:1:2::5", "a@example.com", "pass"),
                                   ("192.0.2.1", "a@split.example.net", "pass"),
                                   ("192.0.2.7", "a@odd.example.net", "pass"),    # RFC 7208 7.1: any visible
                                   ("192.0.2.8", "a@odd.example.net", "pass"),    # character, %% and %_ too
                                   ("192.0.2.9", "a@softfail.example.net", "softfail"),
                                   ("192.0.2.9", "a@neutral.example.net", "neutral"),
                                   ("192.0.2.9", "a@nothing.example.net", "none"),
                                   ("192.0.2.9", "a@broken.example.net", "permerror"),
                                   ("192.0.2.9", "a@failing.example.net", "temperror")):
            support.remove_mailboxes(self.root)
            replies = self.send(ip, sender, self.message())
            self.assertEqual([code for code, _ in replies], [250, 250, 250], sender)
            stored = self.stored()[0]
            self.assertEqual(methods(stored)["spf"], ["spf=%s smtp.mailfrom=%s" % (result, sender.split("@")[1])])
            self.assertIn(b"Received-SPF: " + result.encode() + b" (", stored)
            # RFC 7208 9.1: a value is a dot-atom or a quoted-string (an IPv6 address, with its colons)
            self.assertIn((b"client-ip=%s;" if "." in ip else b'client-ip="%s";') % ip.encode(), stored)

    def test_the_null_sender_is_checked_by_its_helo(self):
        """MAIL FROM:<> checks the HELO name (RFC 7208 2.4)."""
        replies = self.send("192.0.2.9", "", self.message(), helo="helo.example.net")
        self.assertEqual(replies[1][1], ["550 5.7.23 helo.example.net does not designate 192.0.2.9 as permitted "
                                         "sender of postmaster@helo.example.net"])
        replies = self.send("192.0.2.1", "", self.message(), helo="helo.example.net")
        self.assertEqual(replies[-1][0], 250)
        self.assertIn(b"identity=helo;", self.stored()[0])


class ServerWhereChecksApplyTest(CheckedServerTestCase):
    """Only for a client neither logged in nor in --relay-networks; the others make no DNS query at all."""

    zone = zone_of(txt("example.com", "v=spf1 -all"), txt("_dmarc.example.com", "v=DMARC1; p=reject"))
    body = b"From: a@example.com\r\nSubject: trusted\r\n\r\nHello.\r\n"

    def test_a_relay_network_client_is_not_checked(self):
        """From --relay-networks (by its PROXY header): no query, no result fields, no refusal."""
        before = len(self.dns.queries)
        self.assertEqual(self.send("192.0.2.250", "a@example.com", self.body)[-1][0], 250)
        self.assertEqual(len(self.dns.queries), before)
        self.assertNotIn(b"Authentication-Results", self.stored()[0])

    def test_a_logged_in_client_is_not_checked(self):
        """A client logged in with AUTH: no query."""
        before = len(self.dns.queries)
        client = self.client("192.0.2.9")
        client.cmd_expecting("AUTH PLAIN " + base64.b64encode(b"\0alice\0wonderland").decode(), 235)
        client.cmd_expecting("MAIL FROM:<alice@example.org>", 250)
        client.cmd_expecting("RCPT TO:<bob@example.org>", 250)
        client.cmd_expecting("DATA", 354)
        client.send(b"From: alice@example.org\r\n\r\nHi.\r\n.\r\n")
        self.assertEqual(client.reply()[0], 250)
        self.assertEqual(len(self.dns.queries), before)
        self.assertNotIn(b"Authentication-Results", self.stored("bob")[0])

    def test_an_outside_client_is_checked(self):
        """The same message from outside is refused: the check is what makes the difference above."""
        self.assertEqual(self.send("192.0.2.9", "a@example.com", self.body)[1][0], 550)
        self.assertIn(("example.com", "TXT"), self.dns.queries)


class CourseModeTest(unittest.TestCase):
    """The course mode (no --local-domains) makes no DNS query: the process opens no UDP socket at all."""

    def test_no_dns_in_the_course_mode(self):
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        watch = os.path.join(root, "hooks")
        os.mkdir(watch)
        with open(os.path.join(watch, "sitecustomize.py"), "w") as hook:
            hook.write(UDP_WATCH)
        log = os.path.join(watch, "udp.log")
        server = support.ServerProcess(support.SMTP_SCRIPT, root,
                                       env=dict(os.environ, PYTHONPATH=watch, UDP_WATCH=log))
        self.addCleanup(server.close)
        self.assertEqual(support.deliver(server, b"From: a@example.com\r\nSubject: x\r\n\r\nHi.\r\n",
                                         sender="a@gmail.com"), 250)
        self.assertFalse(os.path.exists(log))
        self.assertNotIn(b"Authentication-Results", support.stored_messages(root, "alice")[0])
        # and the hook does see a UDP socket when one is made (the resolver's)
        checked = support.ServerProcess(support.SMTP_SCRIPT, root, "--local-domains", LOCAL, "--proxy-from",
                                        BALANCER, "--relay-networks", "", "--dns-server", "127.0.0.1:9",
                                        env=dict(os.environ, PYTHONPATH=watch, UDP_WATCH=log))
        self.addCleanup(checked.close)
        with checked.connect() as client:
            client.send(proxy_v1("192.0.2.9", 4000))
            client.reply()
            client.cmd_expecting("HELO a.example.com", 250)
            client.cmd_expecting("MAIL FROM:<a@example.com>", 250)
        self.assertTrue(os.path.exists(log))


class ServerDMARCTest(CheckedServerTestCase):
    """DMARC after the data: p=reject refuses and stores nothing; the rest is recorded; the From: rule."""

    zone = zone_of(
        dkim_zone(),
        txt("example.com", "v=spf1 ip4:192.0.2.1 ~all"), txt("_dmarc.example.com", "v=DMARC1; p=reject"),
        txt("bounces.example.com", "v=spf1 ip4:192.0.2.1 -all"),
        txt("list.example.net", "v=spf1 ~all"),
        txt("_dmarc.quarantine.example.net", "v=DMARC1; p=quarantine"),
        txt("_dmarc.sampled.example.net", "v=DMARC1; p=reject; pct=50"),
        txt("_dmarc.example.edu", "v=DMARC1; p=none; sp=reject"),
        txt("_dmarc.%s" % SIGNED, "v=DMARC1; p=reject; adkim=s"))

    def body(self, author, extra=b""):
        return b"From: Someone <%s>\r\n%sSubject: dmarc\r\n\r\nHello.\r\n" % (author.encode(), extra)

    def assertRefusedAndNothingKept(self, replies):
        self.assertEqual(replies[-1][1], ["550 5.7.1 Message refused by the DMARC policy of %s"
                                          % replies[-1][1][0].rsplit(" ", 1)[1]])
        for login in ("alice", "bob"):
            self.assertEqual(self.stored(login), [])
        queue = os.path.join(self.root, ".queue")
        self.assertEqual([name for name in os.listdir(queue) if not name.startswith(".")] if os.path.isdir(queue)
                         else [], [])

    def test_a_forgery_under_p_reject_is_refused_after_the_data_and_stored_for_nobody(self):
        """SPF softfail, no signature, p=reject: 550 5.7.1 after the data; no copy, nothing queued."""
        replies = self.send("192.0.2.9", "a@example.com", self.body("service@example.com"),
                            ("alice@example.org", "bob@example.org"))
        self.assertEqual([code for code, _ in replies[:3]], [250, 250, 250])
        self.assertRefusedAndNothingKept(replies)

    def test_a_subdomain_under_sp_reject_is_refused(self):
        """sp=reject of the organizational domain's record applies to a From: in a subdomain."""
        self.assertRefusedAndNothingKept(self.send("192.0.2.9", "a@list.example.net",
                                                   self.body("x@news.example.edu")))
        self.assertEqual(self.send("192.0.2.9", "a@list.example.net", self.body("x@example.edu"))[-1][0], 250)
        self.assertEqual(methods(self.stored()[0])["dmarc"], ["dmarc=fail header.from=example.edu"])

    def test_quarantine_and_a_lower_pct_are_recorded_only(self):
        """p=quarantine, or p=reject with pct=50: taken, dmarc=fail recorded."""
        for author in ("x@quarantine.example.net", "x@sampled.example.net"):
            support.remove_mailboxes(self.root)
            self.assertEqual(self.send("192.0.2.9", "a@list.example.net", self.body(author))[-1][0], 250)
            self.assertEqual(methods(self.stored()[0])["dmarc"], ["dmarc=fail header.from=%s" % author[2:]])

    def test_a_pass_by_spf_alone(self):
        """SPF passes for bounces.example.com, aligned (relaxed) with From: example.com; no signature."""
        self.assertEqual(self.send("192.0.2.1", "b@bounces.example.com", self.body("x@example.com"))[-1][0], 250)
        found = methods(self.stored()[0])
        self.assertEqual((found["spf"], found["dkim"], found["dmarc"]),
                         (["spf=pass smtp.mailfrom=bounces.example.com"], ["dkim=none"],
                          ["dmarc=pass header.from=example.com"]))

    def test_a_pass_by_dkim_alone(self):
        """SPF softfail for a mailing list's domain, a signature of the From: domain (strict): pass, taken."""
        message = signed_message(self.body("x@%s" % SIGNED)[:-len(b"\r\nHello.\r\n")] + b"\r\n")
        self.assertEqual(self.send("192.0.2.9", "a@list.example.net", message)[-1][0], 250)
        found = methods(self.stored()[0])
        self.assertEqual(found["spf"], ["spf=softfail smtp.mailfrom=list.example.net"])
        self.assertEqual([entry.split()[0] for entry in found["dkim"]], ["dkim=pass", "dkim=pass"])
        self.assertEqual(found["dmarc"], ["dmarc=pass header.from=%s" % SIGNED])

    def test_a_broken_signature_does_not_save_a_forgery(self):
        """The same signed message with its body changed: DKIM fails, DMARC fails, p=reject refuses."""
        message = signed_message(self.body("x@%s" % SIGNED)[:-len(b"\r\nHello.\r\n")] + b"\r\n")
        self.assertRefusedAndNothingKept(self.send("192.0.2.9", "a@list.example.net",
                                                   message.replace(b"Hello.", b"Hellp.")))

    def test_several_or_no_from_addresses_are_refused(self):
        """RFC 7489 6.6.1: two addresses in From:, two From: fields, none, or no domain: 550 5.7.1."""
        for body in (b"From: a@example.net, b@example.net\r\n\r\nx\r\n",
                     b"From: a@example.net\r\nFrom: b@example.net\r\n\r\nx\r\n",
                     b"Subject: no author\r\n\r\nx\r\n", b"From: undisclosed:;\r\n\r\nx\r\n",
                     b"From: nodomain\r\n\r\nx\r\n"):
            replies = self.send("192.0.2.9", "a@list.example.net", body)
            self.assertEqual(replies[-1][1], ["550 5.7.1 A message must have exactly one From: address "
                                              "(RFC 7489 6.6.1)"], body)
        self.assertEqual(self.stored(), [])


class ServerDKIMTest(CheckedServerTestCase):
    """Every signature verified, each its own dkim= result; DKIM alone never refuses."""

    zone = dkim_zone()

    def send_signed(self, message):
        self.assertEqual(self.send("192.0.2.9", "a@list.example.net", message)[-1][0], 250)
        return methods(self.stored()[-1])["dkim"]

    def test_the_rfc8463_message_passes_twice(self):
        """RFC 8463 A.3: both signatures pass; header.b holds the first 8 characters of each b=."""
        message = b"".join(test_dkim.RFC8463_SIGNATURES) + test_dkim.RFC8463_HEADER + b"\r\n" + test_dkim.RFC8463_BODY
        self.assertEqual(self.send_signed(message), [
            "dkim=pass header.d=football.example.com header.s=brisbane header.b=\"/gCrinpc\"",
            "dkim=pass header.d=football.example.com header.s=test header.b=F45dVWDf"])

    def test_dkim_alone_never_refuses(self):
        """A changed body fails both signatures, and the message is taken all the same (no DMARC record)."""
        message = b"".join(test_dkim.RFC8463_SIGNATURES) + test_dkim.RFC8463_HEADER + b"\r\n" + test_dkim.RFC8463_BODY
        results = self.send_signed(message.replace(b"hungry", b"angry"))
        self.assertEqual([entry.split()[0] for entry in results], ["dkim=fail", "dkim=fail"])
        self.assertTrue(results[0].endswith(" (body hash did not verify)"), results[0])

    def test_at_most_five_signatures(self):
        """Six signatures: five results; the sixth is ignored."""
        message = signed_message(b"From: x@%s\r\nSubject: six\r\n" % SIGNED.encode(), selectors=["test"] * 6)
        self.assertEqual(len(self.send_signed(message)), 5)


class ServerResultsFieldTest(CheckedServerTestCase):
    """One Authentication-Results per stored copy, ours alone naming our authserv-id."""

    zone = txt("example.net", "v=spf1 ip4:192.0.2.1 -all")

    def test_forged_results_for_our_id_go_and_others_stay(self):
        """Ours goes right after our Received:; fields naming mx.example.org in any case or spacing, also
        folded, are removed; another id's stays."""
        body = (b"Authentication-Results: MX.Example.ORG ; spf=pass smtp.mailfrom=paypal.com\r\n"
                b"From: a@example.net\r\n"
                b"Authentication-Results:\r\n   mx.example.org;\r\n\tdkim=pass header.d=paypal.com\r\n"
                b"authentication-results: (forged) mx.example.org.; dmarc=pass\r\n"
                b"Authentication-Results: relay.example.net; spf=pass smtp.mailfrom=example.net\r\n"
                b"Subject: forged\r\n\r\nHello.\r\n")
        replies = self.send("192.0.2.1", "a@example.net", body, ("alice@example.org", "bob@example.org"))
        self.assertEqual(replies[-1][0], 250)
        for login in ("alice", "bob"):
            stored = self.stored(login)[0]
            self.assertEqual(stored.lower().count(b"authentication-results:"), 2)
            # right after our RFC 5321 Received: (CONTRACT.md sections 8 and 10)
            self.assertRegex(stored, rb"^Return-Path: <a@example\.net>\nReceived: from [^\n]*(\n\t[^\n]*)*\n"
                                     rb"Authentication-Results: mx\.example\.org;\n\tspf=pass ")
            self.assertIn(b"Authentication-Results: relay.example.net; spf=pass smtp.mailfrom=example.net\n", stored)
            self.assertNotIn(b"paypal", stored)
            self.assertNotIn(b"(forged)", stored)
            self.assertIn(b"\nSubject: forged\nReceived: ", stored)

    def test_the_client_shows_the_results_in_one_line(self):
        """mail_client's RETR view starts with 'Sender checks: SPF pass, DKIM none, DMARC none'."""
        import mail_client
        self.send("192.0.2.1", "a@example.net", b"From: a@example.net\r\nSubject: shown\r\n\r\nHello.\r\n")
        lines = [line.decode() for line in self.stored()[0].split(b"\n")]
        self.assertEqual(mail_client.ReadMail([line.encode() for line in lines]).shown_lines()[0],
                         "Sender checks: SPF pass, DKIM none, DMARC none")
        self.assertEqual(mail_client.sender_checks([("Authentication-Results", "mx.example.org; spf=softfail "
                                                     "smtp.mailfrom=x.org; dkim=pass header.d=example.com "
                                                     "header.s=a header.b=b; dkim=fail reason=\"x;y\" "
                                                     "header.d=x.org header.s=a header.b=c; dmarc=pass "
                                                     "header.from=example.com")]),
                         "Sender checks: SPF softfail, DKIM pass (example.com), fail (x.org), DMARC pass")


class ServerSilentDNSTest(CheckedServerTestCase):
    """A DNS server that never answers: temperror within the deadline, and the mail is taken."""

    zone = txt("example.net", "v=spf1 -all")

    def test_a_silent_dns_gives_temperror_not_a_hang(self):
        self.dns.drop.add("silent.example.net")
        started = time.monotonic()
        client = self.client("192.0.2.9")
        client.cmd_expecting("MAIL FROM:<a@silent.example.net>", 250)
        self.assertLess(time.monotonic() - started, smtp.SPF_DEADLINE)
        client.cmd_expecting("RCPT TO:<alice@example.org>", 250)
        client.cmd_expecting("DATA", 354)
        client.send(b"From: a@example.net\r\nSubject: silent\r\n\r\nHello.\r\n.\r\n")
        self.assertEqual(client.reply()[0], 250)
        self.assertEqual(methods(self.stored()[0])["spf"], ["spf=temperror smtp.mailfrom=silent.example.net"])
