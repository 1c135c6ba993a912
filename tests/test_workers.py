"""Several processes on one port (the workers key, issue 16): a master that
binds and watches, workers that serve, each with its share of the limits;
nothing lost when one dies, when the service stops, or when the master is
killed.

Each proxy runs from its command line (``proxy_process``); processes are
found in /proc and polled for, never slept for.
"""

import os
import re
import signal
import smtplib
import socket

import pytest

from conftest import (ProxyProcess, RawClient, free_port, open_transaction,
                      processes_where, read, wait_until)
from test_service import connection_refused, pid_alive, wait_for_log


def children(pid):
    """The live processes whose parent is ``pid``."""
    return processes_where(1, pid, zombies=False)


def workers_of(process, count):
    """Wait until the master ``process`` has ``count`` workers; return
    their pids."""
    return wait_until(lambda: len(children(process.process.pid)) == count
                      and children(process.process.pid),
                      what="%d workers" % count)


def send(port, number):
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
    smtp.sendmail("a@example.net", ["b@example.org"],
                  "Subject: %d\r\n\r\nmessage %d\r\n" % (number, number))
    smtp.quit()


def counters_lines(path):
    return [dict((key, int(value)) for key, value
                 in re.findall(r"(\w+)=(\d+)", line))
            for line in read(path).splitlines() if "counters: " in line]


def test_workers_serve_the_port_and_each_counts_its_own(proxy_process,
                                                        tmp_path, upstream):
    service_log = tmp_path / "service.log"
    process = proxy_process(config="workers = 3\nlog_file = %s\n"
                            % service_log)
    master = process.process.pid
    pids = workers_of(process, 3)
    for pid in pids:
        # Each in its own process group: a ^C on the terminal reaches
        # the master only, which passes it on once.
        assert os.getpgid(pid) != os.getpgid(master)
    assert re.search(r"listening on .*pid %d.*3 workers" % master,
                     read(service_log))
    for number in range(30):
        send(process.port, number)
    assert sorted(message.content.split(b"message ")[1].strip()
                  for message in upstream.messages) == sorted(
        str(number).encode() for number in range(30))
    process.process.send_signal(signal.SIGUSR1)
    wait_until(lambda: len(counters_lines(service_log)) == 3,
               what="three counters lines")
    assert "workers: 3 running (pids %s)" % " ".join(map(str, pids)) \
        in read(service_log)
    lines = counters_lines(service_log)
    assert sorted(line["worker"] for line in lines) == [0, 1, 2]
    # The readiness probe and the 30 sessions, each counted by the worker
    # that served it, once.
    assert sum(line["connections"] for line in lines) == 31
    assert sum(line["messages_accepted"] for line in lines) == 30


@pytest.mark.parametrize("limits, fewest, most", [
    # Two workers, two clients at once in all: one each.
    ("max_connections = 2\nmax_connections_per_ip = 0\n", 1, 2),
    # 3 per client, two workers: 2 each, 4 at most in all.
    ("max_connections = 100\nmax_connections_per_ip = 3\n", 2, 4),
])
def test_the_connection_limits_are_the_whole_services(proxy_process, limits,
                                                      fewest, most):
    process = proxy_process(config="workers = 2\n" + limits)
    workers_of(process, 2)
    clients = [RawClient(process.port) for _ in range(20)]
    codes = [client.greeting[0] for client in clients]
    assert fewest <= codes.count(220) <= most
    assert codes.count(421) == 20 - codes.count(220)
    for client in clients:
        client.close()


def test_max_connections_is_the_services_however_the_workers_get_them(
        proxy_process):
    """One worker stopped (SIGSTOP): the other takes every connection, and
    serves up to the service's max_connections, not half of it."""
    process = proxy_process(config="workers = 2\nmax_connections = 4\n"
                                   "max_connections_per_ip = 0\n")
    stopped = workers_of(process, 2)[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        def batch():
            clients = [RawClient(process.port) for _ in range(5)]
            codes = [client.greeting[0] for client in clients]
            for client in clients:
                client.close()
            return codes == [220] * 4 + [421]
        # Again if the readiness probe's session was not over yet.
        wait_until(batch, what="4 sessions served by one worker, the "
                               "fifth refused")
    finally:
        os.kill(stopped, signal.SIGCONT)


def test_a_worker_that_dies_is_replaced_and_nothing_is_lost(
        proxy_process, tmp_path, upstream):
    service_log = tmp_path / "service.log"
    process = proxy_process(config="workers = 2\nlog_file = %s\n"
                            % service_log)
    first = workers_of(process, 2)
    os.kill(first[0], signal.SIGKILL)
    wait_for_log(service_log, r"worker \d \(pid %d\) was killed by signal "
                 r"9; starting another\n" % first[0])
    second = wait_until(lambda: len(children(process.process.pid)) == 2
                        and first[0] not in children(process.process.pid)
                        and children(process.process.pid),
                        what="a new worker")
    assert first[1] in second
    # A worker that ends again soon after its start is started again
    # later, not at once: a worker that cannot serve must not spin.
    new = [pid for pid in second if pid not in first][0]
    os.kill(new, signal.SIGKILL)
    wait_for_log(service_log, r"worker \d \(pid %d\) was killed by signal "
                 r"9; starting another in 1 s\n" % new)
    workers_of(process, 2)
    for number in range(10):
        send(process.port, number)
    assert len(upstream.messages) == 10


def test_a_worker_that_keeps_ending_quickly_waits_twice_as_long_up_to_60_s():
    """The restart schedule (Master._restart_delay), by the number of quick
    ends in a row: the first may be chance, and is started again at once."""
    import smtpproxy
    assert [smtpproxy.Master._restart_delay(quick) for quick in range(10)] \
        == [0, 0, 1, 2, 4, 8, 16, 32, 60, 60]


def test_sigterm_stops_every_worker_after_their_transactions(
        proxy_process, tmp_path, upstream):
    service_log = tmp_path / "service.log"
    pidfile = tmp_path / "smtpproxy.pid"
    process = proxy_process(config="workers = 2\ngrace_period = 30\n"
                            "log_file = %s\npidfile = %s\n"
                            % (service_log, pidfile))
    pids = workers_of(process, 2)
    assert read(pidfile) == "%d\n" % process.process.pid
    busy = RawClient(process.port)
    open_transaction(busy)
    busy.send("Subject: half\r\n\r\nfirst half\r\n")
    idle = RawClient(process.port)
    assert idle.cmd("EHLO client.example.net")[0] == 250
    process.process.send_signal(signal.SIGTERM)
    # The port closes at once; the idle session hears 421 at once.
    wait_until(lambda: connection_refused(process.port),
               what="the listening socket to close")
    code, text = idle.reply()
    assert code == 421 and text.startswith("4.3.2 ")
    # The open transaction finishes and is delivered.
    busy.send("second half\r\n.\r\n")
    assert busy.reply()[0] == 250
    assert upstream.messages[-1].content.endswith(b"second half\r\n")
    assert process.process.wait(10) == 0
    for pid in pids:
        assert not pid_alive(pid)
    assert not pidfile.exists()
    log = read(service_log)
    assert "signal 15: stopping 2 workers" in log
    # Stopping, the master starts no worker again.
    assert "starting another" not in log
    assert log.rstrip().endswith("stopped")


def test_workers_stop_by_themselves_when_the_master_is_killed(
        proxy_process, tmp_path):
    service_log = tmp_path / "service.log"
    process = proxy_process(config="workers = 2\nlog_file = %s\n"
                            % service_log)
    pids = workers_of(process, 2)
    idle = RawClient(process.port)
    assert idle.cmd("EHLO client.example.net")[0] == 250
    process.process.kill()
    process.process.wait()
    wait_until(lambda: not any(pid_alive(pid) for pid in pids),
               what="the workers to stop")
    code, text = idle.reply()
    assert code == 421 and text.startswith("4.3.2 ")
    assert connection_refused(process.port)
    assert "the master process (pid %d) is gone: stopping" \
        % process.process.pid in read(service_log)


def test_sighup_reaches_every_worker(proxy_process, tmp_path):
    service_log = tmp_path / "service.log"
    process = proxy_process(config="workers = 2\nservername = one.example\n"
                            "log_file = %s\n" % service_log)
    pids = workers_of(process, 2)
    with open(process.config_path, "a") as config:
        config.write("servername = two.example\n")
    process.process.send_signal(signal.SIGHUP)
    # The master and each worker read it again.
    wait_until(lambda: sorted(int(pid) for pid in re.findall(
        r"smtpproxy\[(\d+)\]: INFO reloaded the configuration",
        read(service_log))) == sorted([process.process.pid] + pids),
        what="three reloads")

    def greeting():
        client = RawClient(process.port)
        client.close()
        return client.greeting[1]
    # Every worker has it (twenty sessions land on both).
    assert all(greeting().startswith("two.example ") for _ in range(20))


def test_the_workers_answer_the_policy_service_the_master_removes_it(
        proxy_process, tmp_path):
    path = tmp_path / "policy.sock"
    process = proxy_process(
        config="workers = 2\npolicy_listen = unix:%s\n"
               "greylist_db = %s\nallowed_domains:\n    example.org\n"
               % (path, tmp_path / "greylist.db"),
        handler="smtpproxy.GreyListingPolicy")
    pids = workers_of(process, 2)
    assert path.exists()
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(path))
    sock.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                 b"client_address=192.0.2.7\nclient_name=unknown\n"
                 b"sender=a@example.net\nrecipient=b@example.org\n\n")
    answer = b""
    while not answer.endswith(b"\n\n"):
        data = sock.recv(4096)
        assert data
        answer += data
    assert answer.startswith(b"action=DEFER_IF_PERMIT ")
    sock.close()
    # A worker's stop leaves the socket to the master, which removes it.
    os.kill(pids[0], signal.SIGKILL)
    workers_of(process, 2)
    assert path.exists()
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(10) == 0
    assert not path.exists()


def ask_policy(port):
    """One RCPT request to the policy service on ``port``: the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                     b"client_address=192.0.2.7\nclient_name=unknown\n"
                     b"sender=a@example.net\nrecipient=b@example.org\n\n")
        answer = b""
        while not answer.endswith(b"\n\n"):
            data = sock.recv(4096)
            assert data, "closed without an answer"
            answer += data
        return answer
    finally:
        sock.close()


def test_every_worker_answers_the_policy_service_alone(tmp_path, upstream):
    # smtp_proxy = no with workers = 2: both workers accept on the policy
    # service's listening socket, as they share the SMTP port; each
    # logs the answers it gave under its own pid.
    port = free_port()

    def listening():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    process = ProxyProcess(
        tmp_path, upstream.port, handler=None, ready=listening,
        config="workers = 2\nsmtp_proxy = no\npolicy_listen = 127.0.0.1:%d"
               "\ngreylist_db = %s\nallowed_domains:\n    example.org\n"
               % (port, tmp_path / "greylist.db"))
    try:
        pids = workers_of(process, 2)

        def both_answered():
            assert ask_policy(port).startswith(b"action=DEFER_IF_PERMIT ")
            answered = set(int(pid) for pid in re.findall(
                r"smtpproxy\[(\d+)\]: INFO policy ",
                process.stderr_text()))
            return answered == set(pids)
        wait_until(both_answered, what="an answer from each worker")
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(10) == 0
        assert connection_refused(port)
    finally:
        process.stop()


def test_workers_is_a_positive_number_and_takes_a_restart(proxy_process,
                                                         tmp_path):
    from test_service import run
    result = run(["--check-config", "-o", "workers=0"])
    assert result.returncode == 2
    assert "workers" in result.stderr
    service_log = tmp_path / "service.log"
    process = proxy_process(config="workers = 2\nlog_file = %s\n"
                            % service_log)
    workers_of(process, 2)
    with open(process.config_path, "a") as config:
        config.write("workers = 3\n")
    process.process.send_signal(signal.SIGHUP)
    wait_for_log(service_log, "workers changed, which takes a restart")
    assert len(children(process.process.pid)) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_one_worker_is_a_single_process(proxy_process, workers):
    process = proxy_process(config="workers = %d\n" % workers)
    if workers == 1:
        assert children(process.process.pid) == []
    else:
        assert len(workers_of(process, 2)) == 2


# -- the defaults: workers = auto, glibc's thread caches off ------------------

@pytest.mark.parametrize("cpus, workers", [(1, 2), (2, 3), (3, 4), (7, 8),
                                           (8, 8), (64, 8)])
def test_auto_is_one_more_worker_than_the_cpus_from_2_to_8(monkeypatch, cpus,
                                                           workers):
    import smtpproxy
    monkeypatch.setattr(os, "sched_getaffinity",
                        lambda pid: set(range(cpus)), raising=False)
    assert smtpproxy.worker_count({}) == workers
    assert smtpproxy.worker_count({"workers": "auto"}) == workers
    assert smtpproxy.worker_count({"workers": 1}) == 1
    assert smtpproxy.worker_count({"workers": 12}) == 12


def test_workers_reads_auto_or_a_number():
    from test_service import run
    for text in ("auto", "AUTO", "3"):
        result = run(["--check-config", "-o", "run_as_root=yes",
                      "-o", "workers=%s" % text])
        assert result.returncode == 0, (text, result.stderr)
    for text in ("0", "-1", "automatic", "2.5"):
        result = run(["--check-config", "-o", "workers=%s" % text])
        assert result.returncode == 2 and "workers" in result.stderr, text


def test_the_default_is_a_master_and_auto_workers_that_serve(proxy_process,
                                                            upstream):
    import smtpproxy
    expected = smtpproxy.worker_count({})
    assert expected >= 2
    process = proxy_process()           # no workers key
    pids = workers_of(process, expected)
    for number in range(2 * expected):
        send(process.port, number)
    assert len(upstream.messages) == 2 * expected
    assert sorted(children(process.process.pid)) == sorted(pids)


def _glibc():
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc ")
    except (ValueError, OSError):
        return False


GLIBC = pytest.mark.skipif(not _glibc(), reason="glibc's tunables: this "
                           "system's C library is another")


def environment(pid):
    with open("/proc/%d/environ" % pid, "rb") as environ:
        return dict(item.decode().partition("=")[::2]
                    for item in environ.read().split(b"\0") if item)


@GLIBC
def test_the_service_runs_without_glibc_thread_caches(proxy_process):
    # The command line started itself again (the same pid: exec, not a
    # new process) with the caches off; its workers inherit it.
    import smtpproxy
    process = proxy_process()
    pids = [process.process.pid] + workers_of(process,
                                              smtpproxy.worker_count({}))
    for pid in pids:
        assert environment(pid).get("GLIBC_TUNABLES") == (
            "glibc.malloc.tcache_count=0"), pid


@GLIBC
def test_an_admins_own_thread_cache_setting_is_kept(proxy_process,
                                                    monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=7")
    process = proxy_process(config="workers = 1\n")
    assert environment(process.process.pid)["GLIBC_TUNABLES"] == (
        "glibc.malloc.tcache_count=7")


def test_a_daemon_stopped_as_soon_as_its_start_returned_stops_whole(
        tmp_path, upstream):
    """--daemon with workers: the start returns once the master is ready
    (the workers hold neither the terminal nor the caller's pipe, so the
    start's output ends), and a SIGTERM sent at once, while the workers
    are still starting, stops the master and every worker."""
    from test_service import run
    for attempt in range(5):
        pidfile = tmp_path / ("smtpproxy-%d.pid" % attempt)
        result = run(["--daemon", "--pidfile", str(pidfile),
                      "--listen", "127.0.0.1:%d" % free_port(),
                      "--upstream", "127.0.0.1:%d" % upstream.port,
                      "-o", "run_as_root=yes", "-o", "workers=3",
                      "-o", "greylist_log=%s" % (tmp_path / "grey.log")])
        assert result.returncode == 0, result.stderr
        master = int(read(str(pidfile)).split()[0])
        os.kill(master, signal.SIGTERM)
        wait_until(lambda: not pid_alive(master) and not children(master),
                   what="the master and its workers to stop")
