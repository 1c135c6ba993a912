"""The Prometheus endpoint (metrics_listen, issue 25): the service's totals
across its workers, read with Prometheus' own parser
(prometheus_client.parser); counters that never go back, also when a
worker is killed; who may scrape; bounded requests.

Each service runs from its command line (``proxy_process``); processes are
found in /proc and polled for, never slept for.
"""

import http.client
import os
import re
import signal
import smtplib
import socket
import threading

from prometheus_client.parser import text_string_to_metric_families

import smtpproxy
from conftest import ProxyProcess, RawClient, free_port, read, wait_until
from test_service import wait_for_log
from test_workers import children, counters_lines, send, workers_of


def get(port, path="/metrics", method="GET", source=None):
    """``(status, content type, body)`` of one request."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=10,
        source_address=(source, 0) if source else None)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return (response.status, response.getheader("Content-Type"),
                response.read().decode("utf-8"))
    finally:
        connection.close()


def scrape(port):
    """The samples of the exposition, as Prometheus reads them:
    {(sample name, ((label, value), ...)): value}."""
    status, content_type, body = get(port)
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    return dict(((sample.name, tuple(sorted(sample.labels.items()))),
                 sample.value)
                for family in text_string_to_metric_families(body)
                for sample in family.samples)


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def counting(samples):
    """The samples that may only grow: counters, histograms' parts."""
    return dict((key, number) for key, number in samples.items()
                if key[0].endswith(("_total", "_bucket", "_count", "_sum")))


def metrics_config(port, extra=""):
    return "metrics_listen = 127.0.0.1:%d\n%s" % (port, extra)


def listening_ports(pid):
    """The TCP ports process ``pid`` listens on (Linux: /proc)."""
    inodes = set()
    for name in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, name))
        except OSError:
            continue
        match = re.match(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(match.group(1))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in read(table).splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:       # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_the_endpoint_is_off_by_default_and_listens_where_told(
        proxy_process, tmp_path):
    assert smtpproxy.SERVICE_DEFAULTS["metrics_listen"] == ""
    off = proxy_process(config="workers = 1\n")
    assert listening_ports(off.process.pid) == {off.port}
    off.stop()
    port = free_port()
    on = proxy_process(config="workers = 1\n" + metrics_config(port))
    assert listening_ports(on.process.pid) == {on.port, port}
    assert value(scrape(port), "smtpproxy_connections_total") == 1


def test_the_figures_are_the_whole_services_across_its_workers(
        proxy_process, tmp_path, upstream):
    port = free_port()
    service_log = tmp_path / "service.log"
    process = proxy_process(config="workers = 3\nlog_file = %s\n%s"
                            % (service_log, metrics_config(port)))
    workers_of(process, 3)
    for number in range(30):
        send(process.port, number)
    samples = scrape(port)
    # The readiness probe and the 30 sessions, whichever worker took each.
    assert value(samples, "smtpproxy_connections_total") == 31
    assert value(samples, "smtpproxy_transactions_total",
                 status="ACCEPTED") == 30
    assert value(samples, "smtpproxy_message_replies_total",
                 outcome="accepted") == 30
    assert value(samples, "smtpproxy_rcpt_replies_total",
                 outcome="accepted") == 30
    assert value(samples, "smtpproxy_upstream_connects_total") + value(
        samples, "smtpproxy_upstream_pool_total", result="hit") >= 30
    # ... which is more than any one worker's share (SIGUSR1's lines).
    process.process.send_signal(signal.SIGUSR1)
    wait_until(lambda: len(counters_lines(service_log)) == 3,
               what="three counters lines")
    shares = [line["connections"] for line in counters_lines(service_log)]
    assert sum(shares) == 31 and max(shares) < 31
    # Each process's own gauges, by worker, the master's too.
    for name in ("smtpproxy_process_threads", "smtpproxy_process_open_fds",
                 "smtpproxy_process_resident_memory_bytes"):
        for worker in ("0", "1", "2", "master"):
            assert wait_until(lambda: value(scrape(port), name,
                                            worker=worker) > 0,
                              what="%s of %s" % (name, worker))
    # The last session's end is counted once its worker has seen the
    # client go, which may come after the client's QUIT returned.
    assert wait_until(lambda: value(scrape(port),
                                    "smtpproxy_sessions_open") == 0,
                      what="no session open")


def test_counters_never_go_back_when_workers_are_killed_and_restarted(
        proxy_process, tmp_path, upstream):
    port = free_port()
    service_log = tmp_path / "service.log"
    process = proxy_process(config="workers = 3\nlog_file = %s\n%s"
                            % (service_log, metrics_config(port)))
    pids = workers_of(process, 3)
    for number in range(12):
        send(process.port, number)
    before = counting(scrape(port))
    assert before[("smtpproxy_connections_total", ())] == 13
    # Every worker in turn, the one serving the metrics (0) too.
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        wait_for_log(service_log, r"worker \d \(pid %d\) was killed by "
                     r"signal 9" % pid)
        wait_until(lambda: len(children(process.process.pid)) == 3
                   and pid not in children(process.process.pid),
                   what="a new worker")
    after = counting(wait_until(lambda: _scrape_or_none(port),
                                what="the endpoint again"))
    for key, number in before.items():
        assert after[key] >= number, key
    assert after[("smtpproxy_connections_total", ())] == 13
    for number in range(5):
        send(process.port, number)
    later = scrape(port)
    assert value(later, "smtpproxy_connections_total") == 18
    assert value(later, "smtpproxy_transactions_total",
                 status="ACCEPTED") == 17


def _scrape_or_none(port):
    try:
        return scrape(port)
    except OSError:
        return None


def test_counters_only_grow_across_scrapes_under_traffic(
        proxy_process, tmp_path, upstream):
    port = free_port()
    process = proxy_process(config="workers = 3\n" + metrics_config(port))
    workers_of(process, 3)
    done = threading.Event()
    sent = []

    def traffic():
        while not done.is_set():
            send(process.port, len(sent))
            sent.append(1)
    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        scrapes = []
        while len(scrapes) < 8 or len(sent) < 10:
            scrapes.append(counting(scrape(port)))
            assert len(scrapes) < 1000
    finally:
        done.set()
        sender.join(30)
    for earlier, later in zip(scrapes, scrapes[1:]):
        assert set(earlier) == set(later)
        for key, number in earlier.items():
            assert later[key] >= number, key
    assert scrapes[-1][("smtpproxy_connections_total", ())] > scrapes[0][
        ("smtpproxy_connections_total", ())]


def test_a_client_not_in_metrics_clients_is_closed_unread_and_logged_once(
        proxy_process, tmp_path):
    """... and a reload applies a new metrics_clients."""
    port = free_port()
    service_log = tmp_path / "service.log"
    process = proxy_process(config="workers = 2\nlog_file = %s\n%s" % (
        service_log, metrics_config(port,
                                    "metrics_clients:\n    127.0.0.1/32\n")))
    for _ in range(2):
        # Linux routes all of 127/8 to the loopback interface.
        sock = socket.create_connection(("127.0.0.1", port), 10,
                                        source_address=("127.0.0.2", 0))
        try:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        except OSError:
            pass                    # closed already
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
        sock.close()
    assert get(port)[0] == 200
    wait_for_log(service_log, "metrics: connection from 127.0.0.2 refused: "
                 "not in metrics_clients")
    assert read(service_log).count("connection from 127.0.0.2 refused") == 1
    # A reload applies a new list (the master's line and each worker's).
    with open(process.config_path, "a") as config:
        config.write("metrics_clients:\n    127.0.0.2\n")
    process.process.send_signal(signal.SIGHUP)
    wait_until(lambda: read(service_log).count("reloaded the configuration")
               == 3, what="the reloads")
    assert get(port, source="127.0.0.2")[0] == 200


def test_only_get_metrics_is_answered_and_requests_are_bounded(
        proxy_process, tmp_path):
    port = free_port()
    proxy_process(config="workers = 1\n" + metrics_config(port))
    assert get(port, "/")[0] == 404
    assert get(port, "/other")[0] == 404
    for method in ("POST", "HEAD", "PUT", "BREW"):
        assert get(port, method=method)[0] == 405
    # A head over max_request_size: closed unanswered.
    sock = socket.create_connection(("127.0.0.1", port), 10)
    sock.sendall(b"GET /metrics HTTP/1.0\r\nX-Big: " + b"x"
                 * smtpproxy.MetricsServer.max_request_size + b"\r\n\r\n")
    try:
        assert sock.recv(100) == b""
    except ConnectionResetError:
        pass                        # closed with the rest unread
    sock.close()
    # A silent client holds nothing: others are served meanwhile, and it
    # is closed after request_timeout.
    silent = [socket.create_connection(("127.0.0.1", port), 10)
              for _ in range(smtpproxy.MetricsServer.max_scrapes - 1)]
    assert get(port)[0] == 200
    silent[0].settimeout(smtpproxy.MetricsServer.request_timeout + 5)
    assert silent[0].recv(100) == b""
    for sock in silent:
        sock.close()


GREYLISTING = """\
workers = 2
allowed_senders:
allowed_domains:
    example.org
greylist_db = %(db)s
too_soon = 0
min_defer_time = 1
"""


def test_decisions_by_verdict_and_rule_and_the_delay_of_a_pass(
        proxy_process, tmp_path, upstream):
    port = free_port()
    process = proxy_process(
        config=GREYLISTING % {"db": tmp_path / "grey.db"}
        + metrics_config(port), handler=None)
    client = RawClient(process.port)
    client.cmd("HELO client.example.net")
    client.cmd("MAIL FROM:<a@example.net>")
    assert client.cmd("RCPT TO:<b@example.org>")[0] == 451
    assert client.cmd("RCPT TO:<c@elsewhere.example>")[0] == 550
    client.cmd("QUIT")
    client.close()

    def delivered():
        try:
            smtp = smtplib.SMTP("127.0.0.1", process.port, timeout=10)
            smtp.sendmail("a@example.net", ["b@example.org"], "Subject: 1\r\n"
                          "\r\nmessage\r\n")
            smtp.quit()
            return True
        except smtplib.SMTPRecipientsRefused:
            return False
    wait_until(delivered, what="a pass after min_defer_time")
    samples = scrape(port)
    defers = value(samples, "smtpproxy_decisions_total", verdict="defer",
                   rule="network")
    assert defers >= 1
    assert value(samples, "smtpproxy_decisions_total", verdict="accept",
                 rule="network") == 1
    assert value(samples, "smtpproxy_decisions_total", verdict="refuse",
                 rule="not-local") == 1
    assert value(samples, "smtpproxy_greylist_delay_seconds_count") == 1
    assert value(samples, "smtpproxy_greylist_delay_seconds_sum") >= 1
    assert value(samples, "smtpproxy_greylist_delay_seconds_bucket",
                 le="60.0") == 1
    # Every greylisting decision asked the store, and was timed.
    assert value(samples, "smtpproxy_store_decision_seconds_count") == \
        defers + 1
    assert value(samples, "smtpproxy_transactions_total",
                 status="ACCEPTED") == 1
    assert value(samples, "smtpproxy_transactions_total",
                 status="DEFERRED") == defers
    assert value(samples, "smtpproxy_rcpt_replies_total",
                 outcome="refused") == 1


def test_policy_requests_are_counted_by_action(tmp_path, upstream):
    port, policy = free_port(), free_port()
    # The policy service alone: no SMTP port to probe, nor probes of the
    # upstream to forget.
    process = ProxyProcess(
        tmp_path, upstream.port, handler=None,
        config=GREYLISTING % {"db": tmp_path / "grey.db"}
        + "smtp_proxy = no\npolicy_listen = 127.0.0.1:%d\n%s"
        % (policy, metrics_config(port)), ready=lambda: _scrape_or_none(port))
    try:
        _ask_policy(policy)
        samples = scrape(port)
    finally:
        process.stop()
    assert value(samples, "smtpproxy_policy_requests_total",
                 action="DEFER_IF_PERMIT") == 1
    assert value(samples, "smtpproxy_policy_requests_total",
                 action="DUNNO") == 1
    assert value(samples, "smtpproxy_decisions_total", verdict="defer",
                 rule="network") == 1


def _ask_policy(policy):
    """A RCPT request and a DATA request, on one connection."""
    sock = socket.create_connection(("127.0.0.1", policy), 10)
    request = ("request=smtpd_access_policy\nprotocol_state=%s\n"
               "client_address=192.0.2.7\nsender=a@example.net\n"
               "recipient=b@example.org\n\n")
    answers = b""
    sock.sendall((request % "RCPT" + request % "DATA").encode())
    while answers.count(b"\n\n") < 2:
        data = sock.recv(4096)
        assert data
        answers += data
    sock.close()


def test_open_rule_texts_are_counted_by_kind_and_unknown_ones_as_other():
    assert smtpproxy.rule_kind("network:192.0.2.0/24") == "network"
    assert smtpproxy.rule_kind("dnswl:list.dnswl.org") == "dnswl"
    assert smtpproxy.rule_kind("auto-whitelist network:192.0.2.0/24") == \
        "auto-whitelist"
    assert smtpproxy.rule_kind(
        "max_new_triplets_per_network 192.0.2.0/24") == \
        "max_new_triplets_per_network"
    table = smtpproxy.Metrics()
    for rule in ("greytrap", "made-up:192.0.2.7", "dnswl:list.dnswl.org"):
        table.decision(smtpproxy.Decision("accept" if "dnswl" in rule
                                          else "defer", rule))
    table.decision(smtpproxy.Decision("invented", "network:192.0.2.0/24"))
    table.add("smtpproxy_policy_requests_total", "HOLD")
    samples = dict(((sample.name, tuple(sorted(sample.labels.items()))),
                    sample.value) for family in
                   text_string_to_metric_families(table.exposition())
                   for sample in family.samples)
    decisions = "smtpproxy_decisions_total"
    assert value(samples, decisions, verdict="defer", rule="greytrap") == 1
    assert value(samples, decisions, verdict="defer", rule="other") == 1
    assert value(samples, decisions, verdict="accept", rule="dnswl") == 1
    assert value(samples, decisions, verdict="other", rule="other") == 1
    assert value(samples, "smtpproxy_policy_requests_total",
                 action="other") == 1
    # Every series has its HELP, and the catalogue is fixed: a new worker
    # finds each series where the others put it.
    assert all(family.help for family in smtpproxy.METRIC_FAMILIES)
    assert smtpproxy.Metrics().width == table.width
