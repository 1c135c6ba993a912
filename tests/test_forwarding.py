"""Forwarding: the upstream's verdicts are the client's answers.

Every failure path of the upstream (down, slow, dropping) and of the client
(vanishing or silent mid-DATA) is shown here against a real upstream.
"""

import hashlib
import smtplib
import socket
import threading

import pytest

import smtpproxy
from conftest import RawClient, free_port, open_transaction, wait_until

SENDER = "sender@example.net"
MESSAGE = b"From: sender@example.net\r\nSubject: test\r\n\r\nHello.\r\n"


def test_message_is_delivered_with_its_envelope(proxy, upstream):
    port = proxy()
    with smtplib.SMTP("127.0.0.1", port) as client:
        refused = client.sendmail(SENDER, ["a@example.org", "b@example.org"],
                                  MESSAGE)
    assert refused == {}
    [message] = upstream.messages
    assert message.mail_from == SENDER
    assert message.rcpt_tos == ["a@example.org", "b@example.org"]
    assert message.content == MESSAGE


def test_upstream_rcpt_refusal_reaches_client_others_delivered(proxy,
                                                              upstream):
    upstream.handler.reject["nobody@example.org"] = \
        "550 5.1.1 <nobody@example.org>: unknown user"
    port = proxy()
    with smtplib.SMTP("127.0.0.1", port) as client:
        refused = client.sendmail(
            SENDER, ["a@example.org", "nobody@example.org", "b@example.org"],
            MESSAGE)
    assert refused == {"nobody@example.org": (
        550, b"5.1.1 <nobody@example.org>: unknown user")}
    [message] = upstream.messages
    assert message.rcpt_tos == ["a@example.org", "b@example.org"]


def test_upstream_final_reply_is_relayed_code_and_text(proxy, upstream,
                                                       client_factory):
    upstream.handler.data_reply = "250 2.0.0 Ok: queued as 4XyZ123"
    client = client_factory(proxy())
    open_transaction(client)
    client.send(MESSAGE + b".\r\n")
    assert client.reply() == (250, "2.0.0 Ok: queued as 4XyZ123")


def test_upstream_refusal_of_the_message_is_relayed(proxy, upstream,
                                                    client_factory):
    upstream.handler.data_reply = "554 5.7.1 Message rejected as spam"
    client = client_factory(proxy())
    open_transaction(client)
    client.send(MESSAGE + b".\r\n")
    assert client.reply() == (554, "5.7.1 Message rejected as spam")
    assert client.cmd("NOOP")[0] == 250


def test_nothing_reaches_upstream_before_first_accepted_rcpt(proxy, upstream,
                                                             client_factory):
    class RefuseFirst(smtpproxy.ConcreteMailHandler):
        def shouldWeAcceptRecipient(self, recipient):
            return recipient != "refused@example.org"

        def shouldWeAcceptMail(self):
            return True

    client = client_factory(proxy(handler=RefuseFirst))
    assert client.cmd("EHLO client.example.net")[0] == 250
    assert client.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
    assert client.cmd("RCPT TO:<refused@example.org>")[0] == 451
    assert upstream.connections == 0
    assert client.cmd("RCPT TO:<ok@example.org>")[0] == 250
    assert upstream.connections == 1
    assert upstream.handler.commands[:2] == [
        ("MAIL", SENDER, []), ("RCPT", "ok@example.org")]


def test_policy_reply_string_is_sent_and_upstream_not_asked(proxy, upstream,
                                                            client_factory):
    class NoRelay(smtpproxy.ConcreteMailHandler):
        def shouldWeAcceptRecipient(self, recipient):
            return "550 5.7.1 Relaying denied"

    client = client_factory(proxy(handler=NoRelay))
    open_transaction(client, recipients=[], data=False)
    assert client.cmd("RCPT TO:<x@example.com>") == (
        550, "5.7.1 Relaying denied")
    assert upstream.connections == 0


def test_default_handler_defers_at_data_and_closes(proxy, upstream,
                                                   client_factory):
    client = client_factory(proxy(handler=smtpproxy.ConcreteMailHandler))
    open_transaction(client, data=False)
    assert client.cmd("DATA") == (451, "4.7.1 Please try again later")
    assert client.is_closed()
    assert upstream.messages == []
    wait_until(lambda: upstream.open_connections == 0,
               what="the upstream session to end")


def test_mail_parameters_reach_upstream_only_when_it_has_them(proxy,
                                                              upstream):
    port = proxy()
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail(SENDER, ["a@example.org"], MESSAGE,
                        mail_options=["BODY=8BITMIME"])
    [message] = upstream.messages
    assert message.mail_options == ["BODY=8BITMIME"]   # aiosmtpd has it
    # aiosmtpd without a size limit announces no SIZE: ours is dropped.
    assert all(not o.startswith("SIZE") for o in message.mail_options)


def test_several_transactions_use_one_upstream_session(proxy, upstream):
    port = proxy()
    with smtplib.SMTP("127.0.0.1", port) as client:
        for number in range(3):
            client.sendmail(SENDER, ["r%d@example.org" % number], MESSAGE)
    assert [m.rcpt_tos for m in upstream.messages] == [
        ["r0@example.org"], ["r1@example.org"], ["r2@example.org"]]
    assert upstream.connections == 1


def test_rset_resets_the_upstream_transaction(proxy, upstream,
                                              client_factory):
    client = client_factory(proxy())
    open_transaction(client, recipients=["first@example.org"],
                     data=False)
    assert client.cmd("RSET")[0] == 250
    assert ("RSET",) in upstream.handler.commands
    assert client.cmd("MAIL FROM:<other@example.net>")[0] == 250
    assert client.cmd("RCPT TO:<second@example.org>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(MESSAGE + b".\r\n")
    assert client.reply()[0] == 250
    [message] = upstream.messages
    assert message.mail_from == "other@example.net"
    assert message.rcpt_tos == ["second@example.org"]
    assert upstream.connections == 1


def test_quit_ends_the_upstream_session(proxy, upstream, client_factory):
    # With no pool (upstream_pool_size: tests/test_upstream_pool.py).
    client = client_factory(proxy(upstream_pool_size=0))
    open_transaction(client, data=False)
    assert client.cmd("QUIT")[0] == 221
    wait_until(lambda: ("QUIT",) in upstream.handler.commands,
               what="QUIT upstream")
    wait_until(lambda: upstream.open_connections == 0,
               what="the upstream session to end")
    assert upstream.messages == []


# -- the upstream failing ---------------------------------------------------

def test_upstream_down_gives_4xx_at_rcpt_and_data(proxy, client_factory):
    client = client_factory(proxy(smtp_port=free_port()))
    open_transaction(client, recipients=[], data=False)
    code, text = client.cmd("RCPT TO:<a@example.org>")
    assert (code, text[:5]) == (451, "4.4.1")
    code, text = client.cmd("RCPT TO:<b@example.org>")
    assert (code, text[:5]) == (451, "4.4.1")
    assert client.cmd("DATA")[0] in (451, 503)
    assert client.cmd("NOOP")[0] == 250


def test_upstream_down_with_smtplib_never_gets_2xx(proxy):
    port = proxy(smtp_port=free_port())
    with smtplib.SMTP("127.0.0.1", port) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail(SENDER, ["a@example.org"], MESSAGE)
    assert refused.value.recipients["a@example.org"][0] == 451


def test_upstream_slow_at_rcpt_times_out_with_4xx(proxy, upstream,
                                                  client_factory):
    upstream.handler.delay["RCPT"] = 5
    client = client_factory(proxy(upstream_timeout=1))
    open_transaction(client, recipients=[], data=False)
    # 4.4.2: the proxy's timeout, not the upstream's late 250.
    code, text = client.cmd("RCPT TO:<a@example.org>")
    assert (code, text[:5]) == (451, "4.4.2")
    # The transaction cannot complete: DATA is refused, nothing delivered.
    assert client.cmd("DATA")[0] == 451
    assert upstream.messages == []


def test_upstream_slow_at_final_dot_gives_4xx_not_2xx(proxy, upstream,
                                                      client_factory):
    # The upstream may still take the message after we gave up: the client
    # retries and at worst a duplicate arrives (RFC 1047); nothing is lost.
    upstream.handler.delay["DATA"] = 5
    client = client_factory(proxy(upstream_timeout=1))
    open_transaction(client)
    client.send(MESSAGE + b".\r\n")
    code, text = client.reply()
    assert (code, text[:5]) == (451, "4.4.2")
    assert client.cmd("NOOP")[0] == 250


def test_upstream_dropping_at_rcpt_gives_4xx_nothing_delivered(
        proxy, upstream, client_factory):
    upstream.handler.drop.add("RCPT")
    client = client_factory(proxy())
    open_transaction(client, recipients=[], data=False)
    code, text = client.cmd("RCPT TO:<a@example.org>")
    assert (code, text[:5]) == (451, "4.4.2")
    assert client.cmd("DATA")[0] == 451
    assert upstream.messages == []


def test_upstream_dropping_at_final_dot_gives_4xx(proxy, upstream,
                                                  client_factory):
    upstream.handler.drop.add("DATA")
    client = client_factory(proxy())
    open_transaction(client)
    client.send(MESSAGE + b".\r\n")
    code, text = client.reply()
    assert (code, text[:5]) == (451, "4.4.2")
    assert upstream.messages == []
    # A new transaction opens a new upstream session and is delivered.
    upstream.handler.drop.clear()
    assert client.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
    assert client.cmd("RCPT TO:<again@example.org>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(MESSAGE + b".\r\n")
    assert client.reply()[0] == 250
    assert [m.rcpt_tos for m in upstream.messages] == [["again@example.org"]]


def test_upstream_garbage_reply_gives_4xx(client_factory, proxy):
    garbage = socket.socket()
    garbage.bind(("127.0.0.1", 0))
    garbage.listen(5)
    connections = []

    def answer_garbage():
        # Every connection (the proxy's EHLO probe too) gets an HTTP reply.
        while True:
            try:
                connection, _ = garbage.accept()
            except OSError:
                return
            connection.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
            connections.append(connection)
    thread = threading.Thread(target=answer_garbage)
    thread.daemon = True
    thread.start()
    client = client_factory(proxy(smtp_port=garbage.getsockname()[1]))
    open_transaction(client, recipients=[], data=False)
    code, text = client.cmd("RCPT TO:<a@example.org>")
    assert code == 451 and text.startswith("4.4.")
    garbage.close()
    for connection in connections:
        connection.close()


# -- the client failing -----------------------------------------------------

def test_client_vanishing_mid_data_delivers_nothing(proxy, upstream,
                                                    client_factory):
    client = client_factory(proxy())
    open_transaction(client)
    client.send(b"Subject: half\r\n\r\n" + b"x" * 70 + b"\r\n" * 2000)
    wait_until(lambda: upstream.open_connections == 1, what="upstream")
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()
    wait_until(lambda: upstream.open_connections == 0,
               what="the upstream session to be closed")
    assert upstream.messages == []


def test_client_silent_mid_data_gets_421_nothing_delivered(proxy, upstream,
                                                           client_factory):
    client = client_factory(proxy(inactivity_timeout=1))
    open_transaction(client)
    client.send(b"Subject: half\r\n\r\nsome text\r\n")
    code, text = client.reply()
    assert (code, text[:5]) == (421, "4.4.2")
    assert client.is_closed()
    wait_until(lambda: upstream.open_connections == 0,
               what="the upstream session to be closed")
    assert upstream.messages == []


# -- memory -----------------------------------------------------------------

class HashingHandler(object):
    """Upstream handler that keeps only a digest of each message."""

    def __init__(self):
        self.digests = []

    async def handle_DATA(self, server, session, envelope):
        self.digests.append((len(envelope.original_content),
                             hashlib.sha256(envelope.original_content)
                             .hexdigest()))
        return "250 2.0.0 Ok"


def message_lines(total):
    """A message of about ``total`` bytes as 76-octet lines, some with a
    leading dot (stuffed, as a client sends it), generated in chunks so
    that the test does not hold it."""
    line = b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"\r\n"
    dotted = b".." + line
    block = (line * 99 + dotted) * 8        # 60,800 bytes
    yield b"Subject: big\r\n\r\n"
    for _ in range(total // len(block)):
        yield block


def test_50mb_message_byte_identical_in_bounded_memory(tmp_path,
                                                       proxy_process):
    from conftest import Upstream
    upstream = Upstream(HashingHandler())
    try:
        process = proxy_process(upstream_port=upstream.port,
                                config="max_message_size = 100000000\n")
        before = process.rss()
        client = RawClient(process.port)
        assert client.cmd("EHLO client.example.net")[0] == 250
        assert client.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
        assert client.cmd("RCPT TO:<big@example.org>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        digest = hashlib.sha256()
        size = 0
        for chunk in message_lines(50 * 1000 * 1000):
            client.send(chunk)
            # What the upstream sees is the un-stuffed text.
            unstuffed = chunk.replace(b"\r\n..", b"\r\n.")
            digest.update(unstuffed)
            size += len(unstuffed)
        client.send(b".\r\n")
        assert client.reply()[0] == 250
        client.cmd("QUIT")
        client.close()
        growth = process.peak_rss() - before
        assert upstream.handler.digests == [(size, digest.hexdigest())]
        assert size > 50 * 1000 * 1000 - 100000
        assert growth < 20 * 1024 * 1024, growth
    finally:
        upstream.stop()


def test_after_the_upstream_refuses_data_the_next_transaction_goes_through(
        raw_proxy, raw_upstream):
    # The upstream (as Postfix) keeps its transaction open after refusing
    # DATA: without an RSET, the next MAIL would be "nested" and every
    # recipient of the next message refused.
    port = raw_proxy()
    raw_upstream.data_reply = b"554 5.7.1 no data from you\r\n"
    client = RawClient(port)
    open_transaction(client, data=False)
    assert client.cmd("DATA")[0] == 554
    raw_upstream.data_reply = None
    assert client.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
    assert client.cmd("RCPT TO:<other@example.org>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(MESSAGE + b".\r\n")
    assert client.reply()[0] == 250
    assert client.cmd("QUIT")[0] == 221
    client.close()
    assert raw_upstream.messages == [MESSAGE]
