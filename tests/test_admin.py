"""The command line's --check-config and --db-* commands."""

import os
import subprocess
import sys
import time

import pytest

import smtpproxy
from conftest import HERE, ROOT, rcpt_code, wait_until


def run(tmp_path, *args, **kwargs):
    config = tmp_path / "admin.conf"
    if not config.exists():
        config.write_text(kwargs.get("config", "greylist_db = %s\n"
                                     % (tmp_path / "admin.db")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    process = subprocess.run(
        [sys.executable, os.path.join(ROOT, "smtpproxy.py"),
         "--config", str(config)] + list(args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        cwd=str(tmp_path))
    return (process.returncode, process.stdout.decode(),
            process.stderr.decode())


def test_check_config_prints_every_effective_key(tmp_path):
    (tmp_path / "admin.conf").write_text(
        "servername = mx.example.org\nmax_grey = 100\nbogus = 1\n"
        "allowed_domains:\n    example.org\n")
    # Root may serve: --check-config refuses what the service would.
    code, out, err = run(tmp_path, "--check-config", "-o", "run_as_root=yes")
    assert code == 0, err
    assert "servername = mx.example.org" in out.splitlines()
    assert "max_grey = 100" in out.splitlines()
    assert "too_soon = 180" in out.splitlines()          # a default
    assert "allowed_domains:\n    example.org" in out
    assert "strict = yes" in out.splitlines()
    assert "admin.conf:3: unknown key 'bogus'" in err
    # What it prints loads again, to the same values.
    again = tmp_path / "again.conf"
    again.write_text(out)
    values, warnings = smtpproxy.read_config_file(str(again))
    assert warnings == []
    assert values["max_grey"] == 100 and values["strict"] is True


def test_check_config_refuses_a_bad_file(tmp_path):
    (tmp_path / "admin.conf").write_text("max_grey = soon\n")
    code, out, err = run(tmp_path, "--check-config")
    assert code == 2
    assert "admin.conf:1: max_grey" in err


def test_db_commands(tmp_path):
    now = time.time()
    store = smtpproxy.GreylistStore(str(tmp_path / "admin.db"))
    store.decide("192.0.2.0/24 a@example.net b@example.org", now)
    store.decide("192.0.2.0/24 old@example.net b@example.org", now - 30000)
    store.close()
    code, out, _ = run(tmp_path, "--db-stats")
    assert (code, out.split()) == (0, ["CLIENT", "0", "GREY", "2",
                                       "WHITE", "0"])
    code, out, _ = run(tmp_path, "--db-pass",
                       "192.0.2.0/24 a@example.net b@example.org")
    assert code == 0
    code, out, _ = run(tmp_path, "--db-list")
    lines = out.splitlines()
    assert lines[0].startswith("STATE")
    assert any(line.startswith("WHITE   192.0.2.0/24 a@example.net "
                               "b@example.org | ") for line in lines)
    code, out, _ = run(tmp_path, "--db-purge")
    assert (code, out.strip()) == (0, "purged 1")       # the old grey one
    code, _, _ = run(tmp_path, "--db-delete",
                     "192.0.2.0/24 a@example.net b@example.org")
    assert code == 0
    code, _, err = run(tmp_path, "--db-delete", "nothing")
    assert code == 1 and "no entry" in err
    code, out, _ = run(tmp_path, "--db-stats")
    assert out.split() == ["CLIENT", "0", "GREY", "0", "WHITE", "0"]


def test_db_commands_name_the_store_as_the_service_does(tmp_path):
    # greylist_db = link/../grey.db: the kernel (and the service, which
    # joins the name to its directory) goes up from where the link
    # leads, link/../ being spool/; a text-only collapse would name
    # ./grey.db, another store.
    (tmp_path / "spool" / "greylist").mkdir(parents=True)
    os.symlink("spool/greylist", str(tmp_path / "link"))
    served = smtpproxy.GreylistStore(str(tmp_path / "spool" / "grey.db"))
    served.decide("192.0.2.0/24 served@example.net b@example.org", 0)
    served.close()
    other = smtpproxy.GreylistStore(str(tmp_path / "grey.db"))
    other.decide("192.0.2.0/24 other@example.net b@example.org", 0)
    other.close()
    (tmp_path / "admin.conf").write_text(
        "greylist_db = %s\n" % os.path.join("link", "..", "grey.db"))
    code, out, err = run(tmp_path, "--db-list")
    assert code == 0, err
    assert "served@example.net" in out
    assert "other@example.net" not in out


def test_help_names_the_admin_commands(tmp_path):
    code, out, _ = run(tmp_path, "--help")
    for option in ("--check-config", "--db-list", "--db-pass",
                   "--db-delete", "--db-purge", "--db-stats"):
        assert option in out


def test_db_pass_takes_a_key_as_the_proxy_forms_it(tmp_path):
    # A host address is its /24, brackets and case as the proxy drops
    # them, the sender normalised; quoted in one argument or not.
    code, out, err = run(tmp_path, "--db-pass", "192.0.2.7",
                         "<A+tag@Example.NET>", "<User@Example.ORG>")
    assert code == 0, err
    assert "store %s" % (tmp_path / "admin.db") in err
    key = "192.0.2.0/24 a@example.net user@example.org"
    assert out == "passed %s\n" % key
    store = smtpproxy.GreylistStore(str(tmp_path / "admin.db"))
    assert [entry[:2] for entry in store.entries()] == [("WHITE", key)]
    store.close()
    code, out, err = run(tmp_path, "--db-pass",
                         "2001:db8::1 <> postmaster@example.org")
    assert code == 0, err
    assert out == "passed 2001:db8::/64  postmaster@example.org\n"
    code, out, err = run(tmp_path, "--db-delete", key)
    assert (code, out) == (0, "deleted %s\n" % key)
    # A name key (client_key = name), as --db-list shows them.
    code, out, err = run(tmp_path, "--db-pass", "Out.Example.COM",
                         "a@example.net", "b@example.org")
    assert (code, out) == (0, "passed out.example.com a@example.net "
                              "b@example.org\n"), err


@pytest.mark.parametrize("key", [
    "foo",
    "127.0.0.2 b@example.net",
    "999.1.2.3 a@example.net b@example.org",
    "not/a/name a@example.net b@example.org",
    "192.0.2.0/16 a@example.net b@example.org",
    "192.0.2.7 a@example.net nobody",
])
def test_db_pass_refuses_a_malformed_key_with_an_example(tmp_path, key):
    code, out, err = run(tmp_path, "--db-pass", key)
    assert code == 2
    assert "such as '192.0.2.7 sender@example.net user@example.org'" in err \
        or "/24 networks" in err, err
    assert not (tmp_path / "admin.db").exists()


@pytest.mark.parametrize("command", ["--db-list", "--db-stats",
                                     "--db-purge"])
def test_read_commands_never_create_a_store(tmp_path, command):
    code, out, err = run(tmp_path, command)
    assert code == 1
    assert "no greylisting store at %s" % (tmp_path / "admin.db") in err
    assert "--config" in err
    assert not (tmp_path / "admin.db").exists()


def test_a_db_delete_reaches_a_running_proxy_within_the_cache_time(
        tmp_path, proxy_process):
    # The proxy keeps what passed in memory for greylist_cache_time (1 s
    # here): a --db-delete meanwhile is seen once that has run out.
    db = tmp_path / "admin.db"
    key = "127.0.0.0/24 a@example.net b@example.org"
    assert run(tmp_path, "--db-pass", key)[0] == 0
    process = proxy_process(
        config="greylist_db = %s\nallowed_senders:\nallowed_domains:\n"
               "    example.org\nclient_key = network\n"
               "auto_whitelist_clients = 0\ngreylist_cache_time = 1\n" % db,
        handler="smtpproxy.GreyListingPolicy")

    def rcpt():
        return rcpt_code(process.port)
    assert rcpt() == 250
    passes = [entry[4] for entry in smtpproxy.GreylistStore(str(db))
              .entries() if entry[0] == "WHITE"]
    assert run(tmp_path, "--db-delete", key)[0] == 0
    # In memory still (greylist_cache_time), or greylisted: never an
    # error.
    wait_until(lambda: rcpt() == 451, what="the delete to be seen")
    assert passes == [2]            # the --db-pass and the RCPT's


@pytest.mark.parametrize("command", [
    ["--db-list"], ["--db-stats"], ["--db-purge"], ["--db-report"],
    ["--db-report", "--json"],
    ["--db-pass", "192.0.2.0/24 x@example.net y@example.org"]])
def test_a_reader_that_stops_reading_ends_a_command_quietly(tmp_path,
                                                            command):
    # smtpproxy --db-list | head: the pipe is closed before the command
    # writes; it ends as a tool SIGPIPE ends, with no traceback.
    store = smtpproxy.GreylistStore(str(tmp_path / "admin.db"))
    for number in range(2000):
        store.pass_key("192.0.2.0/24 s%d@example.net r@example.org"
                       % number, time.time())
    store.close()
    (tmp_path / "admin.conf").write_text(
        "greylist_db = %s\n" % (tmp_path / "admin.db"))
    read_end, write_end = os.pipe()
    os.close(read_end)                      # the reader is gone
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    try:
        process = subprocess.run(
            [sys.executable, os.path.join(ROOT, "smtpproxy.py"), "--config",
             str(tmp_path / "admin.conf")] + command,
            stdout=write_end, stderr=subprocess.PIPE, env=env,
            cwd=str(tmp_path), timeout=60)
    finally:
        os.close(write_end)
    assert process.stderr.decode() == "smtpproxy: store %s\n" % (
        tmp_path / "admin.db")
    assert process.returncode == 128 + 13      # SIGPIPE's, as a shell says
