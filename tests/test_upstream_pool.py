"""Warm upstream sessions: a session whose client has gone waits in the
pool (upstream_pool_size, upstream_pool_idle) and serves the next client
after a new EHLO with that client's name.  Every way it can go wrong: the
upstream drops a pooled session or says 421 meanwhile, a session that
waited too long, a capability set that changed, sessions that must never
be reused (an open transaction, a failure, TLS, XCLIENT), the stop."""

import re
import smtplib
import socket

import smtpproxy
from conftest import (ProxyFactory, RawClient, Upstream, open_transaction,
                      wait_until)

MESSAGE = b"Subject: pooled\r\n\r\nhello\r\n"


def send(port, helo="client.example.net", sender="a@example.net"):
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.ehlo(helo)
    refused = client.sendmail(sender, ["b@example.org"], MESSAGE)
    client.quit()
    return refused


def test_the_next_clients_reuse_one_upstream_session(proxy, upstream):
    port = proxy(upstream_pool_size=20)
    for number in range(3):
        assert send(port, helo="client%d.example.net" % number) == {}
        wait_until(lambda: len(smtpproxy.upstream_pool) == 1,
                   what="the session in the pool")
    assert upstream.connections == 1
    assert len(upstream.messages) == 3
    # Each client's own name, told again on the warm session; no QUIT.
    assert upstream.handler.ehlos[-3:] == ["client%d.example.net" % number
                                           for number in range(3)]
    assert ("QUIT",) not in upstream.handler.commands


def test_no_pool_when_its_size_is_zero(proxy, upstream):
    port = proxy(upstream_pool_size=0)
    for _ in range(3):
        assert send(port) == {}
    wait_until(lambda: upstream.open_connections == 0, what="QUITs")
    assert upstream.connections == 3
    assert len(smtpproxy.upstream_pool) == 0


def test_a_pooled_session_the_upstream_dropped_is_replaced_unseen(proxy):
    # aiosmtpd ends a session idle for 1 s (421, then closed): the pooled
    # session is found gone, and the client gets a new one.
    short = Upstream(timeout=1)
    try:
        port = proxy(smtp_port=short.port, upstream_pool_size=20)
        assert send(port) == {}
        wait_until(lambda: short.open_connections == 0, timeout=5,
                   what="the upstream to drop the idle session")
        connections = short.connections
        assert send(port) == {}
        assert short.connections == connections + 1
        assert len(short.messages) == 2
    finally:
        short.stop()


def test_a_pooled_session_that_breaks_on_its_ehlo_is_replaced(proxy,
                                                             upstream):
    port = proxy(upstream_pool_size=20)
    assert send(port) == {}
    wait_until(lambda: len(smtpproxy.upstream_pool) == 1, what="the pool")
    # Looks fine (nothing to read), but cannot be written to any more.
    session = smtpproxy.upstream_pool._pooled[
        next(iter(smtpproxy.upstream_pool._pooled))][0][0]
    session.sock.shutdown(socket.SHUT_WR)
    assert send(port) == {}             # the client hears nothing of it
    assert upstream.connections == 2
    assert len(upstream.messages) == 2


def test_a_session_that_waited_too_long_is_closed_with_quit(proxy,
                                                            upstream):
    port = proxy(upstream_pool_size=20, upstream_pool_idle=0.3)
    assert send(port) == {}
    # The server's service_actions() expire it (it polls every 0.05 s).
    wait_until(lambda: upstream.open_connections == 0, timeout=5,
               what="the expired session to be closed")
    assert upstream.handler.commands[-1][0] == "QUIT"
    assert send(port) == {}
    assert upstream.connections == 2


def test_a_changed_capability_set_is_learnt_on_reuse(proxy, raw_upstream):
    port = proxy(smtp_port=raw_upstream.port, upstream_pool_size=20)

    def rcpt_then_quit():
        client = RawClient(port)
        client.cmd("EHLO client.example.net")
        client.cmd("MAIL FROM:<a@example.net>")
        assert client.cmd("RCPT TO:<b@example.org>")[0] == 250
        client.cmd("QUIT")
        client.close()
    rcpt_then_quit()
    wait_until(lambda: len(smtpproxy.upstream_pool) == 1, what="the pool")
    # The upstream now offers SMTPUTF8: the warm session's new EHLO says
    # so, and the proxy learns it.
    raw_upstream.ehlo = ["raw", "SMTPUTF8", "8BITMIME"]
    rcpt_then_quit()
    assert len([c for c in raw_upstream.commands
                if c.startswith(b"EHLO client")]) == 2
    assert proxy.servers[-1].counters["upstream_reused"] == 1
    client = RawClient(port)
    reply = client.cmd("EHLO client.example.net")
    assert "SMTPUTF8" in reply[1]
    client.close()


def test_a_session_left_in_a_transaction_is_not_reused(proxy, upstream):
    port = proxy(upstream_pool_size=20)
    client = RawClient(port)
    open_transaction(client, data=False)
    client.close()                      # gone with the transaction open
    wait_until(lambda: upstream.open_connections == 0,
               what="the upstream session to be closed")
    assert len(smtpproxy.upstream_pool) == 0
    assert send(port) == {}
    assert upstream.connections == 2


def test_a_session_that_failed_is_not_reused(proxy, upstream):
    port = proxy(upstream_pool_size=20)
    client = RawClient(port)
    open_transaction(client)
    client.send(b"Subject: x\r\n\r\nbare\nlf\r\n.\r\n")   # refused: lost
    client.reply()
    client.cmd("QUIT")
    client.close()
    wait_until(lambda: upstream.open_connections == 0,
               what="the aborted session to be closed")
    assert len(smtpproxy.upstream_pool) == 0


def test_sessions_with_xclient_are_never_pooled(proxy, upstream):
    port = proxy(xclient=True, upstream_pool_size=20)
    for _ in range(2):
        assert send(port) == {}
    wait_until(lambda: upstream.open_connections == 0, what="QUITs")
    assert upstream.connections == 2
    assert len(smtpproxy.upstream_pool) == 0


def test_the_stop_closes_the_pooled_sessions(proxy, upstream):
    port = proxy(upstream_pool_size=20)
    assert send(port) == {}
    wait_until(lambda: len(smtpproxy.upstream_pool) == 1, what="the pool")
    proxy.servers[-1].shutdown()
    proxy.servers[-1].server_close()
    wait_until(lambda: upstream.open_connections == 0,
               what="the pooled session's QUIT")
    assert upstream.handler.commands[-1][0] == "QUIT"


def test_delivered_messages_keep_one_session_pooled(proxy, upstream):
    # Each delivery forgives the session its EHLO: it serves client
    # after client, however many.
    port = proxy(upstream_pool_size=20)
    for number in range(3 * smtpproxy.UpstreamSession.max_undelivered):
        assert send(port) == {}
        wait_until(lambda: len(smtpproxy.upstream_pool) == 1,
                   what="the session in the pool")
    assert upstream.connections == 1
    assert proxy.servers[-1].counters.get("upstream_retired", 0) == 0


# Postfix's commands that count against smtpd_junk_command_limit, as its
# "disconnect from" line names them.
POSTFIX_JUNK = ("helo", "ehlo", "rset", "noop", "vrfy", "etrn")


def postfix_sessions(postfix):
    """The command counts of each finished Postfix session: a list of
    dicts ({"ehlo": 3, "rset": 2, ...}), from its "disconnect" lines."""
    sessions = []
    for line in postfix.log_lines(" disconnect from "):
        counts = re.findall(r" ([a-z]+)=([0-9]+)(?:/[0-9]+)?", line)
        sessions.append(dict((name, int(count)) for name, count in counts))
    return sessions


def test_a_session_is_retired_before_postfix_counts_it_as_junk(
        upstream, postfix_factory):
    # The scenario: 56 sessions of EHLO, MAIL, RCPT postmaster,
    # RSET, QUIT, each of which Postfix counts two junk commands for and
    # forgives only after a delivered message.  Pooled without a bound,
    # they left one Postfix session past smtpd_junk_command_limit (100)
    # and smtpd_soft_error_limit (10): a delay before every reply of the
    # next legitimate message.  Retired in time, no Postfix session
    # carries more than max_undelivered, plus one client's own.
    postfix = postfix_factory(upstream.port, xclient=False)
    factory = ProxyFactory(postfix)
    try:
        port = factory(upstream_pool_size=20)
        server = factory.servers[-1]
        for _ in range(56):
            client = RawClient(port)
            assert client.cmd("EHLO client.example.net")[0] == 250
            assert client.cmd("MAIL FROM:<a@example.net>")[0] == 250
            assert client.cmd("RCPT TO:<postmaster>")[0] == 250
            assert client.cmd("RSET")[0] == 250
            assert client.cmd("QUIT")[0] == 221
            client.close()
        assert send(port) == {}
        wait_until(lambda: upstream.messages, timeout=20,
                   what="Postfix to relay the message")
    finally:
        factory.stop()              # QUITs the pooled sessions
    wait_until(lambda: len(postfix_sessions(postfix))
               == len(postfix.log_lines(" connect from ")),
               what="every Postfix session to end")
    sessions = postfix_sessions(postfix)
    limit = smtpproxy.UpstreamSession.max_undelivered
    assert server.counters["upstream_reused"] > 0
    assert server.counters["upstream_retired"] >= 56 * 2 // (limit + 2)
    for counts in sessions:
        junk = sum(counts.get(name, 0) for name in POSTFIX_JUNK)
        assert junk <= limit + 2, counts
    assert not postfix.log_lines("too many errors")
