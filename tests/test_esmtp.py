"""ESMTP that follows the real server (issue 5): what EHLO offers is what
the upstream can carry, and MAIL and RCPT parameters reach it only when it
has them."""

import smtplib

import pytest

from conftest import ProxyFactory, RawClient, RawUpstream, Upstream
import smtpproxy

MESSAGE = b"Subject: test\r\n\r\nbody\r\n"


def offered(port):
    """Our EHLO keywords, {KEYWORD: parameters}."""
    client = RawClient(port)
    code, text = client.cmd("EHLO client.example.net")
    client.close()
    assert code == 250
    keywords = {}
    for line in text.split("\n")[1:]:
        keyword, _, parameters = line.partition(" ")
        keywords[keyword] = parameters
    return keywords


@pytest.fixture
def factory():
    """``(upstream, proxy port) = factory(**upstream options)``: an
    aiosmtpd upstream made for the test, and a proxy in front of it."""
    made = []

    def make(hide=(), proxy_attributes=None, **options):
        upstream = Upstream(**options)
        upstream.handler.hide.update(hide)
        proxies = ProxyFactory(upstream)
        made.append((upstream, proxies))
        return upstream, proxies(**(proxy_attributes or {}))
    yield make
    for upstream, proxies in made:
        proxies.stop()
        upstream.stop()


def test_size_is_the_smaller_of_ours_and_the_upstreams(factory):
    upstream, port = factory(data_size_limit=100000)
    assert offered(port)["SIZE"] == "100000"
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    assert client.cmd("MAIL FROM:<a@example.net> SIZE=100001")[0] == 552
    assert client.cmd("MAIL FROM:<a@example.net> SIZE=99999")[0] == 250
    assert client.cmd("RCPT TO:<b@example.org>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: big\r\n\r\n")
    client.send(b"".join([b"y" * 998 + b"\r\n"] * 150) + b".\r\n")
    code, text = client.reply()
    assert code == 552 and text.startswith("5.3.4 ")
    assert "100000 octets" in text
    assert upstream.messages == []
    client.close()


def test_our_size_when_the_upstream_takes_more_or_says_none(factory):
    _, port = factory(data_size_limit=10 ** 9,
                      proxy_attributes={"max_message_size": 2000000})
    assert offered(port)["SIZE"] == "2000000"
    _, port = factory(proxy_attributes={"max_message_size": 3000000})
    assert offered(port)["SIZE"] == "3000000"


def test_8bitmime_only_when_the_upstream_has_it(factory):
    upstream, port = factory()
    assert "8BITMIME" in offered(port)
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("a@example.net", ["b@example.org"],
                        b"Subject: caf\xc3\xa9\r\n\r\n8 bits\r\n",
                        mail_options=["BODY=8BITMIME"])
    assert upstream.messages[0].mail_options == ["BODY=8BITMIME"]

    upstream, port = factory(hide={"8BITMIME"})
    assert "8BITMIME" not in offered(port)
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    code, text = client.cmd("MAIL FROM:<a@example.net> BODY=8BITMIME")
    assert code == 555 and "BODY" in text
    # BODY is 8BITMIME's parameter (RFC 6152), even BODY=7BIT.
    assert client.cmd("MAIL FROM:<a@example.net> BODY=7BIT")[0] == 555
    assert client.cmd("MAIL FROM:<a@example.net>")[0] == 250
    client.close()


def test_smtputf8_addresses_when_the_upstream_has_it(factory):
    upstream, port = factory(enable_SMTPUTF8=True)
    assert "SMTPUTF8" in offered(port)
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    sender = "d\u00f6rte@b\u00fccher.example"
    recipient = "\u7528\u6237@example.org"
    assert client.cmd("MAIL FROM:<%s> SMTPUTF8" % sender)[0] == 250
    assert client.cmd("RCPT TO:<%s>" % recipient)[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(MESSAGE + b".\r\n")
    assert client.reply()[0] == 250
    [message] = upstream.messages
    assert message.mail_from == sender
    assert message.rcpt_tos == [recipient]
    assert "SMTPUTF8" in message.mail_options
    # Without the parameter, a UTF-8 address is refused as RFC 6531 says.
    code, text = client.cmd("MAIL FROM:<%s>" % sender)
    assert code == 553 and text.startswith("5.6.7 ")
    assert client.cmd("MAIL FROM:<a@example.net>")[0] == 250
    code, text = client.cmd("RCPT TO:<%s>" % recipient)
    assert code == 553 and text.startswith("5.6.7 ")
    # Not valid UTF-8, or a C1 control: refused like any 8-bit command.
    client.send(b"RSET\r\nMAIL FROM:<d\xc3@example.net> SMTPUTF8\r\n")
    assert client.reply()[0] == 250
    assert client.reply()[0] == 500
    client.close()


def test_no_smtputf8_when_the_upstream_lacks_it(factory):
    _, port = factory()             # aiosmtpd without enable_SMTPUTF8
    assert "SMTPUTF8" not in offered(port)
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    assert client.cmd("MAIL FROM:<a@example.net> SMTPUTF8")[0] == 555
    client.send("MAIL FROM:<d\u00f6rte@example.net>\r\n".encode("utf-8"))
    assert client.reply()[0] == 500
    client.close()


def test_enhancedstatuscodes_only_when_the_upstream_has_them(factory):
    """The client hears the upstream's own replies: enhanced status codes
    are promised only when the upstream's have them (Exim's do not)."""
    upstream, port = factory()
    assert "ENHANCEDSTATUSCODES" in offered(port)
    upstream, port = factory(hide={"ENHANCEDSTATUSCODES"})
    assert "ENHANCEDSTATUSCODES" not in offered(port)


def test_an_8bitmime_transaction_is_deferred_if_the_upstream_lost_it(
        raw_factory):
    upstream, port = raw_factory(["raw", "8BITMIME"])
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    assert client.cmd("MAIL FROM:<a@example.net> BODY=8BITMIME")[0] == 250
    upstream.ehlo = ["raw"]                     # reconfigured meanwhile
    code, text = client.cmd("RCPT TO:<b@example.org>")
    assert code == 451 and text.startswith("4.3.0 ")
    assert "8BITMIME" in text
    assert not any(line.startswith(b"MAIL") for line in upstream.commands)
    client.close()


def test_a_smtputf8_transaction_is_deferred_if_the_upstream_lost_it(
        factory):
    upstream, port = factory(enable_SMTPUTF8=True)
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    assert client.cmd("MAIL FROM:<a@example.net> SMTPUTF8")[0] == 250
    upstream.handler.hide.add("SMTPUTF8")      # reconfigured meanwhile
    code, text = client.cmd("RCPT TO:<b@example.org>")
    assert code == 451 and text.startswith("4.3.0 ")
    assert upstream.handler.commands == []
    client.close()
    # The session taught the proxy: the next client is not offered it.
    assert "SMTPUTF8" not in offered(port)


DSN_EHLO = ["raw", "PIPELINING", "8BITMIME", "DSN", "SIZE 1000000"]


@pytest.fixture
def raw_factory():
    made = []

    def make(ehlo):
        upstream = RawUpstream(ehlo)
        proxies = ProxyFactory(upstream)
        made.append((upstream, proxies))
        return upstream, proxies()
    yield make
    for upstream, proxies in made:
        proxies.stop()
        upstream.stop()


def test_dsn_parameters_pass_through_when_the_upstream_has_dsn(raw_factory):
    upstream, port = raw_factory(DSN_EHLO)
    assert "DSN" in offered(port)
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    assert client.cmd("MAIL FROM:<a@example.net> RET=HDRS ENVID=QQ+2B314"
                      )[0] == 250
    assert client.cmd("RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE "
                      "ORCPT=rfc822;b@example.org")[0] == 250
    assert client.cmd("RCPT TO:<c@example.org> NOTIFY=NEVER")[0] == 250
    assert b"MAIL FROM:<a@example.net> RET=HDRS ENVID=QQ+2B314\r\n" \
        in upstream.commands
    assert (b"RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE "
            b"ORCPT=rfc822;b@example.org\r\n") in upstream.commands
    assert b"RCPT TO:<c@example.org> NOTIFY=NEVER\r\n" in upstream.commands
    client.close()


@pytest.mark.parametrize("command", [
    "MAIL FROM:<a@example.net> RET=ALL",
    "MAIL FROM:<a@example.net> RET",
    "MAIL FROM:<a@example.net> ENVID=a+b",
    "MAIL FROM:<a@example.net> ENVID=" + "x" * 101,
    "MAIL FROM:<a@example.net> NOTIFY=NEVER",
    "RCPT TO:<b@example.org> NOTIFY=NEVER,SUCCESS",
    "RCPT TO:<b@example.org> NOTIFY=SUCCESS,SUCCESS",
    "RCPT TO:<b@example.org> ORCPT=b@example.org",
    "RCPT TO:<b@example.org> RET=FULL",
])
def test_malformed_dsn_parameters_are_refused(raw_factory, command):
    upstream, port = raw_factory(DSN_EHLO)
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    if command.startswith("RCPT"):
        assert client.cmd("MAIL FROM:<a@example.net>")[0] == 250
    assert client.cmd(command)[0] in (501, 555)
    assert not [line for line in upstream.commands
                if line.startswith((b"MAIL", b"RCPT"))]
    client.close()


def test_no_dsn_when_the_upstream_lacks_it(raw_factory):
    upstream, port = raw_factory(["raw", "PIPELINING"])
    keywords = offered(port)
    assert "DSN" not in keywords and "8BITMIME" not in keywords
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    assert client.cmd("MAIL FROM:<a@example.net> RET=HDRS")[0] == 555
    assert client.cmd("MAIL FROM:<a@example.net>")[0] == 250
    assert client.cmd("RCPT TO:<b@example.org> NOTIFY=NEVER")[0] == 555
    client.close()


def test_what_is_offered_is_learnt_again_after_the_ttl(factory):
    upstream, port = factory(enable_SMTPUTF8=True, proxy_attributes={
        "upstream_capabilities_ttl": 0})
    assert "SMTPUTF8" in offered(port)
    upstream.handler.hide.add("SMTPUTF8")
    assert "SMTPUTF8" not in offered(port)       # asked again


def test_an_unreachable_upstream_leaves_only_our_own_extensions(proxy):
    port = proxy(smtp_port=1)      # nothing listens on port 1
    keywords = offered(port)
    assert sorted(keywords) == ["PIPELINING", "SIZE"]
    assert keywords["SIZE"] == str(smtpproxy.ConcreteMailHandler
                                   .max_message_size)
