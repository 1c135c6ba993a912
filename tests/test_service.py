"""The proxy as a service: connection limits, signals, stop without loss,
reload, logs, pidfile, daemon, privileges (issue 4).

Processes are run from the command line with ``proxy_process`` (conftest,
here as one process: workers = 1) or started here when a test needs its
own options; each is polled until ready, never slept for.
"""

import argparse
import grp
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

from conftest import (HERE, ROOT, RawClient, free_port, greeted,
                      open_transaction, read, wait_until)
from plainproxy import AcceptAll
import smtpproxy

@pytest.fixture
def proxy_process(proxy_process):
    """conftest's, as one process (workers = 1) unless the test's
    configuration names workers: what a serving process does on a signal,
    with its limits and logs.  The master and its workers, which the
    default (workers = auto) starts: tests/test_workers.py."""
    def start(config="", **kwargs):
        if "workers" not in config:
            config += "\nworkers = 1\n"
        return proxy_process(config=config, **kwargs)
    return start


needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="privilege drop needs root")


def connect_from(source, port):
    """A raw client whose connection comes from ``source`` (127.0.0.x)."""
    return RawClient(port, source=source, timeout=10)


def wait_for_log(path, pattern, what=None):
    return wait_until(lambda: re.search(pattern, read(path)),
                      what=what or "%r in %s" % (pattern, path))


def run(args, **kwargs):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT])
    return subprocess.run([sys.executable, os.path.join(ROOT, "smtpproxy.py")]
                          + args, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=30, **kwargs)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    with open("/proc/%d/stat" % pid) as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


# -- connection limits -------------------------------------------------------

def test_max_connections_refuses_with_421_and_recovers(proxy, caplog):
    port = proxy()
    server = proxy.servers[-1]
    server.max_connections = 3
    served = [RawClient(port) for _ in range(3)]
    assert [client.greeting[0] for client in served] == [220] * 3
    threads = threading.active_count()
    flood = [RawClient(port) for _ in range(100)]
    for client in flood:
        assert client.greeting[0] == 421
        assert client.greeting[1].startswith("4.7.0 ")
        assert client.is_closed()
        client.close()
    # No thread was started for the refused clients.
    assert threading.active_count() <= threads
    assert server.counters["connections_refused"] == 100
    # A flood is not a flood of log lines: one a minute at most.
    warnings = [record.getMessage() for record in caplog.records
                if "connection limit reached" in record.getMessage()]
    assert len(warnings) == 1
    assert "refused 1 connection(s), the last from 127.0.0.1" in warnings[0]
    # The served ones are unaffected, and once one leaves, a newcomer is
    # served again.
    assert served[0].cmd("NOOP")[0] == 250
    assert served[1].cmd("QUIT")[0] == 221
    served[1].close()
    wait_until(lambda: len(server.sessions) == 2, what="a session to end")
    newcomer = RawClient(port)
    assert newcomer.greeting[0] == 220
    for client in served[:1] + served[2:] + [newcomer]:
        client.close()


def test_max_connections_per_ip(proxy):
    port = proxy()
    server = proxy.servers[-1]
    server.max_connections_per_ip = 2
    first = [connect_from("127.0.0.1", port) for _ in range(2)]
    assert [client.greeting[0] for client in first] == [220, 220]
    third = connect_from("127.0.0.1", port)
    assert third.greeting[0] == 421 and "4.7.0" in third.greeting[1]
    assert third.is_closed()
    # Another address is counted apart.
    other = connect_from("127.0.0.2", port)
    assert other.greeting[0] == 220
    # Recovery: one of the first address leaves, it may come back.
    first[0].cmd("QUIT")
    first[0].close()
    wait_until(lambda: server.sessions_per_ip.get("127.0.0.1") == 1,
               what="the session to end")
    again = connect_from("127.0.0.1", port)
    assert again.greeting[0] == 220
    for client in (first[1], third, other, again):
        client.close()


def test_max_connections_per_ip_0_is_no_limit(proxy):
    port = proxy()
    server = proxy.servers[-1]
    server.max_connections_per_ip = 0
    clients = [connect_from("127.0.0.1", port) for _ in range(5)]
    assert [client.greeting[0] for client in clients] == [220] * 5
    for client in clients:
        client.close()


def test_refusals_make_no_dns_lookup(proxy, monkeypatch):
    """The thread that accepts connections refuses the ones over the
    limit itself: a DNS lookup there would let a flood stall it."""
    def lookup(*args):
        raise AssertionError("a DNS lookup to refuse a connection")
    monkeypatch.setattr(socket, "getfqdn", lookup)
    port = proxy()
    server = proxy.servers[-1]
    server.max_connections = 1
    held = RawClient(port)
    for _ in range(3):
        refused = RawClient(port)
        assert refused.greeting == (
            421, "4.7.0 mail.example.com Error: too many connections, try "
            "again later")
        refused.close()
    held.close()


def test_a_stopping_server_refuses_newcomers_with_421_4_3_2(proxy):
    port = proxy()
    server = proxy.servers[-1]
    server.stopping = True          # what SIGTERM sets first
    client = RawClient(port)
    code, text = client.greeting
    assert code == 421 and text.startswith("4.3.2 ")
    assert client.is_closed()
    client.close()
    # Refused by the accepting thread: no session was set up for it.
    assert server.counters["connections_refused"] == 1


class SlowSetup(AcceptAll):
    """A handler whose first session is held in the middle of its
    setup(), until ``release`` is set."""

    held = []

    def _start_transaction(self):
        if not self.held:
            self.held.append(self)
            self.entered.set()
            self.release.wait(10)
        AcceptAll._start_transaction(self)


def test_a_stop_meets_a_session_still_being_set_up(upstream):
    """A session accepted just before the stop, whose setup() is not
    done: the stop neither fails on it nor lets it greet; it hears 421."""
    handler = type("Held", (SlowSetup,), {
        "smtp_port": upstream.port, "held": [],
        "entered": threading.Event(), "release": threading.Event()})
    interrupts = []

    class Server(smtpproxy.SMTPProxyServer):
        def _interrupt(self, busy_too):
            interrupts.append(busy_too)
            smtpproxy.SMTPProxyServer._interrupt(self, busy_too)

    server = Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.start()
    client = socket.create_connection(server.server_address, 10)
    assert handler.entered.wait(10)
    server.shutdown()
    thread.join(10)
    outcome = []
    stopper = threading.Thread(
        target=lambda: outcome.append(server.stop(grace_period=0)))
    stopper.start()
    wait_until(lambda: True in interrupts, what="the stop to close sessions")
    handler.release.set()
    stopper.join(15)
    assert outcome == [0]
    reply = client.makefile("rb").readline()
    assert reply.startswith(b"421 4.3.2 ")
    client.close()


def test_connection_limits_from_the_command_line(proxy_process):
    process = proxy_process(args=["--max-connections", "2",
                                  "--max-connections-per-ip", "1"])
    # The fixture's own probe may not have left yet.
    first = wait_until(lambda: greeted(RawClient(process.port)),
                       what="a session to be served")
    second = RawClient(process.port)
    assert second.greeting[0] == 421
    other = connect_from("127.0.0.2", process.port)
    assert other.greeting[0] == 220
    third = connect_from("127.0.0.3", process.port)
    assert third.greeting[0] == 421          # max_connections = 2
    for client in (first, second, other, third):
        client.close()




def test_bad_limit_values_are_refused():
    assert run(["--max-connections", "0", "--check-config"]).returncode == 2
    result = run(["--grace-period", "soon", "--check-config"])
    assert result.returncode == 2
    assert "grace_period" in result.stderr
    result = run(["-o", "no_such_key=1", "--check-config"])
    assert result.returncode == 2


def test_options_and_o_set_keys_over_the_file(tmp_path):
    config = tmp_path / "c.conf"
    config.write_text("max_connections = 7\nservername = file.example\n")
    result = run(["--config", str(config), "--max-connections", "9",
                  "--pidfile", "/run/x.pid", "--syslog", "mail",
                  "-o", "servername=option.example",
                  "-o", "allowed_domains=a.example, b.example",
                  # What --check-config checks besides: root may serve,
                  # syslog over UDP (no socket to find).
                  "-o", "run_as_root=yes",
                  "-o", "syslog_socket=127.0.0.1:514",
                  "--check-config"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "max_connections = 9\n" in out
    assert "pidfile = /run/x.pid\n" in out
    assert "syslog = mail\n" in out
    assert "servername = option.example\n" in out
    assert "allowed_domains:\n    a.example\n    b.example\n" in out


# -- stopping ----------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_closes_idle_sessions_at_once_and_exits(proxy_process,
                                                         tmp_path, signum):
    process = proxy_process(config="grace_period = 60\nlog_file = %s\n"
                            % (tmp_path / "service.log"))
    idle = RawClient(process.port)
    assert idle.cmd("EHLO client.example.net")[0] == 250
    process.process.send_signal(signum)
    # No transaction open: 421 4.3.2 at once, not after the grace period.
    code, text = idle.reply()
    assert code == 421 and text.startswith("4.3.2 ")
    assert idle.is_closed()
    assert process.process.wait(10) == 0
    with pytest.raises(OSError):
        RawClient(process.port)
    assert "stopped" in read(tmp_path / "service.log")


def test_sigterm_lets_a_transaction_finish_within_the_grace_period(
        proxy_process, upstream):
    process = proxy_process(config="grace_period = 30\n")
    client = RawClient(process.port)
    open_transaction(client)
    client.send("Subject: half\r\n\r\nfirst half\r\n")
    process.process.send_signal(signal.SIGTERM)
    # The port closes: no new client...
    wait_until(lambda: connection_refused(process.port),
               what="the listening socket to close")
    # ... but this one may finish its message, and hears the upstream.
    client.send("second half\r\n.\r\n")
    assert client.reply()[0] == 250
    assert len(upstream.messages) == 1
    assert upstream.messages[0].content.endswith(b"second half\r\n")
    # No new transaction: 421 4.3.2, then the process is gone.
    code, text = client.cmd("MAIL FROM:<again@example.net>")
    assert code == 421 and "4.3.2" in text
    assert process.process.wait(10) == 0


def connection_refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_mid_data_past_the_grace_period_delivers_nothing(
        proxy_process, upstream):
    process = proxy_process(config="grace_period = 1\n")
    client = RawClient(process.port)
    open_transaction(client)
    client.send("Subject: never finished\r\n\r\nsome of the text\r\n")
    wait_until(lambda: upstream.open_connections == 1,
               what="the upstream session")
    process.process.send_signal(signal.SIGTERM)
    code, text = client.reply()
    assert code == 421 and text.startswith("4.3.2 ")
    assert client.is_closed()
    assert process.process.wait(10) == 0
    # The upstream session was closed without the final dot.
    wait_until(lambda: upstream.open_connections == 0,
               what="the upstream session to close")
    assert upstream.messages == []


@pytest.mark.parametrize("cut", [0, 1000, 60000, 200000, 299990])
def test_sigterm_during_a_transfer_delivers_and_acknowledges_or_neither(
        proxy_process, upstream, cut):
    """Whatever point of the message the signal meets, the client hears
    2xx if and only if the upstream has the whole message."""
    process = proxy_process(config="grace_period = 0\n")
    client = RawClient(process.port)
    open_transaction(client)
    body = b"".join(b"line %06d of the message text\r\n" % number
                    for number in range(10000))
    data = b"Subject: cut\r\n\r\n" + body + b".\r\n"
    client.send(data[:cut])
    process.process.send_signal(signal.SIGTERM)
    try:
        client.send(data[cut:])
        code, _ = client.reply()
    except OSError:
        code = None
    assert process.process.wait(10) == 0
    wait_until(lambda: upstream.open_connections == 0,
               what="the upstream session to close")
    if code == 250:
        assert len(upstream.messages) == 1
        assert upstream.messages[0].content == data[:-3]
    else:
        assert code in (421, None)
        assert upstream.messages == []


def test_a_second_sigterm_ends_the_grace_period(proxy_process, upstream):
    process = proxy_process(config="grace_period = 600\n")
    client = RawClient(process.port)
    open_transaction(client)
    process.process.send_signal(signal.SIGTERM)
    wait_until(lambda: connection_refused(process.port),
               what="the listening socket to close")
    process.process.send_signal(signal.SIGTERM)
    code, text = client.reply()
    assert code == 421 and "4.3.2" in text
    assert process.process.wait(10) == 0
    assert upstream.messages == []


def test_a_second_sigterm_before_the_first_is_acted_on_ends_the_grace():
    """Signals are acted on in the main loop, a quarter of a second later
    at most: a second one that comes meanwhile counts all the same.  (Two
    sent at the very same moment are one to the kernel.)"""
    service = smtpproxy.Service(argparse.Namespace(config=None),
                                smtpproxy.ConcreteMailHandler, {}, None, [])
    service.server = smtpproxy.SMTPProxyServer(
        ("127.0.0.1", 0), smtpproxy.ConcreteMailHandler)
    try:
        service.on_signal(signal.SIGTERM, None)
        assert not service.server.stop_now
        service.on_signal(signal.SIGINT, None)
        assert service.server.stop_now
    finally:
        service.server.server_close()


def test_every_signal_has_both_roles_and_a_stop_is_passed_on_as_sigterm():
    """The signal table (_SIGNALS): what a serving process does, what the
    master does, and what the master passes on to its workers."""
    table = smtpproxy._SIGNALS
    assert set(table) == {signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                          signal.SIGUSR1, signal.SIGUSR2}
    for signum, roles in table.items():
        assert callable(getattr(smtpproxy.Service, roles.serving))
        assert callable(getattr(smtpproxy.Worker, roles.serving))
        assert callable(getattr(smtpproxy.Master, roles.master))
        stop = signum in (signal.SIGTERM, signal.SIGINT)
        assert roles.passed_on == (signal.SIGTERM if stop else signum)


def test_the_service_acts_on_signals_in_the_servers_own_service_actions(
        caplog):
    """The service is one of the server's service_hooks: the server's
    service_actions() does its own work, then the service acts on the
    signals it noted; no method is replaced on the server."""
    service = smtpproxy.Service(
        argparse.Namespace(config=None),
        smtpproxy.ConcreteMailHandler, {}, None, [])
    service.server = smtpproxy.SMTPProxyServer(
        ("127.0.0.1", 0), smtpproxy.ConcreteMailHandler)
    try:
        service._start_serving()
        service.on_signal(signal.SIGUSR1, None)
        with caplog.at_level("INFO", logger="smtpproxy"):
            service.server.service_actions()
        assert "counters: sessions_open=0" in caplog.text
        assert service.pending == []
        assert "service_actions" not in vars(service.server)
    finally:
        service.server.server_close()


# -- reload and counters -----------------------------------------------------

GREYLIST_CONFIG = """\
allowed_senders:
allowed_domains:
    old.example
greylist_db = %(db)s
log_file = %(log)s
"""


def test_sighup_picks_up_new_allowed_domains_without_dropping_sessions(
        proxy_process, tmp_path, upstream):
    values = {"db": tmp_path / "grey.db", "log": tmp_path / "service.log"}
    process = proxy_process(config=GREYLIST_CONFIG % values, handler=None)
    staying = RawClient(process.port)
    assert staying.cmd("HELO client.example.net")[0] == 250
    assert staying.cmd("MAIL FROM:<a@example.net>")[0] == 250
    # new.example is not ours yet: relaying denied.
    assert staying.cmd("RCPT TO:<x@new.example>")[0] == 550
    with open(process.config_path) as config_file:
        text = config_file.read()
    with open(process.config_path, "w") as config_file:
        config_file.write(text.replace("    old.example\n",
                                       "    old.example\n    new.example\n"))
    process.process.send_signal(signal.SIGHUP)
    wait_for_log(values["log"], "reloaded the configuration")
    # The connected session goes on, with the configuration it began with.
    assert staying.cmd("RCPT TO:<x@old.example>")[0] == 451   # greylisted
    assert staying.cmd("RCPT TO:<x@new.example>")[0] == 550
    assert staying.cmd("QUIT")[0] == 221
    # A new session has the new list: greylisted, no longer refused.
    newcomer = RawClient(process.port)
    newcomer.cmd("HELO client.example.net")
    newcomer.cmd("MAIL FROM:<a@example.net>")
    assert newcomer.cmd("RCPT TO:<x@new.example>")[0] == 451
    newcomer.close()
    assert process.process.poll() is None


def test_sighup_with_a_broken_config_keeps_the_old_one(proxy_process,
                                                        tmp_path):
    values = {"db": tmp_path / "grey.db", "log": tmp_path / "service.log"}
    process = proxy_process(config=GREYLIST_CONFIG % values, handler=None)
    with open(process.config_path, "a") as config_file:
        config_file.write("max_connections = many\n")
    # logrotate moved the logs away before it sent the signal.
    for name in ("service.log", "greylist.log"):
        open(str(tmp_path / name), "a").close()
        os.rename(str(tmp_path / name), str(tmp_path / (name + ".1")))
    process.process.send_signal(signal.SIGHUP)
    # Reopened all the same, and the error is in the new log.
    found = wait_for_log(values["log"], r"reload failed.*max_connections.*")
    assert process.config_path in found.group(0)
    client = RawClient(process.port)
    client.cmd("HELO client.example.net")
    client.cmd("MAIL FROM:<a@example.net>")
    assert client.cmd("RCPT TO:<x@old.example>")[0] == 451
    client.cmd("QUIT")
    client.close()
    wait_for_log(tmp_path / "greylist.log", "<x@old.example> | DEFERRED")


def test_sighup_with_an_unusable_certificate_keeps_the_old_one(
        proxy_process, tmp_path, certificates):
    service_log = tmp_path / "service.log"
    process = proxy_process(config="log_file = %s\ntls_cert = %s\n"
                            "tls_key = %s\n" % (service_log,
                                                 certificates.cert,
                                                 certificates.key))
    with open(process.config_path, "a") as config_file:
        # Not the certificate's key: the pair cannot be used.
        config_file.write("tls_key = %s\n" % certificates.path("ca.key"))
    process.process.send_signal(signal.SIGHUP)
    wait_for_log(service_log, r"reload failed.*tls_cert %s"
                 % re.escape(certificates.cert))
    # New sessions keep the pair in force: STARTTLS is still offered.
    client = RawClient(process.port)
    code, text = client.cmd("EHLO client.example.net")
    assert code == 250 and "\nSTARTTLS" in text
    client.close()
    assert "reloaded" not in read(service_log)


def test_sighup_reopens_log_files_for_logrotate(proxy_process, tmp_path,
                                                 upstream):
    service_log = tmp_path / "service.log"
    process = proxy_process(config="log_file = %s\n" % service_log)
    transactions = tmp_path / "greylist.log"
    smtp = smtplib.SMTP("127.0.0.1", process.port)
    smtp.sendmail("a@example.net", ["b@example.org"], "Subject: 1\r\n\r\n1")
    wait_for_log(transactions, "<a@example.net>")
    os.rename(str(transactions), str(tmp_path / "greylist.log.1"))
    os.rename(str(service_log), str(tmp_path / "service.log.1"))
    process.process.send_signal(signal.SIGHUP)
    wait_for_log(service_log, "reloaded")
    smtp.sendmail("c@example.net", ["d@example.org"], "Subject: 2\r\n\r\n2")
    smtp.quit()
    wait_for_log(transactions, "<c@example.net>")
    assert "<c@example.net>" not in read(tmp_path / "greylist.log.1")


def test_a_log_that_cannot_be_reopened_does_not_stop_a_reload(
        proxy_process, tmp_path, upstream):
    service_log = tmp_path / "service.log"
    process = proxy_process(config="log_file = %s\n" % service_log)
    with open(process.config_path, "a") as config_file:
        config_file.write("servername = two.example\n"
                          "greylist_log = %s\n" % (tmp_path / "no" / "x"))
    process.process.send_signal(signal.SIGHUP)
    wait_for_log(service_log, "cannot reopen a log, keeping the one open: "
                 ".*%s" % re.escape(str(tmp_path / "no" / "x")))
    wait_for_log(service_log, "reloaded")
    client = RawClient(process.port)
    assert client.greeting[1].startswith("two.example ")
    client.close()
    # The transaction log in place stays in use.
    smtp = smtplib.SMTP("127.0.0.1", process.port)
    smtp.sendmail("a@example.net", ["b@example.org"], "Subject: 1\r\n\r\n1")
    smtp.quit()
    wait_for_log(tmp_path / "greylist.log", "<a@example.net>")


def test_sighup_applies_new_limits(proxy_process, tmp_path):
    service_log = tmp_path / "service.log"
    process = proxy_process(config="log_file = %s\n" % service_log)
    held = [RawClient(process.port) for _ in range(2)]
    assert [client.greeting[0] for client in held] == [220, 220]
    with open(process.config_path, "a") as config_file:
        config_file.write("max_connections = 2\n")
    process.process.send_signal(signal.SIGHUP)
    wait_for_log(service_log, "reloaded")
    refused = RawClient(process.port)
    assert refused.greeting[0] == 421 and "4.7.0" in refused.greeting[1]
    for client in held + [refused]:
        client.close()


def test_sighup_applies_new_greylisting_timings(proxy_process, tmp_path):
    values = {"db": tmp_path / "grey.db", "log": tmp_path / "service.log"}
    process = proxy_process(config=GREYLIST_CONFIG % values, handler=None)

    def rcpt():
        client = RawClient(process.port)
        client.cmd("HELO client.example.net")
        client.cmd("MAIL FROM:<a@example.net>")
        code = client.cmd("RCPT TO:<x@old.example>")[0]
        client.close()
        return code
    assert rcpt() == 451
    assert rcpt() == 451            # too soon: 180 seconds at least
    with open(process.config_path, "a") as config_file:
        config_file.write("too_soon = 0\nmin_defer_time = 0\n")
    process.process.send_signal(signal.SIGHUP)
    wait_for_log(values["log"], "reloaded")
    assert rcpt() == 250


def test_sighup_says_which_keys_take_a_restart(proxy_process, tmp_path):
    service_log = tmp_path / "service.log"
    process = proxy_process(config="log_file = %s\n" % service_log)
    with open(process.config_path, "a") as config_file:
        config_file.write("pidfile = %s\nservername = two.example\n"
                          % (tmp_path / "new.pid"))
    process.process.send_signal(signal.SIGHUP)
    wait_for_log(service_log, "reloaded")
    assert "reload: pidfile changed, which takes a restart" in read(
        service_log)
    assert not (tmp_path / "new.pid").exists()
    # The rest of the file is in force.
    client = RawClient(process.port)
    assert client.greeting[1].startswith("two.example ")
    client.close()


def test_sigusr1_logs_the_counters(proxy_process, tmp_path, upstream):
    service_log = tmp_path / "service.log"
    process = proxy_process(config="log_file = %s\n" % service_log)
    upstream.handler.reject["refused@example.org"] = "550 5.1.1 No such user"
    smtp = smtplib.SMTP("127.0.0.1", process.port)
    smtp.sendmail("a@example.net", ["b@example.org", "refused@example.org"],
                  "Subject: 1\r\n\r\n1")
    smtp.quit()
    process.process.send_signal(signal.SIGUSR1)
    line = wait_for_log(service_log, "counters: .*").group(0)
    counters = dict((key, int(value))
                    for key, value in re.findall(r"(\w+)=(\d+)", line))
    assert counters["messages_accepted"] == 1
    assert counters["rcpt_accepted"] == 1
    assert counters["rcpt_refused"] == 1
    assert counters["upstream_errors"] == 0
    # The fixture's readiness probe and ours.
    assert counters["connections"] == 2


def test_upstream_errors_and_deferrals_are_counted(proxy):
    port = proxy(upstream_timeout=1)
    server = proxy.servers[-1]
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    client.cmd("MAIL FROM:<a@example.net>")
    server.RequestHandlerClass.smtp_port = free_port()     # upstream gone
    assert client.cmd("RCPT TO:<b@example.org>")[0] == 451
    client.close()
    wait_until(lambda: server.counters["upstream_errors"] == 1,
               what="the count")
    assert server.counters["rcpt_deferred"] == 1


# -- syslog ------------------------------------------------------------------

def test_syslog_facility_mail(proxy_process, tmp_path, upstream):
    path = str(tmp_path / "log")
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(path)
    syslog.settimeout(10)
    try:
        process = proxy_process(config="syslog = mail\nsyslog_socket = %s\n"
                                % path)
        pid = process.process.pid
        datagrams = []

        def received(pattern):
            while not any(re.search(pattern, d) for d in datagrams):
                datagrams.append(syslog.recv(65536).decode())
            return [d for d in datagrams if re.search(pattern, d)][0]
        # LOG_MAIL (2) * 8 + LOG_INFO (6) = 22
        assert received("listening").startswith(
            "<22>smtpproxy[%d]: smtpproxy %s listening"
            % (pid, smtpproxy.__version__))
        smtp = smtplib.SMTP("127.0.0.1", process.port)
        smtp.sendmail("a@example.net", ["b@example.org"],
                      "Subject: s\r\n\r\n")
        smtp.quit()
        line = received("<a@example.net>")
        assert line.startswith("<22>smtpproxy[%d]: " % pid)
        assert "| <b@example.org> |" in line
    finally:
        syslog.close()


def test_syslog_that_cannot_be_reached_stops_the_start(tmp_path):
    result = run(["--listen", "127.0.0.1:%d" % free_port(), "-o",
                  "run_as_root=yes", "--syslog", "mail", "-o",
                  "syslog_socket=%s" % (tmp_path / "none"),
                  "--class", "smtpproxy.ConcreteMailHandler",
                  "-o", "greylist_log="], cwd=str(tmp_path))
    assert result.returncode == 2
    assert "cannot open log: syslog socket %s: " % (tmp_path / "none") \
        in result.stderr


# -- pidfile and daemon --------------------------------------------------------

def start_daemon(tmp_path, *extra, **kwargs):
    port = free_port()
    args = ["--daemon", "--listen", "127.0.0.1:%d" % port,
            "--class", "smtpproxy.ConcreteMailHandler",
            "-o", "greylist_log=greylist.log",
            "-o", "log_file=service.log"] + list(extra)
    if os.geteuid() == 0 and not kwargs.get("as_user"):
        args += ["-o", "run_as_root=yes"]
    result = run(args, cwd=str(tmp_path),
                 preexec_fn=kwargs.get("preexec_fn"))
    return result, port


class Daemon(object):
    """Kill what a test started, even when the test fails."""

    def __init__(self):
        self.pids = []

    def read_pid(self, pidfile):
        # The first line only: one with more in it is still killed.
        pid = int(read(pidfile).split()[0])
        self.pids.append(pid)
        return pid

    def kill(self):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def daemons():
    daemons = Daemon()
    yield daemons
    daemons.kill()


def test_daemon_detaches_and_writes_its_pidfile(tmp_path, daemons):
    pidfile = tmp_path / "smtpproxy.pid"
    # Started from a shell with a strict umask: the daemon sets its own.
    result, port = start_daemon(tmp_path, "--pidfile", "smtpproxy.pid",
                                preexec_fn=lambda: os.umask(0o077))
    assert result.returncode == 0, result.stderr
    pid = daemons.read_pid(pidfile)
    assert read(pidfile) == "%d\n" % pid
    assert pid_alive(pid)
    # Detached: a session of its own, which it does not lead (no terminal
    # can become its own), in /, standard streams on /dev/null.
    assert os.getsid(pid) != os.getsid(0)
    assert os.getsid(pid) != pid
    assert os.readlink("/proc/%d/cwd" % pid) == "/"
    for stream in (0, 1, 2):
        assert os.readlink("/proc/%d/fd/%d" % (pid, stream)) == "/dev/null"
    with open("/proc/%d/status" % pid) as status:
        assert "Umask:\t0022" in status.read()
    client = RawClient(port)
    assert client.greeting[0] == 220
    client.close()
    # Relative file names were read against the directory it started in.
    wait_for_log(tmp_path / "service.log", "listening")
    # A second start fails and says why; the first runs on.
    second, _ = start_daemon(tmp_path, "--pidfile", "smtpproxy.pid")
    assert second.returncode == 1
    assert "already running (pid %d, %s)" % (pid, pidfile) in second.stderr
    assert pid_alive(pid) and read(pidfile) == "%d\n" % pid
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), what="the daemon to stop")
    assert not pidfile.exists()


def test_a_stale_pidfile_is_replaced(tmp_path, daemons):
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile = tmp_path / "smtpproxy.pid"
    # Longer than any pid: the new one replaces it, nothing is left of it.
    pidfile.write_text("%d\n%s\n" % (dead.pid, "9" * 30))
    result, _ = start_daemon(tmp_path, "--pidfile", str(pidfile))
    assert result.returncode == 0, result.stderr
    pid = daemons.read_pid(pidfile)
    assert pid != dead.pid and pid_alive(pid)
    assert read(pidfile) == "%d\n" % pid
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), what="the daemon to stop")


def test_a_daemon_that_cannot_start_says_why_and_fails(tmp_path, daemons):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        result = run(["--daemon", "--listen", "127.0.0.1:%d" % port,
                      "--pidfile", "p.pid", "-o", "greylist_log=",
                      "-o", "run_as_root=yes",
                      "--class", "smtpproxy.ConcreteMailHandler"],
                     cwd=str(tmp_path))
    finally:
        taken.close()
    assert result.returncode == 1
    assert "cannot listen on [127.0.0.1]:%d" % port in result.stderr
    # The pidfile it took is not left behind.
    assert not (tmp_path / "p.pid").exists()


# -- privileges ----------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="only root is refused")
def test_serving_as_root_is_refused_unless_configured(tmp_path):
    result = run(["--listen", "127.0.0.1:%d" % free_port(),
                  "-o", "greylist_log="], cwd=str(tmp_path))
    assert result.returncode == 2
    assert "refusing to serve as root" in result.stderr


def test_user_root_is_refused_unless_configured(tmp_path):
    result = run(["--listen", "127.0.0.1:%d" % free_port(), "--user",
                  "root", "-o", "greylist_log="], cwd=str(tmp_path))
    assert result.returncode == 2
    assert "user root is root: set run_as_root = yes" in result.stderr


def test_an_unknown_user_is_refused(tmp_path):
    result = run(["--listen", "127.0.0.1:%d" % free_port(), "--user",
                  "no-such-user-here", "-o", "greylist_log="],
                 cwd=str(tmp_path))
    assert result.returncode == 2
    assert "unknown user" in result.stderr


@pytest.fixture
def nobody_dir():
    """A directory outside root's private /tmp/pytest-of-root, owned by
    nobody, for the files of a proxy that serves as nobody."""
    path = tempfile.mkdtemp(prefix="smtpproxy-priv-")
    os.chmod(path, 0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def root_dir():
    """A directory only root can write, for a pidfile (not pytest's
    tmp_path: a test may need nobody to reach it)."""
    path = tempfile.mkdtemp(prefix="smtpproxy-root-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
@pytest.mark.parametrize("group", [None, "daemon"])
def test_privileges_are_dropped_after_binding(nobody_dir, root_dir, upstream,
                                              daemons, group):
    nobody = pwd.getpwnam("nobody")
    config = os.path.join(nobody_dir, "smtpproxy.conf")
    with open(config, "w") as config_file:
        config_file.write("allowed_senders:\nallowed_domains:\n"
                          "    example.org\nuser = nobody\n"
                          "greylist_db = %s/grey.db\n" % nobody_dir)
        if group:
            config_file.write("group = %s\n" % group)
    port = free_port()
    # The pidfile is written as root, before the switch, in root's
    # directory (tests/test_root_files.py: what root makes, where).
    pidfile = os.path.join(root_dir, "run.pid")
    result = run(["--daemon", "--config", config,
                  "--listen", "127.0.0.1:%d" % port,
                  "--upstream", "127.0.0.1:%d" % upstream.port,
                  "--pidfile", pidfile, "-o", "log_file=service.log"],
                 cwd=nobody_dir)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    pid = daemons.read_pid(pidfile)
    assert os.stat(pidfile).st_uid == 0
    with open("/proc/%d/status" % pid) as status_file:
        status = status_file.read()
    uid = "%d" % nobody.pw_uid
    gid = "%d" % (grp.getgrnam(group).gr_gid if group else nobody.pw_gid)
    assert re.search(r"Uid:\t%s\t%s\t%s\t%s\n" % ((uid,) * 4), status)
    assert re.search(r"Gid:\t%s\t%s\t%s\t%s\n" % ((gid,) * 4), status)
    groups = re.search(r"Groups:\t?(.*)\n", status).group(1).split()
    assert "0" not in groups
    # The user's own supplementary groups (initgroups), not root's.
    assert sorted(set(int(group) for group in groups)) == sorted(
        set(os.getgrouplist("nobody", int(gid))))
    # The logs and the store were created for nobody, and work.
    client = RawClient(port)
    client.cmd("HELO client.example.net")
    client.cmd("MAIL FROM:<a@example.net>")
    assert client.cmd("RCPT TO:<b@example.org>")[0] == 451   # greylisted
    client.cmd("QUIT")
    client.close()
    for name in ("greylist.log", "service.log", "grey.db", "grey.db-wal"):
        path = os.path.join(nobody_dir, name)
        assert os.stat(path).st_uid == nobody.pw_uid, name
        assert os.stat(path).st_gid == int(gid), name
    wait_for_log(os.path.join(nobody_dir, "greylist.log"), "DEFERRED")
    # It can reopen its logs after a rotation, as nobody.
    os.rename(os.path.join(nobody_dir, "service.log"),
              os.path.join(nobody_dir, "service.log.1"))
    os.kill(pid, signal.SIGHUP)
    wait_for_log(os.path.join(nobody_dir, "service.log"), "reloaded")
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), what="the daemon to stop")


@needs_root
def test_a_config_the_user_cannot_read_again_is_warned_about(
        nobody_dir, root_dir, daemons):
    config = os.path.join(nobody_dir, "smtpproxy.conf")
    with open(config, "w") as config_file:
        config_file.write("user = nobody\ngreylist_db = %s/grey.db\n"
                          "greylist_log =\n" % nobody_dir)
    os.chmod(config, 0o600)             # root's
    pidfile = os.path.join(root_dir, "p.pid")
    result = run(["--daemon", "--config", config, "--pidfile", pidfile,
                  "--listen", "127.0.0.1:%d" % free_port(),
                  "-o", "log_file=%s/service.log" % nobody_dir],
                 cwd=nobody_dir)
    assert result.returncode == 0, result.stderr
    pid = daemons.read_pid(pidfile)
    assert ("warning: %s is not readable by nobody: SIGHUP will not "
            "reload it" % config) in result.stderr
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), what="the daemon to stop")


@needs_root
@pytest.mark.parametrize("detach", [[], ["--daemon"]])
def test_a_store_the_user_cannot_write_stops_the_start(tmp_path, detach):
    # tmp_path is root's: nobody cannot create the store's journal there.
    result = run(["--listen", "127.0.0.1:%d" % free_port(),
                  "--user", "nobody", "-o", "greylist_log=",
                  "--pidfile", str(tmp_path / "p.pid"),
                  "-o", "greylist_db=%s" % (tmp_path / "grey.db")] + detach,
                 cwd=str(tmp_path))
    assert result.returncode == 1
    assert "greylisting store %s" % (tmp_path / "grey.db") in result.stderr
    # It failed while it could still remove its pidfile.
    assert not (tmp_path / "p.pid").exists()


@needs_root      # it writes a file in /
def test_relative_names_read_from_the_root_directory_are_warned_about(
        tmp_path, daemons):
    port = free_port()
    # Its own name: the suites of two interpreters may run at once.
    relative = "relative-%d.log" % os.getpid()
    result = run(["--daemon", "--listen", "127.0.0.1:%d" % port,
                  "--pidfile", str(tmp_path / "p.pid"),
                  "-o", "greylist_log=", "-o", "run_as_root=yes",
                  "--class", "smtpproxy.ConcreteMailHandler",
                  "-o", "log_file=%s" % (tmp_path / "service.log")],
                 cwd="/")
    assert result.returncode == 0, result.stderr
    pid = daemons.read_pid(tmp_path / "p.pid")
    try:
        assert result.stderr == ""
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), what="the daemon to stop")
    result = run(["--daemon", "--listen", "127.0.0.1:%d" % port,
                  "--pidfile", str(tmp_path / "p.pid"),
                  "-o", "greylist_log=", "-o", "run_as_root=yes",
                  "--class", "smtpproxy.ConcreteMailHandler",
                  "-o", "log_file=%s" % relative], cwd="/")
    assert result.returncode == 0, result.stderr
    pid = daemons.read_pid(tmp_path / "p.pid")
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), what="the daemon to stop")
    assert ("warning: log_file is a relative name, read from /: "
            "/%s" % relative) in result.stderr
    os.unlink("/" + relative)
