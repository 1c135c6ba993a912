"""GreylistStore: Kamaelia Grey's timing table, row by row at its
boundaries, with time given (no sleeping), and the store shared by threads
and by another process."""

import subprocess
import sys
import threading

import pytest

import smtpproxy
from conftest import ROOT

T0 = 1000000000.0
TOO_SOON, MIN_DEFER, MAX_DEFER, MAX_GREY = 180, 3600, 25000, 3000000


@pytest.fixture
def store(tmp_path):
    store = smtpproxy.GreylistStore(str(tmp_path / "greylist.db"))
    yield store
    store.close()


def rows(store):
    return store._connection().execute(
        "SELECT key, first_seen, passed, passes FROM triplets"
        " ORDER BY key").fetchall()


def test_defaults_are_the_lineage_timings():
    assert (smtpproxy.GreylistStore.too_soon,
            smtpproxy.GreylistStore.min_defer_time,
            smtpproxy.GreylistStore.max_defer_time,
            smtpproxy.GreylistStore.max_grey) == (TOO_SOON, MIN_DEFER,
                                                  MAX_DEFER, MAX_GREY)


def test_never_seen_is_deferred_and_seen_now(store):
    assert store.decide("k", T0) is False
    assert rows(store) == [("k", T0, None, 0)]


@pytest.mark.parametrize("retry", [1, TOO_SOON - 0.001])
def test_retry_too_soon_is_deferred_and_restarts_the_clock(store, retry):
    store.decide("k", T0)
    assert store.decide("k", T0 + retry) is False
    assert rows(store) == [("k", T0 + retry, None, 0)]


@pytest.mark.parametrize("retry", [TOO_SOON, MIN_DEFER - 0.001])
def test_retry_before_min_defer_is_deferred_without_change(store, retry):
    store.decide("k", T0)
    assert store.decide("k", T0 + retry) is False
    assert rows(store) == [("k", T0, None, 0)]


@pytest.mark.parametrize("retry", [MIN_DEFER, MAX_DEFER])
def test_retry_inside_the_window_is_accepted_and_passed(store, retry):
    store.decide("k", T0)
    assert store.decide("k", T0 + retry) is True
    assert rows(store) == [("k", T0, T0 + retry, 1)]


def test_retry_after_max_defer_is_deferred_and_restarts_the_clock(store):
    store.decide("k", T0)
    late = T0 + MAX_DEFER + 0.001
    assert store.decide("k", late) is False
    assert rows(store) == [("k", late, None, 0)]
    # ... and the new window counts from the late try.
    assert store.decide("k", late + MIN_DEFER) is True


@pytest.mark.parametrize("later", [1, MAX_GREY - 0.001])
def test_passed_is_accepted_and_pass_renewed(store, later):
    store.decide("k", T0)
    store.decide("k", T0 + MIN_DEFER)
    passed = T0 + MIN_DEFER + later
    assert store.decide("k", passed) is True
    assert rows(store) == [("k", T0, passed, 2)]


@pytest.mark.parametrize("later", [MAX_GREY, MAX_GREY + 1])
def test_passed_long_ago_is_forgotten_and_deferred(store, later):
    store.decide("k", T0)
    store.decide("k", T0 + MIN_DEFER)
    again = T0 + MIN_DEFER + later
    assert store.decide("k", again) is False
    assert rows(store) == [("k", again, None, 0)]


def test_timings_are_attributes(tmp_path):
    class Quick(smtpproxy.GreylistStore):
        too_soon, min_defer_time, max_defer_time = 1, 2, 3
    store = Quick(str(tmp_path / "quick.db"))
    store.decide("k", T0)
    assert store.decide("k", T0 + 2) is True
    store.close()


def test_fifty_threads_decide_as_a_serial_run_would(tmp_path):
    path = str(tmp_path / "shared.db")
    store = smtpproxy.GreylistStore(path)
    results = {}
    errors = []

    def session(number):
        key = "k%d" % (number % 5)          # 10 sessions per triplet
        try:
            results[number] = store.decide(key, T0)
        except Exception as error:          # "database is locked", ...
            errors.append(error)

    threads = [threading.Thread(target=session, args=(n,))
               for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(results) == list(range(50))
    assert not any(results.values())        # first tries: all deferred
    assert len(rows(store)) == 5
    store.close()


def test_another_process_sees_the_passes(tmp_path):
    path = str(tmp_path / "shared.db")
    store = smtpproxy.GreylistStore(path)
    store.decide("k", T0)
    assert store.decide("k", T0 + MIN_DEFER) is True
    code = ("import sys; sys.path.insert(0, %r); import smtpproxy; "
            "s = smtpproxy.GreylistStore(%r); "
            "print(s.decide('k', %r), s.decide('other', %r))"
            % (ROOT, path, T0 + MIN_DEFER + 10, T0))
    output = subprocess.check_output([sys.executable, "-c", code])
    assert output.split() == [b"True", b"False"]
    assert [row[0] for row in rows(store)] == ["k", "other"]
    store.close()


def passes(store, client, times, start=T0):
    for number in range(times):
        key = "%s s%d r" % (client, number)
        store.decide(key, start, client=client)
        assert store.decide(key, start + MIN_DEFER, client=client) is True


def test_client_trusted_after_auto_whitelist_clients_passes(store):
    passes(store, "192.0.2.0/24", 4)
    assert store.client_is_trusted("192.0.2.0/24", T0 + MIN_DEFER) is False
    passes(store, "192.0.2.0/24", 1, start=T0 + 10)
    assert store.client_is_trusted("192.0.2.0/24", T0 + MIN_DEFER + 20)
    assert not store.client_is_trusted("198.51.100.0/24", T0 + MIN_DEFER)
    # Unseen for max_grey: no longer trusted.
    assert not store.client_is_trusted("192.0.2.0/24",
                                       T0 + 2 * MIN_DEFER + 20 + MAX_GREY)


def test_auto_whitelist_off(tmp_path):
    class Off(smtpproxy.GreylistStore):
        auto_whitelist_clients = 0
    store = Off(str(tmp_path / "off.db"))
    passes(store, "192.0.2.0/24", 6)
    assert store.client_is_trusted("192.0.2.0/24", T0 + MIN_DEFER) is False
    store.close()


def test_purge_removes_only_what_expired(store):
    store.decide("grey-old", T0)
    store.decide("grey-new", T0 + MAX_DEFER)
    store.decide("passed", T0)
    store.decide("passed", T0 + MIN_DEFER, client="net")
    assert store.purge(T0 + MAX_DEFER + 1) == 1
    assert [row[0] for row in rows(store)] == ["grey-new", "passed"]
    assert store.purge(T0 + MIN_DEFER + MAX_GREY + 1) == 3   # + client
    assert rows(store) == []


def test_kill_9_in_the_middle_of_writing_leaves_a_sound_store(tmp_path):
    import signal
    import sqlite3
    import time as _time
    path = str(tmp_path / "killed.db")
    code = ("import sys; sys.path.insert(0, %r); import smtpproxy; "
            "s = smtpproxy.GreylistStore(%r); print('ready', flush=True)\n"
            "i = 0\n"
            "while True:\n"
            "    s.decide('k%%d' %% (i %% 1000), 1e9 + i); i += 1\n"
            % (ROOT, path))
    child = subprocess.Popen([sys.executable, "-c", code],
                             stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"ready\n"
    deadline = _time.monotonic() + 10
    while _time.monotonic() < deadline:     # until it has written a lot
        connection = sqlite3.connect(path)
        count = connection.execute("SELECT count(*) FROM triplets")\
            .fetchone()[0]
        connection.close()
        if count >= 500:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA integrity_check").fetchone() == (
        "ok",)
    connection.close()
    store = smtpproxy.GreylistStore(path)
    assert store.decide("after", T0) is False
    store.close()
