"""Tests of mail_client.py for real-world mail: MIME reading, RAW, SAVE, SEARCH, REPLY, any server, AUTH, implicit TLS."""

import importlib.util
import unittest

try:
    from tests import support
    from tests import test_client as client_helpers
except ImportError:  # run from inside tests/
    import support
    import test_client as client_helpers

ALICE = client_helpers.ALICE
run_client = client_helpers.run_client
closed_port = client_helpers.closed_port


def load_client_module():
    """mail_client.py as a module, for its pure functions (it imports nothing from the servers)."""
    spec = importlib.util.spec_from_file_location("mail_client_under_test", support.CLIENT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = load_client_module()


class HeaderRuleTest(unittest.TestCase):
    """split_message follows the header rule the servers share (the course form and RFC 5322)."""

    def check(self, lines, headers, body):
        self.assertEqual(client.split_message(lines), (headers, body))

    def test_course_form_with_an_indented_first_body_line(self):
        self.check(["From: a", "To: b", "Subject: s", "Received: r", "  indented first body line", "more"],
                   [("From", "a"), ("To", "b"), ("Subject", "s"), ("Received", "r")],
                   ["  indented first body line", "more"])

    def test_rfc5322_form_folds_continuations(self):
        self.check(["Subject: s", " folded", "", "body"], [("Subject", "s folded")], ["body"])

    def test_a_tab_continuation_folds_too(self):
        self.check(["To: a,", "\tb", "", "x"], [("To", "a, b")], ["x"])

    def test_a_body_line_with_a_colon_after_the_headers_is_a_header(self):
        self.check(["From: a", "Subject: s", "Note: x", "text"],
                   [("From", "a"), ("Subject", "s"), ("Note", "x")], ["text"])

    def test_no_headers_at_all_is_all_body(self):
        self.check(["just text", "Subject: late"], [], ["just text", "Subject: late"])
        self.check(["  indented", "x"], [], ["  indented", "x"])
        self.check(["", "x"], [], ["", "x"])

    def test_course_form_keeps_everything_after_the_first_fold(self):
        # Without the empty line, a folded-looking line and all after it are body.
        self.check(["Subject: s", " folded", "Other: y"], [("Subject", "s")], [" folded", "Other: y"])

    def test_only_headers_and_nothing_else(self):
        self.check(["From: a", "Subject: s"], [("From", "a"), ("Subject", "s")], [])

    def test_header_names_are_printable_ascii_without_colon(self):
        self.check(["X-Odd!#$~: v", "bad name: v"], [("X-Odd!#$~", "v")], ["bad name: v"])
        self.check([": no name", "x"], [], [": no name", "x"])
        self.check(["Caf\u00e9: v", "x"], [], ["Caf\u00e9: v", "x"])

    def test_the_empty_line_belongs_to_neither_part(self):
        self.check(["Subject: s", "", "", "b"], [("Subject", "s")], ["", "b"])


class IndentedFirstBodyLineSearchTest(client_helpers.ClientTestCase):
    """SEARCH finds the words of an indented first body line of a course message (real POP3 server)."""

    def test_search_finds_the_indented_line(self):
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        with open(support.mailbox_path(root, "alice"), "w", newline="\n") as f:
            f.write("From: bob@example.org\nTo: alice@example.org\nSubject: Lunch\n"
                    "Received: 2026-11-27 : 12 : 30\n    Indented greeting\nsecond\n.\n")
        pop = support.ServerProcess(support.POP_SCRIPT, root)
        self.addCleanup(pop.close)
        result = run_client(ALICE + "b\nSEARCH greeting\nQUIT\n", closed_port(), pop.port)
        self.assertClean(result)
        self.assertNotIn("No message matches.", result.lines)
        self.assertEqual(result.stdout.count("2026-11-27 : 12 : 30  Lunch"), 2, result.stdout)


if __name__ == "__main__":
    unittest.main()
