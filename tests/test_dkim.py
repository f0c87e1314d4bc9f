"""DKIM (CONTRACT.md sections 9 and 10, issue 22): keys and DER, RSA, Ed25519, canonicalization, signing, verifying.

The fixed vectors are RFC 8463 appendix A (its keys, records and signed
message) and the canonicalization examples of RFC 6376 3.4.5; the keys and
signatures of tests/dkim/ were made by OpenSSL (tests/dkim/README.md).
"""

import base64
import hashlib
import math
import os
import random
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import unittest

import support  # noqa: F401  (puts the repository on the path)

import mailserver_smtp as dkim  # noqa: E402

KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dkim")

# RFC 8463 appendix A.1: the Ed25519 secret key (base64) and the RSA key (RFC 6376's example key)
RFC8463_ED25519_SECRET = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="
RFC8463_RSA_KEY = """-----BEGIN RSA PRIVATE KEY-----
MIICXQIBAAKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQi
Y/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqM
KrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB
AoGAH0cxOhFZDgzXWhDhnAJDw5s4roOXN4OhjiXa8W7Y3rhX3FJqmJSPuC8N9vQm
6SVbaLAE4SG5mLMueHlh4KXffEpuLEiNp9Ss3O4YfLiQpbRqE7Tm5SxKjvvQoZZe
zHorimOaChRL2it47iuWxzxSiRMv4c+j70GiWdxXnxe4UoECQQDzJB/0U58W7RZy
6enGVj2kWF732CoWFZWzi1FicudrBFoy63QwcowpoCazKtvZGMNlPWnC7x/6o8Gc
uSe0ga2xAkEA8C7PipPm1/1fTRQvj1o/dDmZp243044ZNyxjg+/OPN0oWCbXIGxy
WvmZbXriOWoSALJTjExEgraHEgnXssuk7QJBALl5ICsYMu6hMxO73gnfNayNgPxd
WFV6Z7ULnKyV7HSVYF0hgYOHjeYe9gaMtiJYoo0zGN+L3AAtNP9huqkWlzECQE1a
licIeVlo1e+qJ6Mgqr0Q7Aa7falZ448ccbSFYEPD6oFxiOl9Y9se9iYHZKKfIcst
o7DUw1/hz2Ck4N5JrgUCQQCyKveNvjzkkd8HjYs0SwM0fPjK16//5qDZ2UiDGnOe
uEzxBDAr518Z8VFbR41in3W4Y3yCDgQlLlcETrS+zYcL
-----END RSA PRIVATE KEY-----
"""
# A.2: the two key records
RFC8463_ZONE = {
    "brisbane._domainkey.football.example.com": [
        "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="],
    "test._domainkey.football.example.com": [
        "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWR"
        "iGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutAC"
        "DfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3"
        "Ip3G+2kryOTIKT+l/K4w3QIDAQAB"],
}
RFC8463_TIME = 1528637909            # the signatures' t=
# A.3: the signed message
RFC8463_SIGNATURES = [
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    b" subject : date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :\r\n"
    b" date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\r\n"
    b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\r\n"
    b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=\r\n",
]
RFC8463_HEADER = (b"From: Joe SixPack <joe@football.example.com>\r\n"
                  b"To: Suzie Q <suzie@shopping.example.net>\r\n"
                  b"Subject: Is dinner ready?\r\n"
                  b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
                  b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n")
RFC8463_BODY = b"Hi.\r\n\r\nWe lost the game.  Are you hungry yet?\r\n\r\nJoe.\r\n"
RFC8463_BODY_HASH = "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="

# RFC 6376 3.4.5: one message and what each canonicalization makes of it
RFC6376_HEADER = b"A: X\r\nB : Y\t\r\n\tZ  \r\n"
RFC6376_BODY = b" C \r\nD \t E\r\n\r\n\r\n"
RFC6376_RELAXED = (b"a:X\r\nb:Y Z\r\n", b" C\r\nD E\r\n")
RFC6376_SIMPLE = (b"A: X\r\nB : Y\t\r\n\tZ  \r\n", b" C \r\nD \t E\r\n")


def read_key_file(name):
    """The text of a key of tests/dkim."""
    with open(os.path.join(KEYS, name), encoding="ascii") as file:
        return file.read()


def rfc8463_keys():
    """{selector: private key} of RFC 8463 A.1."""
    return {"brisbane": dkim.Ed25519PrivateKey(base64.b64decode(RFC8463_ED25519_SECRET)),
            "test": dkim.read_private_key(RFC8463_RSA_KEY)}


def zone_lookup(zone):
    """A lookup_txt over a dict; a name not in it does not exist (NXDOMAIN)."""
    def lookup(name):
        if name not in zone:
            raise dkim.DNSError(dkim.DNS_NO_SUCH_DOMAIN, name, temporary=False)
        value = zone[name]
        if isinstance(value, Exception):
            raise value
        return value
    return lookup


def body_hash(body, relaxed, chunk=None, limit=None):
    """The base64 body hash of body, fed whole or chunk bytes at a time."""
    hasher = dkim.BodyHash(relaxed, limit)
    for start in range(0, len(body), chunk or max(1, len(body))):
        hasher.update(body[start:start + (chunk or len(body))])
    return base64.b64encode(hasher.digest()).decode("ascii")


def canonical_body_hash(canonical):
    """The base64 SHA-256 of bytes already canonical."""
    return base64.b64encode(hashlib.sha256(canonical).digest()).decode("ascii")


class RFC8463VectorTest(unittest.TestCase):
    """RFC 8463 appendix A, byte for byte: both algorithms are deterministic."""

    def test_public_keys_match_the_records(self):
        """The A.1 secret keys give the A.2 records' public keys."""
        for selector, key in rfc8463_keys().items():
            self.assertEqual(key.public.record(), RFC8463_ZONE["%s._domainkey.football.example.com" % selector][0])

    def test_body_hash(self):
        """The relaxed body hash is A.3's bh=."""
        self.assertEqual(body_hash(RFC8463_BODY, relaxed=True), RFC8463_BODY_HASH)

    def test_signatures_byte_for_byte(self):
        """Signing A.3's header fields with the A.1 keys gives A.3's b= values exactly."""
        fields = dkim.header_fields(RFC8463_HEADER)
        keys = rfc8463_keys()
        for field in RFC8463_SIGNATURES:
            signature = dkim.DKIMSignature(field, RFC8463_TIME)
            made = keys[signature.selector].sign(signature.signed_data(fields))
            self.assertEqual(base64.b64encode(made).decode("ascii"), signature.b_text, signature.selector)

    def test_signed_message_passes_twice(self):
        """A.3 verifies as pass for both signatures, with the A.2 records."""
        results = dkim.dkim_verify(b"".join(RFC8463_SIGNATURES) + RFC8463_HEADER, [RFC8463_BODY],
                                   zone_lookup(RFC8463_ZONE), now=RFC8463_TIME + 60)
        self.assertEqual([(r.result, r.domain, r.selector) for r in results],
                         [("pass", "football.example.com", "brisbane"), ("pass", "football.example.com", "test")])
        self.assertEqual(results[0].b[:8], "/gCrinpc")

    def test_changed_message_fails_both(self):
        """A changed signed header or body byte fails both signatures."""
        for header, body, reason in ((RFC8463_HEADER.replace(b"dinner", b"Dinner"), RFC8463_BODY, "signature"),
                                     (RFC8463_HEADER, RFC8463_BODY.replace(b"Joe.", b"Joe!"), "body hash")):
            results = dkim.dkim_verify(b"".join(RFC8463_SIGNATURES) + header, [body],
                                       zone_lookup(RFC8463_ZONE), now=RFC8463_TIME)
            self.assertEqual([r.result for r in results], ["fail", "fail"])
            self.assertTrue(all(r.reason.startswith(reason) for r in results), results)


class CanonicalizationTest(unittest.TestCase):
    """RFC 6376 3.4: one canonicalizer, for signing and verifying."""

    def test_rfc6376_examples(self):
        """The examples of RFC 6376 3.4.5, relaxed and simple, header and body."""
        fields = dkim.header_fields(RFC6376_HEADER)
        for relaxed, (header, body) in ((True, RFC6376_RELAXED), (False, RFC6376_SIMPLE)):
            self.assertEqual(b"".join(dkim.canonical_header(field, relaxed) for field in fields), header)
            self.assertEqual(body_hash(RFC6376_BODY, relaxed), canonical_body_hash(body))

    def test_empty_bodies(self):
        """An empty body, or one of empty lines only, is CRLF in simple and nothing in relaxed (3.4.3, 3.4.4)."""
        for body in (b"", b"\r\n", b"\r\n\r\n\r\n", b"  \r\n\t\r\n"):
            self.assertEqual(body_hash(body, relaxed=True), canonical_body_hash(b""), body)
        for body in (b"", b"\r\n", b"\r\n\r\n\r\n"):
            self.assertEqual(body_hash(body, relaxed=False), canonical_body_hash(b"\r\n"), body)
        self.assertEqual(body_hash(b"  \r\n", relaxed=False), canonical_body_hash(b"  \r\n"))

    def test_body_without_final_crlf(self):
        """A body not ending in CRLF is hashed with one added."""
        for relaxed in (True, False):
            self.assertEqual(body_hash(b"a\r\nb", relaxed), canonical_body_hash(b"a\r\nb\r\n"))
        self.assertEqual(body_hash(b"a\r\nb \t", relaxed=True), canonical_body_hash(b"a\r\nb\r\n"))

    def test_inner_empty_lines_kept(self):
        """Empty lines between text lines are hashed; only those at the end are not."""
        body = b"a\r\n\r\n\r\nb\r\n\r\n"
        self.assertEqual(body_hash(body, relaxed=False), canonical_body_hash(b"a\r\n\r\n\r\nb\r\n"))

    def test_bare_cr_and_lf_are_text(self):
        """A bare LF or CR is no line end: it stays in the line it is in, also at the body's end."""
        for body, canonical in ((b"a\n\r\n\r\n", b"a\n\r\n"), (b"a\r\r\n\r\n", b"a\r\r\n"), (b"\n\r\n", b"\n\r\n")):
            self.assertEqual(body_hash(body, relaxed=False), canonical_body_hash(canonical), body)

    def test_chunks_do_not_matter(self):
        """Any way of cutting a body into chunks gives the same hash (lines cut, CRLFs cut, long lines)."""
        rng = random.Random(6376)
        pieces = [b"a", b" ", b"\t", b"\r\n", b"\r", b"\n", b"xyz", b"  \t "]
        for _ in range(150):
            body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
            for relaxed in (True, False):
                whole = body_hash(body, relaxed)
                for chunk in (1, 2, 3, 7):
                    self.assertEqual(body_hash(body, relaxed, chunk), whole, (body, relaxed, chunk))

    def test_long_line_without_end_bounded(self):
        """A line longer than the carry limit, fed in pieces, hashes as a whole; memory stays bounded."""
        line = (b"word \t " * 40000) + b"end  "
        for relaxed in (True, False):
            hasher = dkim.BodyHash(relaxed)
            for start in range(0, len(line), 4096):
                hasher.update(line[start:start + 4096])
                self.assertLess(len(hasher.carry), dkim.DKIM_BODY_CARRY + 4096)
            hasher.update(b"\r\n\r\n")
            self.assertEqual(base64.b64encode(hasher.digest()).decode("ascii"), body_hash(line + b"\r\n", relaxed))

    def test_length_limit(self):
        """l= hashes only the first l canonical octets; length counts them all."""
        hasher = dkim.BodyHash(False, limit=5)
        hasher.update(b"Hello world\r\n")
        self.assertEqual(hasher.digest(), hashlib.sha256(b"Hello").digest())
        self.assertEqual(hasher.length, 13)

    def test_relaxed_header_rules(self):
        """Name lowered, unfolded, WSP runs one space, no WSP around the colon or at the end."""
        self.assertEqual(dkim.canonical_header(b"SubJect \t:  Two\t  words \r\n\t folded  \r\n", True),
                         b"subject:Two words folded\r\n")
        self.assertEqual(dkim.canonical_header(b"X:\r\n", True), b"x:\r\n")

    def test_header_fields_split(self):
        """A header block's fields, folded lines kept with theirs."""
        self.assertEqual(dkim.header_fields(b"A: 1\r\n  2\r\nB: 3\r\n"), [b"A: 1\r\n  2\r\n", b"B: 3\r\n"])
        self.assertEqual(dkim.header_fields(b"A: 1"), [b"A: 1\r\n"])

    def test_split_message(self):
        """The header block ends at the first empty line; none means all header."""
        header, body = dkim.split_message([b"A: 1\r\nB", b": 2\r\n\r\nbody\r\n", b"more\r\n"])
        self.assertEqual((header, b"".join(body)), (b"A: 1\r\nB: 2\r\n", b"body\r\nmore\r\n"))
        header, body = dkim.split_message([b"\r\nbody\r\n"])
        self.assertEqual((header, b"".join(body)), (b"", b"body\r\n"))
        header, body = dkim.split_message([b"A: 1\r\n"])
        self.assertEqual((header, b"".join(body)), (b"A: 1\r\n", b""))
        with self.assertRaises(dkim.DKIMError):
            dkim.split_message([b"A: " + b"x" * dkim.DKIM_MAX_HEADER + b"\r\n\r\n"])


class TagListTest(unittest.TestCase):
    """RFC 6376 3.2 tag lists, and 3.5's b= rule."""

    def test_parsed(self):
        """Whitespace and folding around names and values go; a final ';' is allowed."""
        self.assertEqual(dkim.parse_tag_list(" v = 1 ;\r\n\ta=rsa-sha256; h=from : to;"),
                         {"v": "1", "a": "rsa-sha256", "h": "from : to"})
        self.assertEqual(dkim.parse_tag_list("p="), {"p": ""})

    def test_malformed(self):
        """A tag twice, a tag without '=', a bad name or an empty item is an error."""
        for text in ("a=1; a=2", "a", "1a=x", "a=1;; b=2", "a=x;y", "a=\x7f"):
            with self.assertRaises(dkim.DKIMError, msg=text):
                dkim.parse_tag_list(text)

    def test_b_value_removed(self):
        """Only b='s value goes; bh= and the rest stay byte for byte."""
        field = b"DKIM-Signature: bh=abc; b=de\r\n f; d=x\r\n"
        self.assertEqual(dkim.without_b_value(field), b"DKIM-Signature: bh=abc; b=; d=x\r\n")
        self.assertEqual(dkim.without_b_value(b"DKIM-Signature: a=1;\r\n b=xyz\r\n"),
                         b"DKIM-Signature: a=1;\r\n b=\r\n")


def signed_message(keys, header=RFC8463_HEADER, body=RFC8463_BODY, domain="football.example.com", now=RFC8463_TIME):
    """(header block with our signatures on top, body) signed with keys [(selector, key)]."""
    return dkim.dkim_sign([header, b"\r\n", body], domain, keys, now) + header, body


class VerifyTest(unittest.TestCase):
    """dkim_verify: each rule of RFC 6376 6, RFC 8301 and RFC 8463, one result per signature."""

    def setUp(self):
        self.keys = rfc8463_keys()
        self.zone = dict(RFC8463_ZONE)

    def verify(self, header, body=RFC8463_BODY, now=RFC8463_TIME, **kwargs):
        return dkim.dkim_verify(header, [body], zone_lookup(self.zone), now=now, **kwargs)

    def one(self, tags, now=RFC8463_TIME, sign=True, selector="test"):
        """The result of a signature with these tags (a dict over our RSA signature's), signed again."""
        header, body = signed_message([(selector, self.keys[selector])], now=RFC8463_TIME)
        signature = dkim.DKIMSignature(dkim.header_fields(header)[0], RFC8463_TIME)
        values = dict(signature.tags)
        values.update(tags)
        values = {name: value for name, value in values.items() if value is not None and name != "b"}
        values["b"] = ""             # last, so the value can be appended
        unsigned = ("DKIM-Signature: " + "; ".join("%s=%s" % item for item in values.items()) + "\r\n").encode()
        if sign:
            parsed = dkim.DKIMSignature(unsigned)
            value = base64.b64encode(self.keys[selector].sign(parsed.signed_data(dkim.header_fields(RFC8463_HEADER))))
            unsigned = unsigned[:-2] + value + b"\r\n"
        return self.verify(unsigned + RFC8463_HEADER, body, now=now)[0]

    def assertResult(self, result, outcome, reason):
        self.assertEqual((result.result, result.reason), (outcome, reason))

    def test_our_signatures_pass(self):
        """What dkim_sign makes passes, for both algorithms at once."""
        header, body = signed_message(sorted(self.keys.items()))
        self.assertEqual([r.result for r in self.verify(header, body)], ["pass", "pass"])

    def test_relaxed_whitespace_changes_pass(self):
        """Whitespace relaxed canonicalization ignores may change; the signature still passes."""
        header, body = signed_message([("test", self.keys["test"])])
        header = header.replace(b"Subject: Is dinner ready?", b"subject:   Is  dinner\r\n\tready?  ")
        body = body.replace(b"We lost", b"We  lost").replace(b"Joe.\r\n", b"Joe. \t\r\n\r\n\r\n")
        self.assertEqual(self.verify(header, body)[0].result, "pass")

    def test_unsigned_header_may_change(self):
        """A field not in h= may be added; a second Subject, or a Cc the message had not, may not (oversigning)."""
        header, body = signed_message([("test", self.keys["test"])])
        self.assertEqual(self.verify(header + b"X-Extra: 1\r\n", body)[0].result, "pass")
        self.assertEqual(self.verify(header + b"Reply-To: someone@example.net\r\n", body)[0].result, "pass")
        self.assertEqual(self.verify(header + b"Subject: another\r\n", body)[0].result, "fail")
        self.assertEqual(self.verify(b"Subject: another\r\n" + header, body)[0].result, "fail")
        self.assertEqual(self.verify(header + b"Cc: someone@example.net\r\n", body)[0].result, "fail")

    def test_simple_canonicalization(self):
        """c=simple/simple signatures verify, and break on whitespace changes."""
        simple = canonical_body_hash(RFC8463_BODY)
        self.assertResult(self.one({"c": "simple/simple", "bh": simple}), "pass", "good signature")
        self.assertResult(self.one({"c": "simple", "bh": simple}), "pass", "good signature")
        self.assertResult(self.one({"c": "relaxed/simple", "bh": simple}), "pass", "good signature")
        self.assertResult(self.one({"c": "simple/simple"}), "fail", "body hash did not verify")

    def test_length_tag(self):
        """With l=, text appended to the body still passes; an l= longer than the body is a permerror."""
        tags = {"l": str(len(RFC8463_BODY)), "c": "simple/simple", "bh": canonical_body_hash(RFC8463_BODY)}
        self.assertResult(self.verify(self._resigned(tags))[0], "pass", "good signature")
        self.assertResult(self.verify(self._resigned(tags), RFC8463_BODY + b"Buy now!\r\n")[0],
                          "pass", "good signature")
        self.assertResult(self.verify(self._resigned(tags), RFC8463_BODY[:-1] + b"!\r\n")[0],
                          "fail", "body hash did not verify")
        longer = dict(tags, l=str(len(RFC8463_BODY) + 1))
        self.assertResult(self.verify(self._resigned(longer))[0], "permerror", "l= longer than the body")

    def _resigned(self, tags):
        """A signature header (plus the RFC 8463 header) with these tags, signed with the RSA key."""
        values = {"v": "1", "a": "rsa-sha256", "c": "relaxed/relaxed", "d": "football.example.com", "s": "test",
                  "h": "from:to:subject", "bh": RFC8463_BODY_HASH}
        values.update(tags)
        values["b"] = ""
        unsigned = ("DKIM-Signature: " + "; ".join("%s=%s" % item for item in values.items()) + "\r\n").encode()
        parsed = dkim.DKIMSignature(unsigned)
        value = base64.b64encode(self.keys["test"].sign(parsed.signed_data(dkim.header_fields(RFC8463_HEADER))))
        return unsigned[:-2] + value + b"\r\n" + RFC8463_HEADER

    def test_expired_and_future(self):
        """x= in the past, x= before t=, and t= in the future are permerrors."""
        self.assertResult(self.one({"x": str(RFC8463_TIME - 1)}), "permerror", "x= is before t=")
        self.assertResult(self.one({"x": str(RFC8463_TIME + 10)}, now=RFC8463_TIME + 11),
                          "permerror", "signature expired")
        self.assertResult(self.one({"x": str(RFC8463_TIME + 10)}, now=RFC8463_TIME + 10), "pass", "good signature")
        self.assertResult(self.one({}, now=RFC8463_TIME - dkim.DKIM_CLOCK_SKEW - 1), "permerror", "t= is in the future")

    def test_rsa_sha1_rejected(self):
        """rsa-sha1 is never valid (RFC 8301 3.1)."""
        self.assertResult(self.one({"a": "rsa-sha1"}, sign=False), "permerror", "rsa-sha1 is not accepted (RFC 8301)")

    def test_malformed_signatures(self):
        """Missing tags, a bad version, From unsigned, i= outside d=, an unknown algorithm: permerror."""
        cases = [({"bh": None}, "no bh= tag"), ({"v": "2"}, "version v=2"), ({"h": "to:subject"}, "From is not signed"),
                 ({"i": "joe@example.org"}, "i= not in the domain of d="),
                 ({"a": "rsa-sha512"}, "unknown algorithm rsa-sha512"),
                 ({"c": "relaxed/odd"}, "unknown canonicalization relaxed/odd"), ({"q": "http"}, "no q=dns/txt"),
                 ({"bh": "abc"}, "bh= is not base64"), ({"l": "-1"}, "l= is not a number")]
        for tags, reason in cases:
            result = self.one(tags, sign=False)
            self.assertResult(result, "permerror", reason)
            self.assertEqual((result.domain, result.selector), ("football.example.com", "test"))

    def test_subdomain_identity(self):
        """An i= in a subdomain of d= is fine, unless the key says t=s."""
        self.assertResult(self.one({"i": "joe@sub.football.example.com"}), "pass", "good signature")
        self.zone["test._domainkey.football.example.com"] = [RFC8463_ZONE["test._domainkey.football.example.com"][0]
                                                             + "; t=s"]
        self.assertResult(self.one({"i": "joe@sub.football.example.com"}),
                          "permerror", "key with t=s for a subdomain i=")
        self.assertResult(self.one({"i": "joe@football.example.com"}), "pass", "good signature")

    def test_key_records(self):
        """Revoked, wrong k=, h= without sha256, s= not email, malformed, missing, v= not first."""
        rsa = RFC8463_ZONE["test._domainkey.football.example.com"][0]
        cases = [("v=DKIM1; k=rsa; p=", "key revoked"),
                 (rsa.replace("k=rsa", "k=ed25519"), "key of kind k=ed25519 for a=rsa-sha256"),
                 (rsa + "; h=sha1", "key record h= without sha256"), (rsa + "; s=other", "key not for email (s=)"),
                 ("v=DKIM1; k=rsa", "key record without p="), ("k=rsa; v=DKIM1; p=" + rsa.split("p=")[1],
                                                                "key record v= is not DKIM1 first"),
                 ("v=DKIM1; p=bad!", "p= is not base64"),
                 ("v=DKIM1; k=rsa; p=AAAA", "key unusable: not one DER SEQUENCE")]
        for record, reason in cases:
            self.zone["test._domainkey.football.example.com"] = [record]
            self.assertResult(self.one({}), "permerror", reason)

    def test_key_record_among_other_texts(self):
        """The first TXT record that is a key record counts; h=sha1:sha256 and s=email:* are fine."""
        rsa = RFC8463_ZONE["test._domainkey.football.example.com"][0]
        self.zone["test._domainkey.football.example.com"] = ["hello world", rsa + "; h=sha1:sha256; s=email:*"]
        self.assertResult(self.one({}), "pass", "good signature")

    def test_bare_rsa_public_key_record(self):
        """A p= holding a bare RSAPublicKey (RFC 6376 3.6.1's words) verifies as well as SubjectPublicKeyInfo."""
        key = self.keys["test"].public
        bare = dkim.der(dkim.DER_SEQUENCE, dkim.der_int(key.n) + dkim.der_int(key.e))
        self.zone["test._domainkey.football.example.com"] = ["v=DKIM1; p=" + base64.b64encode(bare).decode()]
        self.assertResult(self.one({}), "pass", "good signature")

    def test_short_rsa_key_rejected(self):
        """An RSA key under 1024 bits is not accepted for verifying (RFC 8301 3.2)."""
        key = dkim.RSAPrivateKey(*_small_rsa(512))
        self.keys["short"] = key
        self.zone["short._domainkey.football.example.com"] = [key.public.record()]
        self.assertResult(self.one({"s": "short"}, selector="short"), "permerror", "RSA key of 512 bits")

    def test_dns_failures(self):
        """A temporary DNS failure is temperror; a name that does not exist is permerror."""
        self.zone["test._domainkey.football.example.com"] = dkim.DNSError(dkim.DNS_TIME_OUT, "x")
        self.assertResult(self.one({}), "temperror", "key lookup: DNS timeout")
        del self.zone["test._domainkey.football.example.com"]
        self.assertResult(self.one({}), "permerror", "no key for the signature")
        self.zone["test._domainkey.football.example.com"] = []
        self.assertResult(self.one({}), "permerror", "no key for the signature")

    def test_at_most_five_signatures(self):
        """Only the first 5 signatures are verified."""
        header, body = signed_message([("test", self.keys["test"])] * 6)
        self.assertEqual(len(self.verify(header, body)), 5)
        self.assertEqual(len(self.verify(header, body, limit=2)), 2)

    def test_foreign_signature_kept_and_ours_added(self):
        """A message that already carries a DKIM-Signature is signed again; both verify."""
        header = RFC8463_SIGNATURES[0] + RFC8463_HEADER
        ours = dkim.dkim_sign([header, b"\r\n", RFC8463_BODY], "football.example.com", [("test", self.keys["test"])],
                              now=RFC8463_TIME)
        results = self.verify(ours + header)
        self.assertEqual([(r.selector, r.result) for r in results], [("test", "pass"), ("brisbane", "pass")])


def _small_rsa(bits):
    """(n, e, d, p, q) of a quick RSA key of bits bits (for tests of short keys only)."""
    half = bits // 2
    while True:
        p, q = dkim._rsa_prime(half, 65537), dkim._rsa_prime(half, 65537)
        if p != q:
            lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
            return p * q, 65537, pow(65537, -1, lam), p, q


class SigningTest(unittest.TestCase):
    """dkim_sign: what section 9 promises of a signature, and messages of every shape."""

    def setUp(self):
        self.keys = rfc8463_keys()

    def sign_and_verify(self, header, body):
        """Our two signatures of a message; both pass."""
        fields = dkim.dkim_sign([header, b"\r\n", body], "football.example.com", sorted(self.keys.items()))
        results = dkim.dkim_verify(fields + header, [body], zone_lookup(RFC8463_ZONE))
        self.assertEqual([r.result for r in results], ["pass", "pass"], results)
        return fields

    def test_tags(self):
        """a=, c=relaxed/relaxed, d=, s=, t=, no l=; h= lists the present fields, then oversigns."""
        header = (b"From: a@football.example.com\r\nTo: b@example.net\r\nSubject: s\r\n"
                  b"Date: Fri, 11 Jul 2003 21:00:37 -0700\r\nMessage-ID: <1@x>\r\nMIME-Version: 1.0\r\n"
                  b"Content-Type: text/plain\r\nX-Other: 1\r\n")
        fields = dkim.header_fields(dkim.dkim_sign([header, b"\r\n", b"hi\r\n"], "football.example.com",
                                                   [("test", self.keys["test"]), ("brisbane", self.keys["brisbane"])],
                                                   now=1700000000))
        self.assertEqual(len(fields), 2)
        for field, selector, algorithm in ((fields[0], "test", "rsa-sha256"),
                                           (fields[1], "brisbane", "ed25519-sha256")):
            tags = dkim.DKIMSignature(field, 1700000000).tags
            self.assertEqual((tags["a"], tags["c"], tags["d"], tags["s"], tags["t"]),
                             (algorithm, "relaxed/relaxed", "football.example.com", selector, "1700000000"))
            self.assertNotIn("l", tags)
            self.assertEqual(tags["h"].replace(" ", ""), "from:subject:date:to:message-id:mime-version:"
                             "content-type:from:to:cc:subject:date:message-id")   # no Cc here, oversigned still
            self.assertTrue(all(len(line) <= dkim.DKIM_FOLD for line in field.split(b"\r\n")), field)

    def test_folded_headers_8bit_and_utf8(self):
        """Folded fields, an 8-bit body and UTF-8 in header and body sign and verify."""
        header = ("From: Jösé <joe@football.example.com>\r\nSubject: a long\r\n\tfolded\r\n subject ☃\r\n"
                  "To: x@example.net\r\n").encode("utf-8")
        self.sign_and_verify(header, "Grüße, ☃\r\n".encode("utf-8") + b"\xff\xfe latin\r\n")

    def test_trailing_blank_lines_and_crlf_body(self):
        """Trailing blank lines, a body of only CRLF, and an empty body sign and verify."""
        for body in (b"text\r\n\r\n\r\n\r\n", b"\r\n", b""):
            self.sign_and_verify(RFC8463_HEADER, body)

    def test_field_twice(self):
        """A field that appears twice (two Received:, two To:) is signed in both instances."""
        header = RFC8463_HEADER + b"To: second@example.net\r\nReceived: one\r\nReceived: two\r\n"
        fields = self.sign_and_verify(header, RFC8463_BODY)
        self.assertEqual(dkim.DKIMSignature(dkim.header_fields(fields)[0]).tags["h"].count("to"), 2)

    def test_fault_is_caught(self):
        """A signature that does not verify (a fault in the key) raises DKIMError: nothing wrong is sent."""
        key = self.keys["test"]
        key.dp ^= 2                 # a broken CRT value: every signature comes out wrong
        with self.assertRaises(dkim.DKIMKeyError):
            dkim.dkim_sign([RFC8463_HEADER, b"\r\n", RFC8463_BODY], "football.example.com", [("test", key)])


class RSATest(unittest.TestCase):
    """RSA keys: made by us and checked independently, and OpenSSL's keys and signatures."""

    def test_generated_keys_checked_independently(self):
        """20 generated keys (3 of 2048 bits, 17 of 1024 for time: the same code): their primes pass a
        Fermat test with 8 random bases, n = p*q with all its bits, d*e = 1 mod lcm(p-1, q-1), |p-q|
        is large, and they sign."""
        for bits in [2048] * 3 + [1024] * 17:
            key = dkim.generate_rsa_key(bits)
            self.assertEqual(key.n.bit_length(), bits)
            self.assertEqual(key.p * key.q, key.n)
            self.assertEqual(key.e, 65537)
            for prime in (key.p, key.q):
                self.assertEqual(prime.bit_length(), bits // 2)
                for _ in range(8):
                    a = secrets.randbelow(prime - 3) + 2
                    self.assertEqual(pow(a, prime - 1, prime), 1)
            lam = (key.p - 1) * (key.q - 1) // math.gcd(key.p - 1, key.q - 1)
            self.assertEqual(key.d * key.e % lam, 1)
            self.assertGreater(abs(key.p - key.q), 1 << (bits // 2 - 100))
            data = b"message %d" % bits
            self.assertTrue(key.public.verify(data, key.sign(data)))

    def test_pem_round_trip(self):
        """A key written as PEM reads back the same."""
        key = dkim.read_private_key(read_key_file("rsa2048-pkcs1.pem"))
        again = dkim.read_private_key(key.private_pem())
        self.assertEqual((again.n, again.e, again.d, again.p, again.q), (key.n, key.e, key.d, key.p, key.q))
        self.assertTrue(key.private_pem().startswith("-----BEGIN PRIVATE KEY-----\n"))

    def test_openssl_keys(self):
        """PKCS#1 and PKCS#8 keys by OpenSSL read, and give OpenSSL's public key."""
        for name in ("rsa2048-pkcs1", "rsa2048-pkcs8", "ed25519-pkcs8"):
            key = dkim.read_private_key(read_key_file(name + ".pem"))
            public = base64.b64decode(read_key_file(name + ".pub.b64"))
            if key.kind == "rsa":
                self.assertEqual(key.public.der(), public)
                self.assertEqual(key.bits, 2048)
            else:
                self.assertEqual(key.public.data, public[-32:])

    def test_openssl_signatures(self):
        """Our signatures of data.txt are OpenSSL's, byte for byte (both schemes are deterministic)."""
        with open(os.path.join(KEYS, "data.txt"), "rb") as file:
            data = file.read()
        for name in ("rsa2048-pkcs1", "ed25519-pkcs8"):
            key = dkim.read_private_key(read_key_file(name + ".pem"))
            with open(os.path.join(KEYS, name + ".sig"), "rb") as file:
                expected = file.read()
            self.assertEqual(key.sign(data), expected, name)
            self.assertTrue(key.public.verify(data, expected))
            self.assertFalse(key.public.verify(data + b"x", expected))

    def test_blinding_is_fresh(self):
        """Each signature draws its own blinding factor: two signatures of one text use different ones."""
        key = dkim.read_private_key(RFC8463_RSA_KEY)
        drawn = []
        real = dkim.secrets.randbelow
        dkim.secrets.randbelow = lambda n: drawn.append(real(n)) or drawn[-1]
        try:
            first, second = key.sign(b"x"), key.sign(b"x")
        finally:
            dkim.secrets.randbelow = real
        self.assertEqual(first, second)
        self.assertEqual(len(drawn), 2)
        self.assertNotEqual(drawn[0], drawn[1])

    def test_miller_rabin(self):
        """Known primes pass; composites (Carmichael numbers, squares, products of two primes) fail."""
        prime = 2 ** 127 - 1
        self.assertTrue(dkim.is_probable_prime(prime, 5))
        self.assertTrue(dkim.is_probable_prime(2 ** 521 - 1, 5))
        for composite in (561, 41041, 825265, prime * prime, prime * (2 ** 61 - 1), 2 ** 128 + 1):
            self.assertFalse(dkim.is_probable_prime(composite, 5), composite)


class MalformedKeyTest(unittest.TestCase):
    """read_private_key refuses what it cannot use, each time with an error saying why."""

    def assertRefused(self, text, words):
        with self.assertRaises(dkim.DKIMKeyError) as caught:
            dkim.read_private_key(text)
        self.assertIn(words, str(caught.exception))

    def test_truncated_pem(self):
        """A PEM cut short (no END line) is refused."""
        text = read_key_file("rsa2048-pkcs8.pem")
        self.assertRefused(text[:len(text) // 2], "not one PEM block")
        self.assertRefused("", "not one PEM block")

    def test_wrong_base64(self):
        """Characters outside base64, or a length not a multiple of 4, are refused."""
        text = read_key_file("rsa2048-pkcs8.pem")
        lines = text.splitlines()
        self.assertRefused("\n".join(lines[:2] + ["#" + lines[2][1:]] + lines[3:]), "base64 is malformed")
        self.assertRefused("\n".join(lines[:2] + [lines[2][1:]] + lines[3:]), "base64 is malformed")

    def test_der_lengths_that_lie(self):
        """A DER length longer or shorter than its content, or not shortest, is refused."""
        der = base64.b64decode("".join(read_key_file("rsa2048-pkcs1.pem").splitlines()[1:-1]))
        longer = der[:2] + bytes((der[2], der[3] + 1)) + der[4:]          # 30 82 LL LL: one more than there is
        shorter = der[:2] + bytes((der[2], der[3] - 1)) + der[4:]
        self.assertRefused(dkim.pem_encode("RSA PRIVATE KEY", longer), "DER length larger than its data")
        self.assertRefused(dkim.pem_encode("RSA PRIVATE KEY", shorter), "DER")
        padded = b"\x30\x84\x00\x00" + der[2:]
        self.assertRefused(dkim.pem_encode("RSA PRIVATE KEY", padded), "DER length")
        self.assertRefused(dkim.pem_encode("RSA PRIVATE KEY", der + b"\0"), "bytes after the DER SEQUENCE")
        self.assertRefused(dkim.pem_encode("RSA PRIVATE KEY", b"\x30\x80" + der[4:] + b"\0\0"), "indefinite length")

    def test_random_damage_never_crashes(self):
        """Any byte changed or cut from a key's DER is refused with DKIMKeyError or read; nothing else."""
        der = base64.b64decode("".join(read_key_file("ed25519-pkcs8.pem").splitlines()[1:-1]))
        rng = random.Random(8410)
        for _ in range(300):
            damaged = bytearray(der[:rng.randint(0, len(der))] if rng.random() < 0.3 else der)
            if damaged:
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            try:
                dkim.read_private_key(dkim.pem_encode("PRIVATE KEY", bytes(damaged)))
            except dkim.DKIMKeyError:
                pass

    def test_inconsistent_rsa_values(self):
        """An RSA key whose numbers do not belong together is refused."""
        key = dkim.read_private_key(RFC8463_RSA_KEY)
        values = [0, key.n, key.e, key.d, key.p, key.q, key.dp, key.dq, key.qinv]
        for index, words in ((1, "primes do not make its modulus"), (3, "private exponent does not match"),
                             (6, "CRT values do not match")):
            changed = list(values)
            changed[index] += 2
            der = dkim.der(dkim.DER_SEQUENCE, b"".join(dkim.der_int(v) for v in changed))
            self.assertRefused(dkim.pem_encode("RSA PRIVATE KEY", der), words)

    def test_public_encrypted_and_other_keys(self):
        """A public key, an encrypted key and an EC key are refused, saying what they are."""
        self.assertRefused(read_key_file("rsa2048-public.pem"), "a public key, where the private key belongs")
        self.assertRefused(read_key_file("rsa2048-encrypted.pem"), "encrypted key")
        self.assertRefused(read_key_file("ec-p256.pem"), "algorithm other than RSA and Ed25519")
        self.assertRefused("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "CERTIFICATE")
        self.assertRefused("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n", "ended by")

    def test_short_key_reads(self):
        """A 1024-bit key reads (the signer, not the reader, refuses it); its size is known."""
        self.assertEqual(dkim.read_private_key(read_key_file("rsa1024-pkcs1.pem")).bits, 1024)


class Ed25519Test(unittest.TestCase):
    """Ed25519 keys and signatures (RFC 8032)."""

    def test_generated_key(self):
        """A new key is 32 random bytes in PKCS#8; it reads back, signs, and its signature verifies."""
        key = dkim.generate_ed25519_key()
        again = dkim.read_private_key(key.private_pem())
        self.assertEqual(again.secret, key.secret)
        self.assertEqual(len(key.secret), 32)
        signature = key.sign(b"data")
        self.assertTrue(again.public.verify(b"data", signature))
        self.assertFalse(again.public.verify(b"date", signature))
        self.assertFalse(again.public.verify(b"data", signature[:32] + bytes(32)))

    def test_base_table_agrees_with_double_and_add(self):
        """The table of the base point's multiples gives what double and add gives, for any scalar."""
        rng = random.Random(8032)
        for s in [0, 1, 15, 16, 2 ** 255 - 1] + [rng.getrandbits(256) for _ in range(20)]:
            self.assertEqual(dkim._ed_encode(dkim._ed_base_multiply(s)),
                             dkim._ed_encode(dkim._ed_multiply(s, dkim.ED25519_BASE)), s)

    def test_bad_public_keys(self):
        """A p= that is no point, or not 32 bytes, is refused."""
        with self.assertRaises(dkim.DKIMKeyError):
            dkim.public_key_from_record("ed25519", b"\1" * 31)
        with self.assertRaises(dkim.DKIMKeyError):
            dkim.public_key_from_record("ed25519", (2 ** 255 - 1).to_bytes(32, "little"))


if __name__ == "__main__":
    unittest.main()


# --------------------------------------------------------------------------
# Signing in the server: mail that enters the queue (CONTRACT.md section 9)
# --------------------------------------------------------------------------

def copy_key(root, domain, selector, name):
    """Copy a file of tests/dkim to ROOT/.dkim/DOMAIN/SELECTOR.pem (mode 0600)."""
    folder = os.path.join(root, ".dkim", domain)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, selector + ".pem")
    with open(path, "w", encoding="ascii") as file:
        file.write(read_key_file(name))
    os.chmod(path, 0o600)


def install_key(root, domain, selector, name):
    """Copy a key of tests/dkim to ROOT/.dkim/DOMAIN/SELECTOR.pem; return its public key record."""
    copy_key(root, domain, selector, name)
    return dkim.read_private_key(read_key_file(name)).public.record()


def unstuffed_data(data):
    """A message as a remote got it between DATA and '.', less SMTP's dot-stuffing."""
    return b"".join(line[1:] if line.startswith(b".") else line for line in data.splitlines(keepends=True))


class ServerSigningTest(support.OneServerTestCase):
    """A server with --local-domains example.org, keys for example.org, and a scripted remote MX."""

    @classmethod
    def setUpClass(cls):
        cls.remote = support.RemoteSMTPServer()
        cls.server_args = ("--local-domains", "example.org", "--domain", "mx.example.org",
                           "--mx-port", str(cls.remote.port), "--retry-base", "0.3", "--relay-timeout", "2")
        try:
            super().setUpClass()
        except BaseException:
            cls.remote.close()
            raise
        cls.zone = {"rsa._domainkey.example.org": [install_key(cls.root, "example.org", "rsa", "rsa2048-pkcs1.pem")],
                    "ed._domainkey.example.org": [install_key(cls.root, "example.org", "ed", "ed25519-pkcs8.pem")]}

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.remote.close()

    def send(self, body, sender="alice@example.org", recipients=("u@[127.0.0.1]",), login="alice"):
        """One EHLO session (logged in as login, if any) sending body; the reply to its end."""
        with support.smtp_session(self.server, ehlo=True) as client:
            if login:
                secret = base64.b64encode(("\0%s\0%s" % (login, support.DEFAULT_USERS[login])).encode()).decode()
                client.cmd_expecting("AUTH PLAIN " + secret, 235)
            return support.send_message(client, body, sender, recipients)

    def sent(self, marker):
        """The message the remote got whose data holds marker, unstuffed (waits for it)."""
        return unstuffed_data(support.wait_for(
            lambda: [m for m in self.remote.messages if marker in m["data"]])[0]["data"])

    def verified(self, message, zone=None):
        """The results of our verifier for a message as it went out."""
        header, body = dkim.split_message([message])
        return dkim.dkim_verify(header, body, zone_lookup(zone or self.zone))

    def test_signed_with_each_key_after_our_fields(self):
        """A logged-in client's message for another domain carries one signature per key, on top, which
        verify; Date: and Message-ID: we added are signed, and the From: domain is d=."""
        reply = self.send(b"From: Alice <alice@example.org>\r\nTo: u@[127.0.0.1]\r\nSubject: signed one\r\n\r\n"
                          b"body line\r\n\r\n\r\n")
        self.assertEqual(reply[0], 250)
        message = self.sent(b"signed one")
        self.assertTrue(message.startswith(b"DKIM-Signature: "))
        results = self.verified(message)
        self.assertEqual(sorted((r.result, r.selector, r.domain) for r in results),
                         [("pass", "ed", "example.org"), ("pass", "rsa", "example.org")])
        fields = dkim.header_fields(dkim.split_message([message])[0])
        self.assertEqual([dkim.field_name(f) for f in fields[:3]], [b"dkim-signature", b"dkim-signature", b"received"])
        signed = dkim.DKIMSignature(fields[0]).signed
        self.assertIn(b"date", signed)
        self.assertIn(b"message-id", signed)
        self.assertTrue(any(dkim.field_name(f) == b"message-id" for f in fields))

    def test_retry_sends_the_same_signed_bytes(self):
        """A message refused with 451 once is sent again byte for byte as it was queued, signature included."""
        self.remote.data = ["451 4.3.0 not now", "250 2.0.0 Ok: queued"]
        reply = self.send(b"From: alice@example.org\r\nSubject: retried\r\n\r\nhi\r\n")
        queue_id = re.search(r"queued as ([0-9A-F]+)", reply[1][-1]).group(1)
        with open(os.path.join(support.queue_folder(self.root), queue_id), "rb") as file:
            queued = file.read().partition(b"\n\n")[2]
        self.server.wait_for_output(r"%s: to=<u@\[127\.0\.0\.1\]> .* status=deferred" % queue_id)
        sent = self.sent(b"Subject: retried")
        self.assertEqual(sent, queued)
        self.assertEqual([r.result for r in self.verified(sent)], ["pass", "pass"])

    def test_relay_network_client_signed(self):
        """A client from --relay-networks (not logged in) gets its mail signed too."""
        self.send(b"From: robot@example.org\r\nSubject: from the network\r\n\r\nhi\r\n", sender="robot@example.org",
                  login=None)
        self.assertEqual([r.result for r in self.verified(self.sent(b"from the network"))], ["pass", "pass"])

    def test_local_only_mail_not_signed(self):
        """A message only for local users is stored without a signature."""
        self.assertEqual(self.send(b"From: alice@example.org\r\nSubject: local only\r\n\r\nhi\r\n",
                                   recipients=("bob@example.org",))[0], 250)
        stored = support.wait_for(lambda: [m for m in support.stored_messages(self.root, "bob") if b"local only" in m])
        self.assertNotIn(b"DKIM-Signature", stored[0])

    def test_domain_without_keys_not_signed(self):
        """A From: domain without keys goes out unsigned."""
        self.send(b"From: robot@other.example\r\nSubject: no keys\r\n\r\nhi\r\n", sender="robot@other.example",
                  login=None)
        self.assertNotIn(b"DKIM-Signature", self.sent(b"no keys"))

    def test_foreign_signature_kept(self):
        """A message that already carries someone's DKIM-Signature keeps it below ours."""
        self.send(RFC8463_SIGNATURES[0] + b"From: robot@example.org\r\nSubject: foreign\r\n\r\nhi\r\n",
                  sender="robot@example.org", login=None)
        message = self.sent(b"Subject: foreign")
        self.assertEqual(message.count(b"DKIM-Signature:"), 3)
        self.assertEqual([r.result for r in self.verified(message)[:2]], ["pass", "pass"])

    def unusable(self, domain, setup):
        """Mail from domain, whose key folder setup() spoils, gets 451 4.3.0, and nothing is queued or stored."""
        folder = os.path.join(self.root, ".dkim", domain)
        os.makedirs(folder, exist_ok=True)
        setup(folder)
        before = support.read_mailbox(self.root, "bob")
        reply = self.send(b"From: x@%s\r\nSubject: spoilt\r\n\r\nhi\r\n" % domain.encode(), sender="x@" + domain,
                          recipients=("u@[127.0.0.1]", "bob@example.org"), login=None)
        self.assertEqual(reply, (451, ["451 4.3.0 Requested action aborted: local error in processing"]))
        self.assertEqual(support.queue_files(self.root) + support.queue_files(self.root, ".tmp"), [])
        self.assertEqual(support.read_mailbox(self.root, "bob"), before)
        self.server.wait_for_output(r"DKIM key unusable")

    def test_malformed_key_refused_then_fixed(self):
        """A malformed key file gives 451; once it is replaced, the next message is signed with the new key."""
        def spoil(folder):
            with open(os.path.join(folder, "bad.pem"), "w") as file:
                file.write(read_key_file("rsa2048-pkcs8.pem")[:300])
        self.unusable("broken.example", spoil)
        zone = {"bad._domainkey.broken.example": [install_key(self.root, "broken.example", "bad", "ed25519-pkcs8.pem")]}
        self.send(b"From: x@broken.example\r\nSubject: fixed now\r\n\r\nhi\r\n", sender="x@broken.example", login=None)
        self.assertEqual([r.result for r in self.verified(self.sent(b"fixed now"), zone)], ["pass"])

    def test_short_rsa_key_refused(self):
        """An RSA key under 2048 bits is not signed with: 451."""
        self.unusable("short.example", lambda folder: copy_key(self.root, "short.example", "old", "rsa1024-pkcs1.pem"))

    def test_public_key_refused(self):
        """A public key where the private one belongs: 451."""
        self.unusable("public.example",
                      lambda folder: copy_key(self.root, "public.example", "pub", "rsa2048-public.pem"))

    def test_folder_names_stay_inside(self):
        """A From: domain is a folder name only when it is a host name: never absolute, never with / or .."""
        for domain in ("/etc", "a/b", "..", "x/../../etc", "", "a b.test"):
            self.assertIsNone(dkim.dkim_domain_folder(self.root, domain), domain)
        self.assertEqual(dkim.dkim_domain_folder(self.root, "Bücher.Example."),
                         os.path.join(self.root, ".dkim", "xn--bcher-kva.example"))

    def test_symlinked_key_refused(self):
        """A key file that is a symlink is not followed: 451."""
        def link(folder):
            os.symlink(os.path.join(KEYS, "rsa2048-pkcs1.pem"), os.path.join(folder, "linked.pem"))
        self.unusable("linked.example", link)

    def test_rotation_reread(self):
        """A key added to the folder is used from the next message on, and a removed one no more."""
        folder = "rotate.example"
        zone = {"one._domainkey.rotate.example": [install_key(self.root, folder, "one", "ed25519-pkcs8.pem")]}
        self.send(b"From: x@rotate.example\r\nSubject: rotation 1\r\n\r\nhi\r\n", sender="x@rotate.example", login=None)
        self.assertEqual([r.selector for r in self.verified(self.sent(b"rotation 1"), zone)], ["one"])
        zone["two._domainkey.rotate.example"] = [install_key(self.root, folder, "two", "rsa2048-pkcs8.pem")]
        self.send(b"From: x@rotate.example\r\nSubject: rotation 2\r\n\r\nhi\r\n", sender="x@rotate.example", login=None)
        self.assertEqual([(r.selector, r.result) for r in self.verified(self.sent(b"rotation 2"), zone)],
                         [("one", "pass"), ("two", "pass")])
        os.remove(os.path.join(self.root, ".dkim", folder, "one.pem"))
        self.send(b"From: x@rotate.example\r\nSubject: rotation 3\r\n\r\nhi\r\n", sender="x@rotate.example", login=None)
        self.assertEqual([r.selector for r in self.verified(self.sent(b"rotation 3"), zone)], ["two"])

    def test_bounce_signed_with_domain_keys(self):
        """A bounce that goes out through the queue is signed with the keys of --domain."""
        zone = {"b._domainkey.mx.example.org": [install_key(self.root, "mx.example.org", "b", "ed25519-pkcs8.pem")]}
        self.remote.rcpt["refused@[127.0.0.1]"] = "550 5.1.1 no such user"
        self.send(b"From: x@[127.0.0.1]\r\nSubject: to be bounced\r\n\r\nhi\r\n", sender="x@[127.0.0.1]",
                  recipients=("refused@[127.0.0.1]",), login=None)
        bounces = support.wait_for(
            lambda: [m for m in self.remote.messages if m["sender"] == "" and b"to be bounced" in m["data"]])
        bounce = unstuffed_data(bounces[0]["data"])
        self.assertEqual([(r.domain, r.result) for r in self.verified(bounce, zone)], [("mx.example.org", "pass")])


# --------------------------------------------------------------------------
# The site's commands: --dkim-keygen, --dns-records, --check-dns
# --------------------------------------------------------------------------

def run_command(*args):
    """Run mailserver_smtp.py with args: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, support.SMTP_SCRIPT] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=support.DEADLINE)
    return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")


def txt_strings(line):
    """The quoted strings of a zone-file TXT record."""
    return re.findall(r'"([^"]*)"', line)


def zone_text(out, name):
    """The text of the TXT record of name in zone-file output: its strings joined, over lines in ( )."""
    line = [line for line in out.split("\n") if line.startswith(name + ".\tIN\tTXT\t")][0]
    rest = out[out.index(line):]
    return "".join(txt_strings(rest[:rest.index(")")] if "( " in line else line))


class KeygenTest(unittest.TestCase):
    """--dkim-keygen DOMAIN [--selector S] [--key-type rsa|ed25519] [--root DIR]."""

    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)

    def keygen(self, *args):
        return run_command("--dkim-keygen", "Example.ORG", "--root", self.root, *args)

    def test_rsa_key_and_its_record(self):
        """An RSA-2048 key in ROOT/.dkim/DOMAIN/SELECTOR.pem, mode 0600, and its record in strings of <= 255."""
        code, out, _ = self.keygen("--selector", "s1")
        self.assertEqual(code, 0)
        path = os.path.join(self.root, ".dkim", "example.org", "s1.pem")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        with open(path, encoding="ascii") as file:
            key = dkim.read_private_key(file.read())
        self.assertEqual((key.kind, key.bits, key.e), ("rsa", 2048, 65537))
        self.assertEqual(zone_text(out, "s1._domainkey.example.org"), key.public.record())
        strings = txt_strings(out)
        self.assertTrue(all(len(piece) <= 255 for piece in strings))
        self.assertEqual(len(strings), 2)

    def test_ed25519_default_selector_and_never_overwritten(self):
        """An Ed25519 key named by today's date; a second run with the same selector changes nothing."""
        code, out, _ = self.keygen("--key-type", "ed25519")
        self.assertEqual(code, 0)
        selector = time.strftime("%Y%m%d")
        path = os.path.join(self.root, ".dkim", "example.org", selector + ".pem")
        with open(path, encoding="ascii") as file:
            text = file.read()
        key = dkim.read_private_key(text)
        self.assertEqual(txt_strings(out), [key.public.record()])
        code, _, err = self.keygen("--key-type", "ed25519")
        self.assertEqual(code, 1)
        self.assertIn("never overwritten", err)
        with open(path, encoding="ascii") as file:
            self.assertEqual(file.read(), text)

    def test_bad_names_refused(self):
        """A domain or selector that could leave the folder is refused (exit 2), and nothing is made."""
        for args in (("--dkim-keygen", "../x"), ("--dkim-keygen", "a/b"), ("--dkim-keygen", "/tmp"),
                     ("--dkim-keygen", "x.test", "--selector", "../s")):
            self.assertEqual(run_command(*args + ("--root", self.root, "--key-type", "ed25519"))[0], 2, args)
        self.assertEqual(os.listdir(self.root), [])


CHECK_ZONE = {
    ("example.org", "MX"): [(10, "mx.example.org")],
    ("example.org", "TXT"): ["v=spf1 ip4:127.0.0.1 -all", "other text"],
    ("_dmarc.example.org", "TXT"): ["v=DMARC1; p=none; rua=mailto:postmaster@example.org"],
    ("mx.example.org", "A"): ["127.0.0.1"],
    ("1.0.0.127.in-addr.arpa", "PTR"): ["mx.example.org"],
}


class SiteRecordsTest(unittest.TestCase):
    """--dns-records prints what the domain needs; --check-dns asks DNS for it, record by record."""

    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        self.records = {"rsa._domainkey.example.org": install_key(self.root, "example.org", "rsa", "rsa2048-pkcs8.pem"),
                        "ed._domainkey.example.org": install_key(self.root, "example.org", "ed", "ed25519-pkcs8.pem")}

    def records_command(self, *args):
        return run_command("--dns-records", "example.org", "--root", self.root, "--domain", "mx.example.org", *args)

    def test_records(self):
        """MX, SPF for the address, one DKIM record per key, DMARC p=none with rua, the A and the PTR."""
        code, out, _ = self.records_command("--source-address", "192.0.2.25")
        self.assertEqual(code, 0)
        lines = out.split("\n")
        self.assertIn("example.org.\tIN\tMX\t10 mx.example.org.", lines)
        self.assertIn('example.org.\tIN\tTXT\t"v=spf1 ip4:192.0.2.25 -all"', lines)
        self.assertIn('_dmarc.example.org.\tIN\tTXT\t"v=DMARC1; p=none; rua=mailto:postmaster@example.org"', lines)
        self.assertIn("mx.example.org.\tIN\tA\t192.0.2.25", lines)
        self.assertIn("25.2.0.192.in-addr.arpa.\tIN\tPTR\tmx.example.org.", lines)
        for name, record in self.records.items():
            self.assertEqual(zone_text(out, name), record)

    def test_records_without_address(self):
        """Without --source-address the SPF record names the MX, and the PTR is left to the admin."""
        code, out, _ = self.records_command()
        self.assertIn('example.org.\tIN\tTXT\t"v=spf1 mx -all"', out.split("\n"))
        self.assertIn("give --source-address", out)
        self.assertNotIn("PTR\t", out)

    def check(self, zone, *args):
        """--check-dns against a responder serving zone: (exit code, {what name: line})."""
        with support.DNSResponder(zone) as responder:
            code, out, err = run_command("--check-dns", "example.org", "--root", self.root, "--domain",
                                         "mx.example.org", "--dns-server", "%s:%d" % responder.address, *args)
        self.assertEqual(err, "")
        return code, {" ".join(line.split()[:2]).rstrip(":"): line.partition(": ")[2] for line in out.splitlines()}

    def full_zone(self):
        zone = dict(CHECK_ZONE)
        for name, record in self.records.items():
            zone[(name, "TXT")] = [record]
        return zone

    def test_all_right(self):
        """Every record right: one 'right' line each, exit 0."""
        code, lines = self.check(self.full_zone())
        self.assertEqual(lines, {"MX example.org": "right", "SPF example.org": "right",
                                 "DKIM rsa._domainkey.example.org": "right", "DKIM ed._domainkey.example.org": "right",
                                 "DMARC _dmarc.example.org": "right", "PTR 127.0.0.1": "right"})
        self.assertEqual(code, 0)
        self.assertEqual(self.check(self.full_zone(), "--source-address", "127.0.0.1")[0], 0)
        failing_aaaa = dict(self.full_zone())
        failing_aaaa[("mx.example.org", "AAAA")] = "SERVFAIL"     # the host's A alone is enough
        self.assertEqual(self.check(failing_aaaa)[0], 0)

    def test_all_missing(self):
        """Nothing published: each line says missing, exit 1."""
        code, lines = self.check({("mx.example.org", "A"): ["127.0.0.1"]})
        self.assertEqual(code, 1)
        self.assertEqual({name: line.split(" ")[0] for name, line in lines.items()},
                         {"MX example.org": "missing", "SPF example.org": "missing",
                          "DKIM rsa._domainkey.example.org": "missing", "DKIM ed._domainkey.example.org": "missing",
                          "DMARC _dmarc.example.org": "missing", "PTR 127.0.0.1": "missing"})

    def test_each_wrong_with_why(self):
        """Wrong records, each with why: MX not us, SPF not passing, a key not ours, a revoked key, two DMARC
        records, a PTR naming another host, and one whose host does not resolve back."""
        zone = self.full_zone()
        zone[("example.org", "MX")] = [(10, "mail.elsewhere.example")]
        zone[("example.org", "TXT")] = ["v=spf1 ip4:192.0.2.1 ~all"]
        ed_as_rsa = self.records["ed._domainkey.example.org"].replace("ed25519", "rsa")
        zone[("rsa._domainkey.example.org", "TXT")] = [ed_as_rsa]
        zone[("ed._domainkey.example.org", "TXT")] = ["v=DKIM1; k=ed25519; p="]
        zone[("_dmarc.example.org", "TXT")] = ["v=DMARC1; p=none", "v=DMARC1; p=reject"]
        zone[("1.0.0.127.in-addr.arpa", "PTR")] = ["other.example.org"]
        code, lines = self.check(zone)
        self.assertEqual(code, 1)
        self.assertEqual(lines["MX example.org"], "wrong (MX names mail.elsewhere.example, not mx.example.org)")
        self.assertRegex(lines["SPF example.org"], r"^wrong \(SPF softfail for 127\.0\.0\.1, not pass")
        self.assertRegex(lines["DKIM rsa._domainkey.example.org"], r"^wrong \(")
        self.assertEqual(lines["DKIM ed._domainkey.example.org"], "wrong (the key is revoked (p= is empty))")
        self.assertEqual(lines["DMARC _dmarc.example.org"], "wrong (2 DMARC records: none applies (RFC 7489 6.6.3))")
        self.assertEqual(lines["PTR 127.0.0.1"], "wrong (PTR names other.example.org, not mx.example.org)")
        zone = self.full_zone()
        zone[("example.org", "TXT")] = ["v=spf1 -all", "v=spf1 +all"]
        zone[("rsa._domainkey.example.org", "TXT")] = [install_key(self.root, "other.test", "x", "rsa2048-pkcs1.pem")]
        code, lines = self.check(zone, "--source-address", "127.0.0.1")
        self.assertEqual(lines["SPF example.org"], "wrong (2 SPF records: a permerror (RFC 7208 4.5))")
        self.assertEqual(lines["DKIM rsa._domainkey.example.org"], "wrong (the record holds another key, not ours)")
        del zone[("mx.example.org", "A")]
        zone[("mx.example.org", "AAAA")] = ["::1"]
        code, lines = self.check(zone, "--source-address", "127.0.0.1")
        self.assertEqual(lines["PTR 127.0.0.1"], "wrong (mx.example.org does not resolve back to 127.0.0.1)")

    def test_no_key_is_missing(self):
        """A domain without keys in the mail root has its DKIM line say so, and the check fails."""
        for name in os.listdir(os.path.join(self.root, ".dkim", "example.org")):
            os.remove(os.path.join(self.root, ".dkim", "example.org", name))
        code, lines = self.check(self.full_zone())
        self.assertEqual(code, 1)
        self.assertEqual(lines["DKIM example.org"], "missing (no key in the mail root: make one with --dkim-keygen)")
        self.assertEqual(sum(line == "right" for line in lines.values()), 4)

    def test_dns_failure_is_wrong_not_a_hang(self):
        """A DNS server that fails gives 'wrong (DNS failed ...)' lines, exit 1."""
        zone = self.full_zone()
        zone[("example.org", "*")] = "SERVFAIL"
        del zone[("example.org", "MX")], zone[("example.org", "TXT")]
        code, lines = self.check(zone)
        self.assertEqual(code, 1)
        self.assertRegex(lines["MX example.org"], r"^wrong \(DNS failed: .*SERVFAIL")
