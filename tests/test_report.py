"""--db-report: what greylisting did in a period, from a store of known
contents (made through the store's API with the time given), on sqlite
and on PostgreSQL (a private cluster, tests/pg.py): the figures, the text
and the JSON, the report writing nothing, --since, and stores of the
earlier schema (no delay, no tallies) migrated."""

import calendar
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

import pytest

import smtpproxy
from conftest import HERE, ROOT

HOUR, DAY = 3600, 86400
WEEK = 7 * DAY
T0 = 999993600.0                # on the hour (the tallies' unit)
NOW = T0 + 8 * DAY              # the report's end: since is T0 + 1 day
T1 = T0 + 2 * DAY
TIMINGS = dict(too_soon=60, min_defer_time=300, max_defer_time=HOUR,
               max_grey=30 * DAY, auto_whitelist_clients=2,
               greylist_cache_time=0,
               purge_interval=10 ** 10)   # no purge but the test's own
KINDS = ["sqlite", "postgresql"]


def key(client, sender):
    return "%s %s@example.net user@example.org" % (client, sender)


class Maker(object):
    """Stores of one kind on one location, with TIMINGS (and the time
    given, not the database's clock)."""

    def __init__(self, kind, location):
        self.kind, self.location, self.made = kind, location, []

    def __call__(self, read_only=False, **attributes):
        settings = dict(TIMINGS, **attributes)
        if self.kind == "sqlite":
            base = smtpproxy.GreylistStore
        else:
            base = smtpproxy.PostgreSQLStore
            settings["database_clock"] = False
        store = type("ReportStore", (base,), settings)(
            self.location, read_only=read_only)
        self.made.append(store)
        return store

    def close(self):
        for store in self.made:
            store.close()


@pytest.fixture(params=KINDS)
def make(request, tmp_path):
    if request.param == "sqlite":
        location = str(tmp_path / "greylist.db")
    else:
        location = request.getfixturevalue("postgresql").empty("report")
    maker = Maker(request.param, location)
    yield maker
    maker.close()


def fill(store, base=T0, now=NOW):
    """The known contents, with ``base`` as T0 and ``now`` as NOW."""
    t1 = base + (T1 - T0)
    net4, net6 = "192.0.2.0/24", "2001:db8::/64"
    steps = [
        # Before the period: a pass, and one never retried (purged).
        (key(net4, "old"), base, net4), (key(net4, "old"), base + 300, net4),
        (key("203.0.113.0/24", "gone"), base, None),
        # Passes after 300, 600 and 900 s: the network 192.0.2.0/24
        # passes twice an hour apart (auto-whitelisted), the IPv6 one once.
        (key(net4, "a"), t1, net4), (key(net4, "a"), t1 + 300, net4),
        (key(net4, "b"), t1 + HOUR, net4),
        (key(net4, "b"), t1 + HOUR + 600, net4),
        (key(net6, "c"), t1 + 2 * HOUR, net6),
        (key(net6, "c"), t1 + 2 * HOUR + 900, net6),
        # Never retried: one purged (tallied), one still in the store.
        (key("198.18.0.0/24", "d"), t1 + 1800, None),
        (key("out.example.com", "e"), t1 + 20000, None),
        # Still in their window: three of one network, the unknown client.
        (key("198.51.100.0/24", "f"), now - 200, None),
        (key("198.51.100.0/24", "g"), now - 200, None),
        (key("198.51.100.0/24", "h"), now - 100, None),
        (key("unknown", "i"), now - 100, None),
    ]
    purged = False
    for triplet, moment, client in steps:
        if not purged and moment > t1 + 10000:
            assert store.purge(t1 + 10000) == 2    # gone, and d
            purged = True
        store.step(triplet, moment, client=client)
    return store


EXPECTED_TRIPLETS = {"seen": 9, "passed": 3, "never_retried": 2,
                     "waiting": 4}
EXPECTED_WAIT = {"passes": 3, "median": 600, "p90": 900, "max": 900}
EXPECTED_TOP = {
    "ipv4": [{"client": "198.51.100.0/24", "seen": 3, "passed": 0},
             {"client": "192.0.2.0/24", "seen": 2, "passed": 2}],
    "ipv6": [{"client": "2001:db8::/64", "seen": 1, "passed": 1}],
    "name": [{"client": "out.example.com", "seen": 1, "passed": 0}],
    "unknown": [{"client": "unknown", "seen": 1, "passed": 0}],
}


def test_a_store_of_known_contents_gives_known_figures(make):
    report = fill(make()).report(WEEK, NOW)
    assert (report["now"], report["since"], report["period"]) == (
        NOW, NOW - WEEK, WEEK)
    assert report["triplets"] == EXPECTED_TRIPLETS
    assert report["wait"] == EXPECTED_WAIT
    assert report["auto_whitelisted_clients"] == 1
    assert report["top_by"] == "seen"
    assert report["top_clients"] == EXPECTED_TOP
    # A longer period reaches the pass and the purged triplet before.
    longer = make(read_only=True).report(WEEK + 2 * DAY, NOW)
    assert longer["triplets"] == {"seen": 11, "passed": 4,
                                  "never_retried": 3, "waiting": 4}
    assert longer["wait"]["passes"] == 4
    # A shorter one: only the triplets still waiting.
    assert make().report(HOUR, NOW)["triplets"] == {
        "seen": 4, "passed": 0, "never_retried": 0, "waiting": 4}


# -- greytraps ---------------------------------------------------------------

TRAP = "trap@example.org"


def spring(store, now=NOW):
    """Traps sprung through the store's API, relative to ``now``, with
    greytrap_time 6 h (make(greytrap_time=6 * HOUR))."""
    for client, moment in [
            ("198.18.0.0/24", now - 2 * DAY),       # before, expired
            ("192.0.2.0/24", now - 20 * HOUR),      # in, expired
            ("out.example.com", now - 10 * HOUR),   # in, twice: the last
            ("out.example.com", now - 2 * HOUR),    #  write counts
            ("2001:db8::/64", now - 1800)]:         # in, trapped
        store.spring_trap(client, moment, TRAP)
    return store


def trapped(client, sprung, until):
    return {"client": client, "sprung": int(sprung), "until": int(until)}


EXPECTED_TRAPPED = [trapped("2001:db8::/64", NOW - 1800,
                            NOW - 1800 + 6 * HOUR),
                    trapped("out.example.com", NOW - 2 * HOUR,
                            NOW + 4 * HOUR)]


def test_the_traps_count_clients_sprung_in_the_period_and_trapped_now(make):
    store = spring(make(greytrap_time=6 * HOUR))
    # A client that sprang traps twice counts once, at its last write.
    report = store.report(DAY, NOW)
    assert report["traps"] == {
        "sprung": 3, "trapped_now": 2,
        "top": EXPECTED_TRAPPED + [trapped("192.0.2.0/24", NOW - 20 * HOUR,
                                           NOW - 14 * HOUR)]}
    # Trapped now though sprung before the period: listed, not counted.
    report = store.report(HOUR, NOW)
    assert report["traps"] == {"sprung": 1, "trapped_now": 2,
                               "top": EXPECTED_TRAPPED}
    assert store.report(DAY, NOW, top=1)["traps"]["top"] == \
        EXPECTED_TRAPPED[:1]
    # The purge deletes the expired traps: the report counts what is left.
    store.purge(NOW)
    report = make(read_only=True).report(DAY, NOW)
    assert report["traps"] == {"sprung": 2, "trapped_now": 2,
                               "top": EXPECTED_TRAPPED}


def test_the_report_never_shows_a_traps_address(make):
    report = spring(make(greytrap_time=6 * HOUR)).report(DAY, NOW)
    assert [sorted(entry) for entry in report["traps"]["top"]] == [
        ["client", "sprung", "until"]] * 3
    assert TRAP not in json.dumps(report)
    text = smtpproxy.format_report(report)
    assert "\n  out.example.com  " in text
    assert TRAP not in text


def test_a_store_without_traps_reports_none(make):
    report = fill(make()).report(WEEK, NOW)
    assert report["traps"] == {"sprung": 0, "trapped_now": 0, "top": []}


def test_the_top_lists_keep_the_first_by_seen(make):
    report = fill(make()).report(WEEK, NOW, top=1)
    assert report["top_clients"]["ipv4"] == EXPECTED_TOP["ipv4"][:1]


def test_a_pass_keeps_its_wait_and_a_restart_forgets_it(make):
    store = make()
    store.step("k", T0)
    assert store.step("k", T0 + 400).delay == 400
    store.step("k", T0 + 5000)                  # a resend: the wait stays
    assert store.report(DAY, T0 + 5000)["wait"]["max"] == 400
    # Forgotten after max_grey: seen again, grey, no wait.
    store.step("k", T0 + 5000 + 31 * DAY)
    report = store.report(DAY, T0 + 5000 + 31 * DAY)
    assert report["wait"] == {"passes": 0, "median": None, "p90": None,
                              "max": None}
    assert report["triplets"]["waiting"] == 1


def test_a_retry_after_the_window_counts_the_first_sighting_as_expired(
        make):
    store = make()
    store.step("k", T0)
    store.step("k", T0 + HOUR + 1)      # too late: seen anew
    report = store.report(DAY, T0 + HOUR + 2)
    assert report["triplets"] == {"seen": 2, "passed": 0,
                                  "never_retried": 1, "waiting": 1}


def test_the_tallies_go_after_max_grey(make):
    store = make()
    store.step("k", T0)
    store.purge(T0 + 2 * HOUR)
    assert store.report(DAY, T0 + 2 * HOUR)["triplets"][
        "never_retried"] == 1
    later = T0 + 31 * DAY
    store.purge(later)
    assert store.report(40 * DAY, later)["triplets"]["never_retried"] == 0


def flatten(report):
    names = []
    for name, value in report.items():
        if name == "top_clients":
            names.append("top_clients.KIND")
        elif isinstance(value, dict):
            names += ["%s.%s" % (name, inner) for inner in value]
        else:
            names.append(name)
    return names


def run(location, *args, **keys):
    """smtpproxy --db-report ... on ``location``, as a command."""
    options = []
    for name, value in dict(
            greylist_db=location, max_defer_time=HOUR,
            auto_whitelist_clients=2, **keys).items():
        options += ["-o", "%s=%s" % (name, value)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    process = subprocess.run(
        [sys.executable, os.path.join(ROOT, "smtpproxy.py"),
         "--config", os.devnull] + options + list(args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        cwd=tempfile.gettempdir(), universal_newlines=True)
    return process.returncode, process.stdout, process.stderr


def test_the_command_prints_the_json_object_and_the_text(make):
    now = float(int(time.time()))
    spring(fill(make(greytrap_time=6 * HOUR), base=now - 8 * DAY, now=now),
           now)
    code, out, err = run(make.location, "--db-report", "--json")
    assert code == 0, err
    assert err == "smtpproxy: store %s\n" % smtpproxy.redact_uri(
        make.location)
    report = json.loads(out)
    assert flatten(report) == list(smtpproxy.REPORT_FIELDS)
    assert report["store"] == smtpproxy.redact_uri(make.location)
    assert report["period"] == WEEK
    assert report["now"] - report["since"] == WEEK
    assert 0 <= report["now"] - now < 60
    assert report["triplets"] == EXPECTED_TRIPLETS
    assert report["wait"] == EXPECTED_WAIT
    assert report["auto_whitelisted_clients"] == 1
    assert report["top_clients"] == EXPECTED_TOP
    # A week: the trap sprung two days ago counts too.
    assert report["traps"]["sprung"] == 4
    assert report["traps"]["trapped_now"] == 2
    assert [entry["client"] for entry in report["traps"]["top"]] == [
        "2001:db8::/64", "out.example.com", "192.0.2.0/24", "198.18.0.0/24"]
    assert TRAP not in out

    code, out, err = run(make.location, "--db-report", "--since", "2h")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Greylisting in the 2 h before ")
    assert lines[1] == "Store: %s" % smtpproxy.redact_uri(make.location)
    for line in ("Triplets first seen                      4",
                 "  still waiting                          4  100.0 %",
                 "Waits of the 0 greylisting passes",
                 "  median                                 -",
                 "IPv6 networks                         seen    passed",
                 "  (none)"):
        assert line in lines, (line, out)

    code, out, err = run(make.location, "--db-report")
    assert code == 0, err
    lines = out.splitlines()
    assert re.match(r"Greylisting in the 7 d before (\S+ \S+ UTC) \(since "
                    r"\S+ \S+ UTC\)\Z", lines[0]), lines[0]
    def stamp(moment):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(moment))
    assert lines[2:] == TEXT.format(*[stamp(moment) for moment in [
        now - 1800, now - 1800 + 6 * HOUR, now - 2 * HOUR, now + 4 * HOUR,
        now - 20 * HOUR, now - 14 * HOUR, now - 2 * DAY,
        now - 2 * DAY + 6 * HOUR]]).splitlines()
    assert TRAP not in out


TEXT = """
Triplets first seen                      9
  passed                                 3   33.3 %
  never retried                          2   22.2 %  (no pass within \
max_defer_time, 3600 s)
  still waiting                          4   44.4 %

Waits of the 3 greylisting passes
  median                             600 s  10 min
  90th percentile                    900 s  15 min
  maximum                            900 s  15 min

Clients auto-whitelisted                 1  (2 passes or more, seen in \
the period)

Clients that sprang a greytrap           4  (in the period: each once, \
at its last write to a trap)
  trapped now                            2

Trapped now or in the period     last sprung (UTC)    until (UTC)
  2001:db8::/64                  {0}  {1}
  out.example.com                {2}  {3}
  192.0.2.0/24                   {4}  {5}
  198.18.0.0/24                  {6}  {7}

Top client keys, by triplets first seen in the period (those still in \
the store)

IPv4 networks                         seen    passed
  198.51.100.0/24                        3         0
  192.0.2.0/24                           2         2

IPv6 networks                         seen    passed
  2001:db8::/64                          1         1

Names (client_key = name)             seen    passed
  out.example.com                        1         0

The unknown client                    seen    passed
  unknown                                1         0
"""


@pytest.mark.parametrize("since", ["", "7x", "-1d", "30m1h", "d", "1h1h"])
def test_a_bad_since_is_refused_with_examples(tmp_path, since):
    code, out, err = run(str(tmp_path / "none.db"), "--db-report",
                         "--since=" + since)
    assert code == 2 and out == ""
    assert "error: --since: expected a duration such as 7d, 24h" in err


def test_since_and_json_go_with_db_report(tmp_path):
    code, _, err = run(str(tmp_path / "none.db"), "--db-list", "--json")
    assert code == 2
    assert "--since and --json go with --db-report" in err


@pytest.mark.parametrize("text, seconds", [
    ("3600", 3600), ("90m", 5400), ("24h", DAY), ("7d", WEEK),
    ("2w", 2 * WEEK), ("1h30m", 5400), ("1d 12h", 36 * HOUR),
    ("1.5h", 5400), ("45s", 45), ("0.5", 0.5), ("7D", WEEK), ("0", 0)])
def test_parse_duration_reads_seconds_and_units(text, seconds):
    assert smtpproxy.parse_duration(text) == seconds


@pytest.mark.parametrize("text, why", [
    ("", "it is empty"), ("7x", "'x' is no unit"),
    ("-1d", "no sign"), ("30m1h", "the largest first"),
    ("1h1h", "each unit once"), ("h", "each number needs a unit"),
    ("1h30", "each number needs a unit")])
def test_parse_duration_says_what_is_wrong(text, why):
    with pytest.raises(ValueError) as caught:
        smtpproxy.parse_duration(text)
    assert why in str(caught.value)
    assert "such as 7d, 24h, 90m, 2w" in str(caught.value)


# -- writing nothing, and the earlier schema ---------------------------------

OLD_TRIPLETS = ("CREATE TABLE triplets (key TEXT PRIMARY KEY,"
                " first_seen REAL NOT NULL, last_seen REAL NOT NULL,"
                " passed REAL, passes INTEGER NOT NULL DEFAULT 0)")
OLD_CLIENTS = ("CREATE TABLE clients (network TEXT PRIMARY KEY,"
               " passes INTEGER NOT NULL, last_seen REAL NOT NULL)")


def files(directory):
    """Each file of ``directory``: its bytes and modification time."""
    found = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        with open(path, "rb") as stream:
            found[name] = (stream.read(), os.stat(path).st_mtime_ns)
    return found


@pytest.fixture
def reader_directory():
    """A directory that the report's user may only read: as root, the
    report runs as nobody (-o user=nobody) in a directory of root's;
    otherwise the directory and its files are made read-only."""
    directory = tempfile.mkdtemp(prefix="smtpproxy-report-")
    os.chmod(directory, 0o755)
    yield directory
    os.chmod(directory, 0o755)
    shutil.rmtree(directory)


def read_only(directory):
    """The options that make the report a reader of ``directory`` only:
    as root, its files readable by all (the store is made 0640) and
    the report run as nobody."""
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o444)
    if os.geteuid() == 0:
        return {"user": "nobody"}
    os.chmod(directory, 0o555)
    return {}


def test_the_report_writes_nothing_and_reads_a_read_only_file(
        reader_directory):
    path = os.path.join(reader_directory, "greylist.db")
    now = float(int(time.time()))
    store = fill(Maker("sqlite", path)(), base=now - 8 * DAY, now=now)
    store.close()
    keys = read_only(reader_directory)
    before = files(reader_directory)
    assert list(before) == ["greylist.db"]      # the WAL checkpointed
    for since in ("10w", "8d", "1h"):
        code, out, err = run(path, "--db-report", "--since", since, **keys)
        assert code == 0, err
    code, out, err = run(path, "--db-report", "--json", **keys)
    assert json.loads(out)["triplets"] == EXPECTED_TRIPLETS
    assert files(reader_directory) == before


def test_the_report_reads_the_wal_of_a_running_service(tmp_path):
    # The writer keeps its connection (and its WAL) open, as the service.
    path = str(tmp_path / "greylist.db")
    writer = Maker("sqlite", path)()
    writer.step("k", T0)
    assert os.path.exists(path + "-wal")
    report = Maker("sqlite", path)(read_only=True).report(DAY, T0 + 10)
    assert report["triplets"]["waiting"] == 1
    writer.close()


def old_sqlite_file(path):
    connection = sqlite3.connect(path)
    connection.execute(OLD_TRIPLETS)
    connection.execute(OLD_CLIENTS)
    connection.execute("INSERT INTO triplets VALUES"
                       " ('192.0.2.0/24 a@example.net u@example.org',"
                       " ?, ?, ?, 1)", (T1, T1 + 400, T1 + 400))
    connection.execute("INSERT INTO triplets VALUES"
                       " ('192.0.2.0/24 b@example.net u@example.org',"
                       " ?, ?, NULL, 0)", (T1, T1))
    connection.commit()
    connection.close()


def sqlite_columns(path, table):
    connection = sqlite3.connect(path)
    try:
        return [row[1] for row in connection.execute(
            "PRAGMA table_info(%s)" % table)]
    finally:
        connection.close()


def test_an_sqlite_file_of_the_earlier_schema_is_reported_as_it_is(
        tmp_path):
    path = str(tmp_path / "old.db")
    old_sqlite_file(path)
    report = Maker("sqlite", path)(read_only=True).report(WEEK, NOW)
    assert report["triplets"] == {"seen": 2, "passed": 1,
                                  "never_retried": 1, "waiting": 0}
    assert report["wait"]["passes"] == 0        # not known
    assert report["traps"] == {"sprung": 0, "trapped_now": 0, "top": []}
    assert "delay" not in sqlite_columns(path, "triplets")   # unchanged
    assert sqlite_columns(path, "traps") == []


def test_an_sqlite_file_of_the_earlier_schema_is_migrated(tmp_path):
    path = str(tmp_path / "old.db")
    old_sqlite_file(path)
    store = Maker("sqlite", path)()
    assert sqlite_columns(path, "triplets")[-1] == "delay"
    assert sqlite_columns(path, "expired") == ["hour", "triplets"]
    store.step(key("192.0.2.0/24", "c"), T1)
    store.step(key("192.0.2.0/24", "c"), T1 + 700)
    store.purge(T1 + 2 * HOUR)                  # b: tallied
    report = store.report(WEEK, NOW)
    assert report["triplets"] == {"seen": 3, "passed": 2,
                                  "never_retried": 1, "waiting": 0}
    assert report["wait"] == {"passes": 1, "median": 700, "p90": 700,
                              "max": 700}


PG_VERSION_1 = (
    "CREATE TABLE smtpproxy_schema (version integer NOT NULL,"
    " last_purge double precision);"
    " INSERT INTO smtpproxy_schema (version) VALUES (1);"
    " CREATE TABLE smtpproxy_triplets (key text PRIMARY KEY,"
    " first_seen double precision NOT NULL,"
    " last_seen double precision NOT NULL, passed double precision,"
    " passes integer NOT NULL DEFAULT 0);"
    " CREATE TABLE smtpproxy_clients (network text PRIMARY KEY,"
    " passes integer NOT NULL, last_seen double precision NOT NULL);"
    " INSERT INTO smtpproxy_triplets VALUES"
    " ('192.0.2.0/24 a@example.net u@example.org', %s, %s, %s, 1),"
    " ('192.0.2.0/24 b@example.net u@example.org', %s, %s, NULL, 0);"
    " ALTER TABLE smtpproxy_schema OWNER TO greylist;"
    " ALTER TABLE smtpproxy_triplets OWNER TO greylist;"
    " ALTER TABLE smtpproxy_clients OWNER TO greylist"
    % (T1, T1 + 400, T1 + 400, T1, T1))


def pg_version_1(postgresql):
    uri = postgresql.empty("report")
    name = uri.rsplit("/", 1)[1]
    postgresql.sql(PG_VERSION_1, name)
    return uri, name


def test_postgresql_tables_of_version_1_are_reported_by_a_reader_as_they_are(
        postgresql):
    # A role that may only read, as a reporting account would be: the
    # report neither migrates nor writes.
    uri, name = pg_version_1(postgresql)
    postgresql.sql("DROP ROLE IF EXISTS reader; CREATE ROLE reader LOGIN"
                   " PASSWORD 'reader'; GRANT SELECT ON smtpproxy_schema,"
                   " smtpproxy_triplets, smtpproxy_clients TO reader", name)
    try:
        reader = Maker("postgresql", uri.replace("greylist:secret@",
                                                 "reader:reader@"))
        report = reader(read_only=True).report(WEEK, NOW)
        reader.close()
        assert report["triplets"] == {"seen": 2, "passed": 1,
                                      "never_retried": 1, "waiting": 0}
        assert report["wait"]["passes"] == 0
        # No table of traps in version 1: none, and no error.
        assert report["traps"] == {"sprung": 0, "trapped_now": 0,
                                   "top": []}
        assert postgresql.sql("SELECT version FROM smtpproxy_schema",
                              name) == "1"
    finally:
        postgresql.sql("DROP OWNED BY reader; DROP ROLE reader", name)


def test_postgresql_tables_of_version_1_are_migrated(postgresql):
    uri, name = pg_version_1(postgresql)
    maker = Maker("postgresql", uri)
    store = maker()
    store.step(key("192.0.2.0/24", "c"), T1)
    assert postgresql.sql("SELECT version FROM smtpproxy_schema",
                          name) == "2"
    store.step(key("192.0.2.0/24", "c"), T1 + 700)
    store.purge(T1 + 2 * HOUR)                  # b: tallied
    report = store.report(WEEK, NOW)
    maker.close()
    assert report["triplets"] == {"seen": 3, "passed": 2,
                                  "never_retried": 1, "waiting": 0}
    assert report["wait"] == {"passes": 1, "median": 700, "p90": 700,
                              "max": 700}


def test_a_read_only_store_cannot_write(make):
    fill(make())
    reader = make(read_only=True)
    with pytest.raises(sqlite3.Error) as caught:
        reader.step(key("192.0.2.0/24", "new"), NOW)
    assert "read-only" in str(caught.value) or "readonly" in str(
        caught.value)
    assert make().report(WEEK, NOW)["triplets"] == EXPECTED_TRIPLETS


def epoch(day, hour):
    return calendar.timegm(time.strptime(day + " " + hour,
                                         "%Y-%m-%d %H:%M:%S"))


def test_the_readme_shows_what_the_command_prints():
    with open(os.path.join(ROOT, "README.md")) as stream:
        readme = stream.read()
    section = readme.split("### What greylisting did: --db-report")[1]
    shown = section.split("```\n")[1].splitlines()
    entries = {"ipv4": [], "ipv6": [], "name": [], "unknown": []}
    kinds = iter(["ipv4", "ipv6", "name", "unknown"])
    for line in shown[shown.index("IPv4 networks                         "
                                  "seen    passed"):]:
        if line.endswith("seen    passed"):
            kind = next(kinds)
        elif line.startswith("  ") and line.strip() != "...":
            client, seen, passed = line.split()
            entries[kind].append({"client": client, "seen": int(seen),
                                  "passed": int(passed)})
    trapped = []
    for line in shown[shown.index("Trapped now or in the period     "
                                  "last sprung (UTC)    until (UTC)") + 1:]:
        if not line:
            break
        if line.strip() != "...":
            client, day, hour, until_day, until_hour = line.split()
            trapped.append({"client": client, "sprung": epoch(day, hour),
                            "until": epoch(until_day, until_hour)})
    report = {
        "store": "/var/lib/smtpproxy/greylist.db", "now": 1741586400,
        "since": 1741586400 - WEEK, "period": WEEK,
        "max_defer_time": 25000, "auto_whitelist_clients": 5,
        "triplets": {"seen": 48213, "passed": 6120,
                     "never_retried": 41377, "waiting": 716},
        "wait": {"passes": 6044, "median": 3906, "p90": 7513,
                 "max": 24310},
        "auto_whitelisted_clients": 311, "top_by": "seen",
        "top_clients": entries,
        "traps": {"sprung": 14, "trapped_now": 3, "top": trapped}}
    assert len(trapped) == 4
    printed = smtpproxy.format_report(report).splitlines()
    assert [line for line in shown if line.strip() != "..."] == printed
