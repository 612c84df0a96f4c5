"""
What logs and views may show of a request: query values and fragments redacted (kept names
excepted), secret headers hidden, a client's request id sanitised.  Where a gate shows them, in
memory, is in ``tests/ops/test_logs.py``.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from wsgate import config as configmod
from wsgate.core.redact import redact_headers, redact_target, redact_text, sanitize_request_id


class RedactTests(SynchronousTestCase):
    def test_targets(self) -> None:
        """Every query value becomes REDACTED, names stay, kept parameters and empty values stay."""
        keep = configmod.LogSpec(redact_query_keep=("page", "debug"))
        cases = [
            ("/chat", "/chat"),
            ("/chat?", "/chat?"),
            ("/chat?token=abc", "/chat?token=REDACTED"),
            ("/chat?token=abc&page=2", "/chat?token=REDACTED&page=2"),
            ("/chat?a=1&a=2&b=", "/chat?a=REDACTED&a=REDACTED&b="),
            ("/chat?s3cr3tkey", "/chat?REDACTED"),
            ("/chat?debug&x=a=b", "/chat?debug&x=REDACTED"),
            ("/chat?p%61ge=3&to%6Ben=4", "/chat?p%61ge=3&to%6Ben=REDACTED"),
            ("/chat?token=abc#frag", "/chat?token=REDACTED#REDACTED"),
        ]
        for target, shown in cases:
            self.assertEqual(redact_target(target, keep), shown, target)
        off = configmod.LogSpec(redact_query=False)
        self.assertEqual(redact_target("/chat?token=abc", off), "/chat?token=abc")
        self.assertIsNone(redact_target(None, keep))

    def test_text(self) -> None:
        """Query strings and fragments quoted inside an error message are redacted too."""
        spec = configmod.LogSpec()
        self.assertEqual(
            redact_text('Bad HTTP request status line "GET /x?token=abc HTTP/1.1 junk"', spec),
            'Bad HTTP request status line "GET /x?token=REDACTED HTTP/1.1 junk"',
        )
        self.assertEqual(
            redact_text('resource contains a fragment identifier "abc"', spec, "/x#abc"),
            'resource contains a fragment identifier "REDACTED"',
        )

    def test_headers(self) -> None:
        """Credentials and the handshake key are hidden whatever their case; others stay."""
        shown = redact_headers(
            {
                "authorization": "Bearer x",
                "Cookie": "a=b",
                "proxy-authorization": "Basic y",
                "sec-websocket-key": "k==",
                "user-agent": "ua",
            }
        )
        self.assertEqual(
            shown,
            {
                "authorization": "<redacted>",
                "Cookie": "<redacted>",
                "proxy-authorization": "<redacted>",
                "sec-websocket-key": "<redacted>",
                "user-agent": "ua",
            },
        )

    def test_request_id(self) -> None:
        """A client's X-Request-ID keeps only A-Za-z0-9._- and at most 128 characters."""
        self.assertEqual(sanitize_request_id("abc-123_X.y"), "abc-123_X.y")
        self.assertEqual(sanitize_request_id('a b"c\r\nd=e'), "abcde")
        self.assertEqual(sanitize_request_id("x" * 300), "x" * 128)
        self.assertIsNone(sanitize_request_id(" \"'"))
        self.assertIsNone(sanitize_request_id(None))
