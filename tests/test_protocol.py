"""The SMTP dialogue: what the proxy answers, and when it hangs up.

Each test checks one rule of the strict state machine on the wire, with a
raw socket client (tests/conftest.py RawClient), so that it fails if the
rule is broken: "the connection closes" is checked by reading EOF, "the
session goes on" by a following NOOP answered 250.

Tests that look only at the proxy's own replies share a few proxies for
the whole module (``shared_proxy``): starting and stopping a proxy costs
half a second (socketserver's poll interval), and one client connection
per case is all the isolation they need.  Tests that look at what reached
the upstream get a fresh proxy and upstream of their own (``proxy``).
"""

import re
import select
import threading
import time

import pytest

import smtpproxy
from conftest import ProxyFactory, Upstream, wait_until
from plainproxy import AcceptAll

MAX_SIZE = 52428800
STRICTNESS = [pytest.param(True, id="strict"),
              pytest.param(False, id="lax")]


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_upstream():
    server = Upstream()
    server.handler.reject["nobody@example.org"] = "550 5.1.1 No such user"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_proxy(shared_upstream):
    """``port = shared_proxy(**attributes)``: one proxy per distinct set of
    class attributes, kept for the whole module."""
    factory = ProxyFactory(shared_upstream)
    ports = {}

    def get(**attributes):
        key = tuple(sorted(attributes.items()))
        if key not in ports:
            ports[key] = factory(**attributes)
        return ports[key]
    yield get
    # Stop them in parallel: each shutdown waits for a 0.5 s poll.
    stoppers = [threading.Thread(target=server.shutdown)
                for server in factory.servers]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join(10)
    for server in factory.servers:
        server.server_close()


def connect(client_factory, port, hello="EHLO client.example"):
    """A client past the greeting and (unless ``hello`` is None) EHLO."""
    client = client_factory(port)
    assert client.greeting[0] == 220
    if hello:
        assert client.cmd(hello)[0] == 250
    return client


def assert_goes_on(client):
    assert client.cmd("NOOP") == (250, "2.0.0 OK")


def assert_after_error(client, strict):
    """A protocol error closes the session when strict, not otherwise."""
    if strict:
        assert client.is_closed()
    else:
        assert_goes_on(client)


def domain_of(length):
    """A valid domain name of exactly ``length`` octets."""
    labels = []
    while length > 63:
        labels.append("d" * 62)
        length -= 63
    labels.append("e" * length)
    return ".".join(labels)


def message(subject, body=b"Hello.\r\n"):
    return (b"From: a@b.example\r\nSubject: " + subject.encode("ascii")
            + b"\r\n\r\n" + body)


# ---------------------------------------------------------------------------
# Greeting, HELO, EHLO
# ---------------------------------------------------------------------------

# time.ctime(): "Tue Nov  5 09:06:00 2026".
CTIME = (r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ 0-9][0-9] "
         r"[0-9]{2}:[0-9]{2}:[0-9]{2} [0-9]{4}")


@pytest.mark.parametrize("attributes, name, software", [
    ({}, "mail.example.com", "smtpproxy " + smtpproxy.__version__),
    ({"servername": "mx.test.example", "serverid": "TestProxy/9.9 beta"},
     "mx.test.example", "TestProxy/9.9 beta"),
], ids=["defaults", "configured"])
def test_greeting_names_server_software_and_time(shared_proxy, client_factory,
                                                 attributes, name, software):
    client = client_factory(shared_proxy(**attributes))
    code, text = client.greeting
    assert code == 220
    assert re.match(r"%s ESMTP %s %s\Z" % (re.escape(name),
                                           re.escape(software), CTIME),
                    text), text


def test_helo_reply_names_server_client_and_peer(shared_proxy,
                                                 client_factory):
    client = connect(client_factory,
                     shared_proxy(servername="mx.test.example"), hello=None)
    assert client.cmd("HELO client.example") == (
        250, "mx.test.example Hello client.example 127.0.0.1")
    assert_goes_on(client)


@pytest.mark.parametrize("strict", STRICTNESS)
@pytest.mark.parametrize("line", ["HELO", "HELO ", "HELO one two",
                                  "EHLO", "EHLO ", "EHLO one two"])
def test_helo_ehlo_need_exactly_one_argument(shared_proxy, client_factory,
                                             line, strict):
    client = connect(client_factory, shared_proxy(strict=strict), hello=None)
    code, text = client.cmd(line)
    assert code == 501, text
    assert_after_error(client, strict)


def test_ehlo_lists_exactly_the_implemented_extensions(shared_proxy,
                                                       client_factory):
    client = connect(client_factory,
                     shared_proxy(servername="mx.test.example",
                                  max_message_size=1234567), hello=None)
    code, text = client.cmd("EHLO client.example")
    assert code == 250
    lines = text.split("\n")
    assert lines[0].startswith("mx.test.example ")
    assert lines[1:] == ["PIPELINING", "SIZE 1234567", "8BITMIME",
                         "ENHANCEDSTATUSCODES"]


def test_ehlo_default_size_is_max_message_size(shared_proxy, client_factory):
    client = connect(client_factory, shared_proxy(), hello=None)
    code, text = client.cmd("EHLO client.example")
    assert code == 250
    assert text.split("\n")[1:] == ["PIPELINING", "SIZE %d" % MAX_SIZE,
                                    "8BITMIME", "ENHANCEDSTATUSCODES"]


# ---------------------------------------------------------------------------
# Order of commands
# ---------------------------------------------------------------------------

def test_mail_before_helo_is_503_and_session_goes_on(shared_proxy,
                                                     client_factory):
    client = connect(client_factory, shared_proxy(), hello=None)
    code, text = client.cmd("MAIL FROM:<a@b.example>")
    assert code == 503
    assert text.startswith("5.5.2 ")
    assert_goes_on(client)
    assert client.cmd("EHLO client.example")[0] == 250
    assert client.cmd("MAIL FROM:<a@b.example>")[0] == 250


def test_second_mail_in_a_transaction_is_503_and_session_goes_on(
        shared_proxy, client_factory):
    client = connect(client_factory, shared_proxy())
    assert client.cmd("MAIL FROM:<a@b.example>")[0] == 250
    assert client.cmd("MAIL FROM:<c@d.example>")[0] == 503
    assert_goes_on(client)


@pytest.mark.parametrize("strict", STRICTNESS)
def test_rcpt_before_mail_is_503(shared_proxy, client_factory, strict):
    client = connect(client_factory, shared_proxy(strict=strict))
    assert client.cmd("RCPT TO:<c@d.example>")[0] == 503
    assert_after_error(client, strict)


@pytest.mark.parametrize("strict", STRICTNESS)
@pytest.mark.parametrize("before", [
    [],
    ["MAIL FROM:<a@b.example>"],
    ["MAIL FROM:<a@b.example>", "RCPT TO:<nobody@example.org>"],
], ids=["no-mail", "no-rcpt", "rcpt-refused-upstream"])
def test_data_before_an_accepted_rcpt_is_503(shared_proxy, client_factory,
                                             before, strict):
    client = connect(client_factory, shared_proxy(strict=strict))
    for line in before:
        assert client.cmd(line)[0] in (250, 550), line
    assert client.cmd("DATA")[0] == 503
    assert_after_error(client, strict)


@pytest.mark.parametrize("strict", STRICTNESS)
@pytest.mark.parametrize("line, expected", [
    ("XYZZY", 500),
    ("EXPN staff", 500),
    ("", 500),
    ("HELP", 502),
], ids=["unknown", "expn", "empty-line", "help"])
def test_unknown_command_empty_line_and_help_are_refused(
        shared_proxy, client_factory, line, expected, strict):
    client = connect(client_factory, shared_proxy(strict=strict))
    assert client.cmd(line)[0] == expected
    assert_after_error(client, strict)


def test_rset_and_noop_are_250(shared_proxy, client_factory):
    client = connect(client_factory, shared_proxy())
    assert client.cmd("NOOP")[0] == 250
    assert client.cmd("MAIL FROM:<a@b.example>")[0] == 250
    assert client.cmd("RSET")[0] == 250
    # The transaction is gone: a new MAIL is not a second one.
    assert client.cmd("MAIL FROM:<c@d.example>")[0] == 250
    assert client.cmd("NOOP")[0] == 250


def test_vrfy_is_252_and_needs_an_argument(shared_proxy, client_factory):
    client = connect(client_factory, shared_proxy())
    assert client.cmd("VRFY postmaster")[0] == 252
    assert client.cmd("VRFY")[0] == 501


def test_quit_is_221_and_closes(shared_proxy, client_factory):
    client = connect(client_factory, shared_proxy())
    code, text = client.cmd("QUIT")
    assert code == 221
    assert client.is_closed()


# ---------------------------------------------------------------------------
# Envelope syntax on the wire
# ---------------------------------------------------------------------------

LOCAL_64 = "l" * 64


@pytest.mark.parametrize("lines, expected", [
    (["MAIL FROM: <a@b.example>"], 501),
    (["MAIL FROM :<a@b.example>"], 501),
    (["MAIL FROM:<a@b.example>", "RCPT TO: <x@y.example>"], 501),
    (["MAIL FROM:<a@b.example>", "RCPT TO :<x@y.example>"], 501),
    (["MAIL FROM:a@b.example"], 501),
    (["MAIL FROM:<a@b.example>", "RCPT TO:x@y.example"], 501),
    (["MAIL FROM:<a@b.example"], 501),
    (["MAIL FROM:<%s@b.example>" % LOCAL_64], 250),
    (["MAIL FROM:<%s@b.example>" % ("l" * 65)], 501),
    (["MAIL FROM:<a@b.example>",
      "RCPT TO:<%s@y.example>" % ("l" * 65)], 501),
    (["MAIL FROM:<a@%s>" % domain_of(256)], 501),
    (["MAIL FROM:<a@%s.example>" % ("x" * 64)], 501),
    # The path, angle brackets included: 256 octets at most.
    (["MAIL FROM:<%s@%s>" % (LOCAL_64, domain_of(189))], 250),
    (["MAIL FROM:<%s@%s>" % (LOCAL_64, domain_of(190))], 501),
    (["MAIL FROM:<a@b.example>",
      "RCPT TO:<%s@%s>" % (LOCAL_64, domain_of(190))], 501),
    (["MAIL FROM:<>"], 250),
], ids=["mail-space-after-colon", "mail-space-before-colon",
        "rcpt-space-after-colon", "rcpt-space-before-colon",
        "mail-no-brackets", "rcpt-no-brackets", "mail-no-closing-bracket",
        "local-part-64", "local-part-65", "rcpt-local-part-65",
        "domain-256", "domain-label-64", "path-256", "path-257",
        "rcpt-path-257", "null-sender"])
def test_envelope_syntax(shared_proxy, client_factory, lines, expected):
    client = connect(client_factory, shared_proxy())
    for line in lines[:-1]:
        assert client.cmd(line)[0] == 250, line
    code, text = client.cmd(lines[-1])
    assert code == expected, text
    if expected == 501:
        assert client.is_closed()
    else:
        assert_goes_on(client)


def test_null_sender_is_accepted_and_forwarded(proxy, upstream,
                                               client_factory):
    client = connect(client_factory, proxy())
    assert client.cmd("MAIL FROM:<>")[0] == 250
    assert client.cmd("RCPT TO:<x@y.example>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(message("bounce") + b".\r\n")
    assert client.reply()[0] == 250
    [delivered] = upstream.messages
    assert delivered.mail_from in ("", "<>")
    assert upstream.handler.commands[0][0] == "MAIL"
    assert upstream.handler.commands[0][1] in ("", "<>")


def test_rcpt_postmaster_is_accepted_and_forwarded(proxy, upstream,
                                                   client_factory):
    client = connect(client_factory, proxy())
    assert client.cmd("MAIL FROM:<a@b.example>")[0] == 250
    assert client.cmd("RCPT TO:<Postmaster>")[0] == 250
    assert ("RCPT", "Postmaster") in upstream.handler.commands


# ---------------------------------------------------------------------------
# parse_path, directly
# ---------------------------------------------------------------------------

parse_path = smtpproxy.parse_path
EnvelopeSyntaxError = smtpproxy.EnvelopeSyntaxError


@pytest.mark.parametrize("text, mailbox", [
    ('<"john doe"@example.com>', '"john doe"@example.com'),
    ('<"a@b"@example.com>', '"a@b"@example.com'),
    ('<"a>b"@example.com>', '"a>b"@example.com'),
    ('<"a@b>c"@example.com>', '"a@b>c"@example.com'),
    ('<"a\\\\b"@example.com>', '"a\\\\b"@example.com'),
    ('<"a\\"b"@example.com>', '"a\\"b"@example.com'),
    ('<"a\\">b"@example.com>', '"a\\">b"@example.com'),
], ids=["space", "at", "gt", "at-and-gt", "quoted-backslash",
        "quoted-quote", "quoted-quote-then-gt"])
def test_parse_path_quoted_local_part(text, mailbox):
    assert parse_path(text) == (mailbox, "", [])
    assert parse_path(text + " SIZE=10") == (mailbox, "", [("SIZE", "10")])


def test_parse_path_unterminated_quote_is_refused():
    for text in ['<"a@example.com>', '<"a>@example.com>', '<"a"b"@x.com>']:
        with pytest.raises(EnvelopeSyntaxError):
            parse_path(text)


@pytest.mark.parametrize("text", [
    "<a@[192.0.2.1]>",
    "<a@[IPv6:2001:db8::1]>",
    "<a@[IPv6:::1]>",
    "<a@[ipv6:2001:DB8:0:0:0:0:0:1]>",
])
def test_parse_path_address_literals(text):
    assert parse_path(text) == (text[1:-1], "", [])


@pytest.mark.parametrize("text", [
    "<a@[300.1.1.1]>",
    "<a@[192.0.2]>",
    "<a@[192.0.2.1.5]>",
    "<a@[IPv6:2001:db8::g]>",
    "<a@[IPv6:192.0.2.1]>",
    "<a@[2001:db8::1]>",
    "<a@[]>",
    "<a@[192.0.2.1>",
])
def test_parse_path_bad_address_literal_is_refused(text):
    with pytest.raises(EnvelopeSyntaxError):
        parse_path(text)


def test_parse_path_source_route_is_returned_apart():
    assert parse_path("<@a.example,@b.example:c@d.example>") == (
        "c@d.example", "@a.example,@b.example:", [])
    assert parse_path("<@a.example:c@d.example> SIZE=1") == (
        "c@d.example", "@a.example:", [("SIZE", "1")])
    for text in ["<@a.example:>", "<@:c@d.example>",
                 "<@a.example,b.example:c@d.example>",
                 "<@a.example c@d.example>"]:
        with pytest.raises(EnvelopeSyntaxError):
            parse_path(text, null_allowed=True)


def test_parse_path_parameters():
    assert parse_path("<a@b.example> size=100 body=8BITMIME FOO") == (
        "a@b.example", "", [("SIZE", "100"), ("BODY", "8BITMIME"),
                            ("FOO", None)])
    assert parse_path("<> Body=7bit", null_allowed=True) == (
        "", "", [("BODY", "7bit")])
    for text in ["<a@b.example> SIZE=1 size=2",
                 "<a@b.example> BODY=7BIT SIZE=1 Body=8BITMIME",
                 "<a@b.example> SIZE=", "<a@b.example> =1",
                 "<a@b.example> SIZE=a=b", "<a@b.example>SIZE=1"]:
        with pytest.raises(EnvelopeSyntaxError):
            parse_path(text)


@pytest.mark.parametrize("text", [
    "<a@b.example> ",
    "<a@b.example>  SIZE=1",
    "<a@b.example> SIZE=1 ",
    "<a@b.example>\t",
])
def test_parse_path_trailing_or_double_space_is_refused(text):
    with pytest.raises(EnvelopeSyntaxError):
        parse_path(text)


@pytest.mark.parametrize("text", [
    "Joe <a@b.example>",
    '"Joe" <a@b.example>',
    "a@b.example",
    "a@b.example (Joe)",
    "<a@b.example> (Joe)",
    "<(Joe)a@b.example>",
    "<a(Joe)@b.example>",
    "<a@b.example(Joe)>",
    "<a@b.example (Joe)>",
    "<Joe <a@b.example>>",
    "< a@b.example>",
    "<a@b.example >",
])
def test_parse_path_display_names_and_comments_are_refused(text):
    with pytest.raises(EnvelopeSyntaxError):
        parse_path(text)


def test_parse_path_null_and_postmaster_only_where_allowed():
    assert parse_path("<>", null_allowed=True) == ("", "", [])
    with pytest.raises(EnvelopeSyntaxError):
        parse_path("<>")
    assert parse_path("<Postmaster>", postmaster_allowed=True) == (
        "Postmaster", "", [])
    with pytest.raises(EnvelopeSyntaxError):
        parse_path("<Postmaster>")


# ---------------------------------------------------------------------------
# MAIL and RCPT parameters
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("hello, line, expected, status", [
    ("EHLO x.example", "MAIL FROM:<a@b.example> SIZE=1000", 250, "2.1.0"),
    ("EHLO x.example", "MAIL FROM:<a@b.example> SIZE=1001", 552, "5.3.4"),
    ("EHLO x.example", "MAIL FROM:<a@b.example> SIZE=99999999999999999999",
     552, "5.3.4"),
    ("EHLO x.example", "MAIL FROM:<a@b.example> SIZE=abc", 501, None),
    ("EHLO x.example", "MAIL FROM:<a@b.example> SIZE=-1", 501, None),
    ("EHLO x.example", "MAIL FROM:<a@b.example> SIZE", 501, None),
    ("EHLO x.example", "MAIL FROM:<a@b.example> BODY=8BITMIME", 250, None),
    ("EHLO x.example", "MAIL FROM:<a@b.example> BODY=7BIT SIZE=10", 250,
     None),
    ("EHLO x.example", "MAIL FROM:<a@b.example> BODY=BINARYMIME", 555, None),
    ("EHLO x.example", "MAIL FROM:<a@b.example> SMTPUTF8", 555, None),
    ("EHLO x.example", "MAIL FROM:<a@b.example> FOO=bar", 555, None),
    ("HELO x.example", "MAIL FROM:<a@b.example> SIZE=10", 555, None),
    ("HELO x.example", "MAIL FROM:<a@b.example> BODY=8BITMIME", 555, None),
    ("HELO x.example", "MAIL FROM:<a@b.example>", 250, None),
], ids=["size-at-limit", "size-over-limit", "size-huge", "size-letters",
        "size-negative", "size-no-value", "body-8bitmime",
        "body-7bit-and-size", "body-unknown", "smtputf8", "unknown",
        "helo-size", "helo-body", "helo-no-parameter"])
def test_mail_parameters(shared_proxy, client_factory, hello, line,
                         expected, status):
    client = connect(client_factory, shared_proxy(max_message_size=1000),
                     hello=hello)
    code, text = client.cmd(line)
    assert code == expected, text
    if status:
        assert text.startswith(status + " ")


@pytest.mark.parametrize("parameter", ["NOTIFY=NEVER", "ORCPT=rfc822;x@y.z",
                                       "FOO"])
def test_rcpt_with_a_parameter_is_555(shared_proxy, client_factory,
                                      parameter):
    client = connect(client_factory, shared_proxy())
    assert client.cmd("MAIL FROM:<a@b.example>")[0] == 250
    assert client.cmd("RCPT TO:<x@y.example> " + parameter)[0] == 555


# ---------------------------------------------------------------------------
# A repeated HELO/EHLO resets the transaction
# ---------------------------------------------------------------------------

def test_repeated_hello_resets_without_upstream(shared_proxy, client_factory):
    for again in ("EHLO client.example", "HELO client.example",
                  "EHLO other.example"):
        client = connect(client_factory, shared_proxy())
        assert client.cmd("MAIL FROM:<a@b.example>")[0] == 250
        assert client.cmd(again)[0] == 250
        code, text = client.cmd("RCPT TO:<x@y.example>")
        assert code == 503, again
        assert "Sender not yet given" in text


@pytest.mark.parametrize("again", ["EHLO client.example",
                                   "HELO other.example"])
def test_repeated_hello_resets_upstream_transaction(proxy, upstream,
                                                    client_factory, again):
    client = connect(client_factory, proxy(strict=False))
    assert client.cmd("MAIL FROM:<a@b.example>")[0] == 250
    assert client.cmd("RCPT TO:<first@y.example>")[0] == 250
    assert ("RSET",) not in upstream.handler.commands
    assert client.cmd(again)[0] == 250
    assert ("RSET",) in upstream.handler.commands
    assert client.cmd("RCPT TO:<second@y.example>")[0] == 503
    # A new transaction goes through, without the first recipient.
    assert client.cmd("MAIL FROM:<c@d.example>")[0] == 250
    assert client.cmd("RCPT TO:<third@y.example>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(message("after reset") + b".\r\n")
    assert client.reply()[0] == 250
    [delivered] = upstream.messages
    assert delivered.mail_from == "c@d.example"
    assert delivered.rcpt_tos == ["third@y.example"]


# ---------------------------------------------------------------------------
# Control bytes and line endings
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("strict", STRICTNESS)
@pytest.mark.parametrize("line", [
    b"NOOP a\x00b\r\n",
    b"NO\x00OP\r\n",
    b"NOOP \x1b[31m\r\n",
    b"NOOP a\x7fb\r\n",
    b"NOOP a\tb\r\n",
    b"NOOP a\rb\r\n",
    b"NOOP caf\xc3\xa9\r\n",
    b"VRFY \xe9t\xe9\r\n",
    b"NOOP xyz\n",
    b"\n",
], ids=["nul", "nul-in-verb", "escape", "del", "tab", "bare-cr", "utf-8",
        "latin-1", "bare-lf", "bare-lf-only"])
def test_control_and_8bit_bytes_and_bare_lf_are_500(shared_proxy,
                                                    client_factory, line,
                                                    strict):
    client = connect(client_factory, shared_proxy(strict=strict))
    client.send(line)
    code, text = client.reply()
    assert code == 500, text
    assert_after_error(client, strict)


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("octets, expected", [(511, 250), (512, 250),
                                              (513, 500), (600, 500)])
def test_command_line_limit_is_512_octets(shared_proxy, client_factory,
                                          octets, expected):
    client = connect(client_factory, shared_proxy())
    line = b"NOOP " + b"x" * (octets - 7) + b"\r\n"
    assert len(line) == octets
    client.send(line)
    code, text = client.reply()
    assert code == expected, text
    if expected == 500:
        assert text.startswith("5.5.6 ")
    assert_goes_on(client)


@pytest.mark.parametrize("tail", [b"QUIT\r\n", b"XYZZY\r\n", b"\n"])
def test_rest_of_a_long_line_is_discarded_not_executed(shared_proxy,
                                                       client_factory, tail):
    # If the tail after the 512th octet were run as a command, QUIT or an
    # unknown command would end the session (strict), and a bare LF would
    # be refused too.
    client = connect(client_factory, shared_proxy())
    client.send(b"X" * 511 + b"\r" + tail)
    code, text = client.reply()
    assert code == 500
    assert text.startswith("5.5.6 ")
    assert_goes_on(client)
    assert client.cmd("MAIL FROM:<a@b.example>")[0] == 250


def test_10mb_command_line_in_bounded_memory(proxy_process, client_factory):
    process = proxy_process()
    client = connect(client_factory, process.port)
    before = process.rss()
    chunk = b"A" * 65536
    for _ in range(10 * 1024 * 1024 // len(chunk)):
        client.send(chunk)
    client.send(b"\r\n")
    code, text = client.reply()
    growth = process.peak_rss() - before
    assert growth < 5 * 1024 * 1024, "peak RSS grew by %d bytes" % growth
    assert code == 500
    assert text.startswith("5.5.6 ")
    assert_goes_on(client)


def test_recipients_over_max_recipients_get_452(proxy, upstream,
                                                client_factory):
    client = connect(client_factory, proxy(max_recipients=3))
    assert client.cmd("MAIL FROM:<a@b.example>")[0] == 250
    for number in range(1, 4):
        assert client.cmd("RCPT TO:<r%d@y.example>" % number)[0] == 250
    code, text = client.cmd("RCPT TO:<r4@y.example>")
    assert code == 452
    assert text.startswith("4.5.3 ")
    assert client.cmd("RCPT TO:<r5@y.example>")[0] == 452
    assert client.cmd("DATA")[0] == 354
    client.send(message("three") + b".\r\n")
    assert client.reply()[0] == 250
    [delivered] = upstream.messages
    assert delivered.rcpt_tos == ["r1@y.example", "r2@y.example",
                                  "r3@y.example"]
    assert ("RCPT", "r4@y.example") not in upstream.handler.commands


def test_silent_client_gets_421_after_inactivity_timeout(shared_proxy,
                                                         client_factory):
    client = connect(client_factory, shared_proxy(inactivity_timeout=1))
    start = time.monotonic()
    # Blocks until the proxy speaks (the client would give up after 15 s).
    code, text = client.reply()
    assert code == 421
    assert text.startswith("4.4.2 ")
    assert client.is_closed()
    assert time.monotonic() - start > 0.5


def test_silent_client_before_hello_gets_421(shared_proxy, client_factory):
    client = connect(client_factory, shared_proxy(inactivity_timeout=1),
                     hello=None)
    code, text = client.reply()
    assert (code, text[:6]) == (421, "4.4.2 ")
    assert client.is_closed()


def test_max_errors_drops_the_client_with_421(shared_proxy, client_factory):
    client = connect(client_factory, shared_proxy(strict=False, max_errors=3),
                     hello=None)
    assert client.cmd("MAIL FROM:<a@b.example>")[0] == 503     # 1
    assert_goes_on(client)
    assert client.cmd("VRFY")[0] == 501                         # 2
    assert_goes_on(client)
    assert client.cmd("XYZZY")[0] == 500                        # 3
    code, text = client.reply()
    assert code == 421
    assert text.startswith("4.7.0 ")    # not the inactivity timeout's
    assert client.is_closed()


# ---------------------------------------------------------------------------
# Talking before the greeting (postscreen's pre-greet test)
# ---------------------------------------------------------------------------

def test_client_talking_during_greet_pause_is_dropped(shared_proxy,
                                                      client_factory):
    port = shared_proxy(greet_pause=3)
    waiting = client_factory(port, greet=False)
    waiting_since = time.monotonic()
    talker = client_factory(port, greet=False)
    talker.send(b"EHLO x\r\n")
    code, text = talker.reply()
    assert code == 554, text
    assert talker.is_closed()
    # Dropped during the pause: the client that came first and waits has
    # not been greeted yet.
    assert select.select([waiting.sock], [], [], 0)[0] == []
    # The patient client is served normally, once the pause is over.
    code, text = waiting.reply()
    assert code == 220
    assert time.monotonic() - waiting_since > 2.5
    assert waiting.cmd("EHLO x.example")[0] == 250
    assert waiting.cmd("MAIL FROM:<a@b.example>")[0] == 250


class GatedGreeting(AcceptAll):
    """Greets only once the test opens ``gate`` (a threading.Event)."""

    gate = None

    def handleConnect(self):
        self.gate.wait(10)
        AcceptAll.handleConnect(self)


def test_bytes_waiting_before_the_greeting_are_caught(proxy, client_factory):
    gate = threading.Event()
    port = proxy(handler=GatedGreeting, gate=gate, greet_pause=0)
    client = client_factory(port, greet=False)
    client.send(b"EHLO x\r\n")
    gate.set()
    code, text = client.reply()
    assert code == 554, text
    assert client.is_closed()


def test_no_greet_pause_serves_a_patient_client(proxy, client_factory):
    gate = threading.Event()
    gate.set()
    client = client_factory(proxy(handler=GatedGreeting, gate=gate,
                                  greet_pause=0))
    assert client.greeting[0] == 220
    assert client.cmd("EHLO x.example")[0] == 250


# ---------------------------------------------------------------------------
# Pipelining (RFC 2920) and upstream sessions
# ---------------------------------------------------------------------------

PIPELINED = ("MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
             "RCPT TO:<e@f.example>\r\nDATA\r\n")


def test_pipelined_transaction(proxy, upstream, client_factory):
    client = connect(client_factory, proxy())
    client.send(PIPELINED)
    assert [client.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    body = b"line one\r\n..a stuffed dot\r\nlast line\r\n"
    client.send(message("pipelined", body) + b".\r\nQUIT\r\n")
    assert client.reply()[0] == 250
    assert client.reply()[0] == 221
    assert client.is_closed()
    [delivered] = upstream.messages
    assert delivered.mail_from == "a@b.example"
    assert delivered.rcpt_tos == ["c@d.example", "e@f.example"]
    assert delivered.content == message(
        "pipelined", b"line one\r\n.a stuffed dot\r\nlast line\r\n")


def test_pipelined_second_transaction_after_the_dot(proxy, upstream,
                                                    client_factory):
    client = connect(client_factory, proxy())
    client.send(PIPELINED)
    assert [client.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    # Larger than the proxy's read and upstream chunk sizes (64 KiB), so
    # that the second transaction straddles buffer boundaries.
    first = message("first", b"".join(b"%05d %s\r\n" % (n, b"x" * 90)
                                      for n in range(1500)))
    second = message("second", b"short\r\n")
    client.send(first + b".\r\nMAIL FROM:<g@h.example>\r\n"
                b"RCPT TO:<i@j.example>\r\nDATA\r\n")
    assert [client.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    client.send(second + b".\r\nQUIT\r\n")
    assert client.reply()[0] == 250
    assert client.reply()[0] == 221
    first_copy, second_copy = upstream.messages
    assert first_copy.content == first
    assert first_copy.rcpt_tos == ["c@d.example", "e@f.example"]
    assert second_copy.mail_from == "g@h.example"
    assert second_copy.rcpt_tos == ["i@j.example"]
    assert second_copy.content == second


def test_transactions_share_one_upstream_session_opened_at_first_rcpt(
        proxy, upstream, client_factory):
    client = connect(client_factory, proxy())
    assert client.cmd("MAIL FROM:<a@b.example>")[0] == 250
    assert client.cmd("NOOP")[0] == 250
    assert upstream.connections == 0
    for number in range(3):
        if number:
            assert client.cmd("MAIL FROM:<a@b.example>")[0] == 250
        assert client.cmd("RCPT TO:<r%d@y.example>" % number)[0] == 250
        assert client.cmd("DATA")[0] == 354
        client.send(message("number %d" % number) + b".\r\n")
        assert client.reply()[0] == 250
        assert upstream.connections == 1
    assert client.cmd("QUIT")[0] == 221
    assert [m.rcpt_tos for m in upstream.messages] == [
        ["r0@y.example"], ["r1@y.example"], ["r2@y.example"]]
    assert upstream.connections == 1
    # Ended, or kept for the next client (upstream_pool_size).
    proxy.wait_idle()
    assert upstream.open_connections == len(smtpproxy.upstream_pool)
