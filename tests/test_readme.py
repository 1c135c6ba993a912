"""The README's quick start, run as written: as root, and as an ordinary
user with the system's Python; then every other block of the README, each
checked by a rule (below), and its table of every key against the code.

The trial directory and the two ports are the only things changed, so
that a run cannot meet another; Python 3.12 and later, which have no
smtpd module, get the throwaway server the README names for them.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT, free_port

README = os.path.join(ROOT, "README.md")


def quick_start_blocks():
    """The shell blocks of the README's quick start, in order."""
    with open(README) as readme:
        text = readme.read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks, current = [], []
    for line in section.splitlines():
        if line.startswith("    ") or (current and not line.strip()):
            current.append(line[4:])
        elif current:
            blocks.append("\n".join(current).strip() + "\n")
            current = []
    if current:
        blocks.append("\n".join(current).strip() + "\n")
    return blocks


def trial_script(base, python_dir, modern):
    """The quick start's commands, run from a copy of the checkout (what
    they use of it: smtpproxy.py) that any user can read, making the
    trial's directory in ``base`` (TMPDIR)."""
    checkout = os.path.join(base, "checkout")
    if not os.path.isdir(checkout):
        os.mkdir(checkout)
        shutil.copy(os.path.join(ROOT, "smtpproxy.py"), checkout)
        os.chmod(checkout, 0o755)
    try_it, let_through = quick_start_blocks()[:2]
    script = try_it + let_through
    if modern:
        # What the README says to do on Python 3.12 and later.
        script = script.replace(
            "python3 -W ignore -m smtpd -n -c DebuggingServer",
            "python3 -m aiosmtpd -n -l")
        assert "aiosmtpd -n -l" in script
    # A directory of the run's own, wherever mktemp makes it.
    assert 'cd "$(mktemp -d)"' in script
    # Both at once: the first port chosen may hold "8025" (38025, say).
    ports = {"2525": str(free_port()), "8025": str(free_port())}
    script = re.sub("2525|8025", lambda match: ports[match.group()], script)
    # Unbuffered: the throwaway server prints to a pipe here, not to a
    # terminal, and is killed at the end.
    return ("export PATH=%s:$PATH PYTHONUNBUFFERED=1 TMPDIR=%s\ncd %s\n%s"
            % (python_dir, base, checkout, script))


def trial_directories(base):
    return set(name for name in os.listdir(base) if name != "checkout")


def check_trial(result, base, before=()):
    """The trial's output, and the log in the one directory it made in
    ``base`` (beside those ``before``)."""
    output = result.stdout
    assert result.returncode == 0, output
    made = trial_directories(base) - set(before)
    assert len(made) == 1, (made, output)
    directory = os.path.join(base, made.pop())
    tries = output.split("RCPT:")[1:]
    assert len(tries) == 2, output
    first, second = tries
    assert first.startswith(" 451 4.7.1 Greylisted"), output
    assert second.startswith(" 250 "), output
    assert "DATA: 250 " in output, output
    assert "Subject: trial" in output, output        # the server printed it
    with open(os.path.join(directory, "greylist.log")) as log:
        lines = log.read().splitlines()
    assert [line.split(" | ")[5] for line in lines] == ["DEFERRED",
                                                       "ACCEPTED"]


@pytest.fixture
def trial_directory():
    """The TMPDIR of the trial, standing for /tmp: a sticky directory
    every user may make theirs in (pytest's own is root's alone)."""
    base = tempfile.mkdtemp(prefix="smtpproxy-readme-", dir="/tmp")
    os.chmod(base, 0o1777)
    yield base                  # the quick start makes its directory there
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(60)
def test_the_quick_start_works_as_written(trial_directory):
    script = trial_script(trial_directory, os.path.dirname(sys.executable),
                          sys.version_info >= (3, 12))
    result = subprocess.run(["bash", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=50)
    check_trial(result, trial_directory)


def system_python():
    """The system's python3 (an ordinary user cannot reach root's pyenv),
    if it has the smtpd module the quick start uses."""
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        return None
    found = subprocess.run([python, "-W", "ignore", "-c", "import smtpd"],
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    return python if found.returncode == 0 else None


def run_as_nobody(script):
    return subprocess.run(
        [shutil.which("runuser") or "/sbin/runuser", "-u", "nobody", "--",
         "bash", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=50)


@pytest.mark.timeout(60)
def test_the_quick_start_works_for_an_ordinary_user(trial_directory):
    assert os.geteuid() == 0, "the tests run as root, as CI does"
    python = system_python()
    assert python, "Debian's python3 (3.11) with its smtpd module"
    check_trial(run_as_nobody(trial_script(trial_directory, "/usr/bin",
                                           False)), trial_directory)


@pytest.mark.timeout(100)
def test_the_quick_start_works_as_root_then_as_an_ordinary_user(
        trial_directory):
    # On one machine, one after the other: each run in a directory of
    # its own, none meeting what the other left.
    assert os.geteuid() == 0, "the tests run as root, as CI does"
    assert system_python(), "Debian's python3 (3.11) with its smtpd module"
    script = trial_script(trial_directory, "/usr/bin", False)
    result = subprocess.run(["bash", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=45)
    check_trial(result, trial_directory)
    before = trial_directories(trial_directory)
    check_trial(run_as_nobody(script), trial_directory, before)


# ---------------------------------------------------------------------------
# Every block of the README, each checked by a rule
# ---------------------------------------------------------------------------
#
# A block is a fenced one (```) or an indented one (four spaces more than
# the text around it, in a list too).  A configuration block (every line
# 'key = value', 'key:' or an item, every key smtpproxy's) is parsed by
# smtpproxy's own reader.  Every other block has a rule, named by its
# first line: it is run here (with a directory and ports of its own), or,
# where it needs a real host (apt-get, systemctl, /etc), checked
# statically: the programs, files and options it names exist.  A block no
# rule covers fails, and so does a rule whose block is gone.

import json  # noqa: E402
import shlex  # noqa: E402

import smtpproxy  # noqa: E402
import readme_keys  # noqa: E402


class Block(object):
    def __init__(self, line, heading, text):
        self.line = line            # where it starts in README.md
        self.heading = heading
        self.text = text
        self.first = text.split("\n", 1)[0].strip()

    def __repr__(self):
        return "README.md:%d (%s) %r" % (self.line, self.heading, self.first)


def readme_blocks():
    with open(README) as readme:
        lines = readme.read().split("\n")
    blocks, heading, index, blank_before = [], None, 0, True
    while index < len(lines):
        line = lines[index]
        fence = re.match(r"( *)```\S*\s*\Z", line)
        if fence:
            indent, end = len(fence.group(1)), index + 1
            while not re.match(r" *```\s*\Z", lines[end]):
                end += 1
            blocks.append(Block(index + 1, heading, "\n".join(
                body[indent:] for body in lines[index + 1:end]) + "\n"))
            index, blank_before = end + 1, False
            continue
        if blank_before and re.match(r" {4,}\S", line):
            end = index
            while end < len(lines) and (
                    re.match(r" {4,}\S", lines[end])
                    or (not lines[end].strip() and end + 1 < len(lines)
                        and re.match(r" {4,}\S", lines[end + 1]))):
                end += 1
            body = lines[index:end]
            indent = min(len(text) - len(text.lstrip())
                         for text in body if text.strip())
            blocks.append(Block(index + 1, heading, "\n".join(
                text[indent:] for text in body) + "\n"))
            index, blank_before = end, False
            continue
        if line.startswith("#"):
            heading = line.lstrip("# ")
        blank_before = not line.strip()
        index += 1
    return blocks


def parse_config(text, tmp_path):
    """``(values, warnings)`` of a configuration block, by smtpproxy's
    reader; ConfigError if it does not parse."""
    path = str(tmp_path / "block.conf")
    with open(path, "w") as block:
        block.write(text)
    return smtpproxy.read_config_file(path)


def is_config_block(block, tmp_path):
    try:
        values, warnings = parse_config(block.text, tmp_path)
    except smtpproxy.ConfigError:
        return False
    return bool(values) and not warnings


def help_options(command):
    """The options a program's --help names."""
    result = subprocess.run(command + ["--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout
    return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", result.stdout))


SMTPPROXY = [sys.executable, os.path.join(ROOT, "smtpproxy.py")]

# Commands of a real host's administration, which a test may not run
# here (they change the system); the block's other words are checked.
SYSTEM_COMMANDS = {
    "apt-get", "apt", "su", "systemctl", "update-rc.d", "chkconfig",
    "service", "adduser", "useradd", "install", "postfix", "head"}


def command_lines(text):
    """The commands of a shell block, continuation lines joined, comments
    and here-documents left out."""
    lines, heredoc = [], None
    for line in text.replace("\\\n", " ").splitlines():
        if heredoc:
            if line.strip() == heredoc:
                heredoc = None
            continue
        match = re.search(r"<<'?(\w+)'?", line)
        if match:
            heredoc = match.group(1)
        words = shlex.split(line, comments=True)
        if words:
            lines.append(words)
    return lines


def check_commands(text):
    """Each command of a shell block names what exists: smtpproxy's own
    options, the checkout's files and scripts (their options in their
    --help), and otherwise a system command of the admin's."""
    smtpproxy_options = help_options(SMTPPROXY)
    checked = 0
    for words in command_lines(text):
        words = [word for word in words if word not in ("&", "&&")]
        while words and re.match(r"\w+=", words[0]):
            words = words[1:]               # VARIABLE=value before it
        if not words:
            continue
        program = words[0]
        if program in ("smtpproxy", "/opt/smtpproxy/bin/smtpproxy") or (
                program == "python3" and words[1].endswith("smtpproxy.py")):
            arguments = words[1:] if program != "python3" else words[2:]
            for word in arguments:
                if word.startswith("-"):
                    assert word.split("=")[0] in smtpproxy_options, words
        elif program == "python3" and words[1].startswith("contrib/"):
            script = words[1]
            assert os.path.isfile(os.path.join(ROOT, script)), words
            options = help_options([sys.executable, script])
            for word in words[2:]:
                option = word.strip("[]").split("=")[0]
                if option.startswith("-"):
                    assert option in options, (script, option)
        elif program == "python3":
            assert words[1:3] == ["-m", "venv"], words
        elif program == "bash" and words[1] == ".ci/run":
            with open(os.path.join(ROOT, ".ci", "run")) as run:
                series = re.search(r"SERIES=\(([^)]*)\)", run.read())
            assert all(word in series.group(1).split()
                       for word in words[2:]), words
        elif program == "cp":
            assert os.path.isfile(os.path.join(ROOT, words[1])), words
        elif program.endswith("/pip"):
            assert words[1] == "install", words
            extra = re.match(r"\.(?:\[(\w+)\])?\Z", words[2])
            assert extra, words
            if extra.group(1):
                with open(os.path.join(ROOT, "setup.py")) as setup:
                    assert '"%s":' % extra.group(1) in setup.read()
        else:
            assert program in SYSTEM_COMMANDS, (
                "%r: a command of no rule" % program)
        checked += 1
    assert checked


# The blocks that are no configuration, by their first line: how each
# is checked.

def check_by_the_quick_start_tests(block, tmp_path):
    # Run as written, as root and as nobody, by the tests above.
    assert block.text in quick_start_blocks()[:2]


def check_statically(block, tmp_path):
    check_commands(block.text)


def check_the_systemd_override(block, tmp_path):
    import test_systemd_unit            # systemd-analyze verifies it
    assert block.text == test_systemd_unit.readme_override()


def check_the_postgrey_block(block, tmp_path):
    import test_postgrey                # run beside a real postgrey
    values, warnings = parse_config(block.text, tmp_path)
    assert warnings == []
    assert values["client_key"] == "network"
    assert test_postgrey.readme_preset() == block.text


def check_the_master_cf_lines(block, tmp_path):
    for line in block.text.splitlines():
        fields = line.lstrip("#").split()
        if not line.startswith("# "):
            assert len(fields) == 8 and fields[7] == "smtpd", line
    # On the port smtpproxy forwards to by default.
    assert "\n127.0.0.1:%d inet " % smtpproxy.GreyListingPolicy.smtp_port \
        in block.text


def check_the_main_cf_restrictions(block, tmp_path):
    # The service the policy block above listens on.
    socket_path = [b for b in readme_blocks()
                   if b.first == "smtp_proxy = no"][0]
    values, _ = parse_config(socket_path.text, tmp_path)
    assert values["policy_listen"] == \
        "unix:/var/spool/postfix/private/smtpproxy"
    assert block.text.splitlines()[-1].strip() == \
        "check_policy_service unix:private/smtpproxy"
    assert block.first == "smtpd_recipient_restrictions ="


def check_the_exim_lines(block, tmp_path):
    assert block.text == ("daemon_smtp_ports = 8025\n"
                          "local_interfaces = <; 127.0.0.1.8025 ; ::1.8025\n")


def check_the_logrotate_file(block, tmp_path):
    # What postrotate runs exists: the init script's verb, the signal.
    with open(os.path.join(ROOT, "contrib", "init.d", "smtpproxy")) as init:
        assert "reopen-logs)" in init.read()
    with open(os.path.join(ROOT, "smtpproxy.py")) as source:
        assert "SIGUSR2" in source.read()
    assert "create 0640 smtpproxy smtpproxy" in block.text
    assert block.text.count("{") == block.text.count("}") == 1


def check_the_transaction_line(block, tmp_path):
    fields = block.text.rstrip("\n").split(" | ")
    assert len(fields) == 8 and fields[-1] == "", fields
    assert re.match(r"\d{14}\.\d{3}\Z", fields[0])
    assert fields[5] in ("ACCEPTED", "DEFERRED", "REFUSED", "FAILED", "")


def check_the_policy_log_lines(block, tmp_path):
    # The policy service's greylist_log lines (PolicyHandler's
    # _log_transaction writes them; test_policy_service checks real ones).
    for line in block.text.splitlines():
        assert re.match(
            r"\d{14}\.\d{3} (\w+: )?action=(greylist|pass|unanswered), "
            r"reason=[^,]+(, delay=\d+)?(, (client_name|client_address|"
            r"sender|recipient)=[^,]*)+\Z", line), line


def smtpproxy_shell(tmp_path, text):
    """A block's `smtpproxy --config /etc/smtpproxy.conf` run on a store
    in tmp_path."""
    config = tmp_path / "smtpproxy.conf"
    config.write_text("greylist_db = %s\n" % (tmp_path / "greylist.db"))
    text = text.replace("smtpproxy --config /etc/smtpproxy.conf",
                        "%s --config %s" % (" ".join(SMTPPROXY), config))
    subprocess.check_call(SMTPPROXY + [
        "--config", str(config), "--db-pass", "192.0.2.7", "a@example.net",
        "b@example.org"], stderr=subprocess.DEVNULL)
    return subprocess.run(["bash", "-c", text], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=60)


def check_the_report_commands(block, tmp_path):
    result = smtpproxy_shell(tmp_path, block.text)
    assert result.returncode == 0, result.stderr
    text, as_json = result.stdout.split("\n{", 1)
    assert "Triplets first seen" in text
    assert json.loads("{" + as_json)["triplets"]["passed"] == 1


def report_labels(text):
    labels = []
    for line in text.splitlines():
        if re.match(r"\s*[A-Za-z]", line):
            labels.append(re.split(r"\s{2,}|: ",
                                   re.sub(r"\d+", "N", line.strip()))[0])
    return labels


def check_the_report_sample(block, tmp_path):
    result = smtpproxy_shell(tmp_path, "smtpproxy --config "
                             "/etc/smtpproxy.conf --db-report")
    assert result.returncode == 0, result.stderr
    sample = iter(report_labels(block.text))
    for label in report_labels(result.stdout):
        if label.startswith(("N", "(none)")):
            continue
        assert label in sample, label       # all of them, in that order


def check_the_trapped_line(block, tmp_path):
    assert re.match(r"TRAPPED \S+ \| \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \| "
                    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \| <[^>]+@[^>]+>\n\Z",
                    block.text), block.text


def check_the_prometheus_scrape(block, tmp_path):
    metrics = [b for b in readme_blocks()
               if b.first == "metrics_listen = 127.0.0.1:9025"][0]
    values, _ = parse_config(metrics.text, tmp_path)
    assert 'targets: ["%s"]' % values["metrics_listen"] in block.text


def check_the_speed_figures(block, tmp_path):
    # Figures of contrib/bench.py, which names these targets.
    with open(os.path.join(ROOT, "contrib", "bench.py")) as bench:
        source = bench.read()
    for target in ("direct to smtp-sink", "proxy_filter", "tuned",
                   "one message per connection", "many"):
        assert target in block.text and target in source, target
    for key in ("workers = 4", "spare_threads = 50",
                "upstream_pool_size = 20"):
        values, _ = parse_config(key + "\n", tmp_path)
        assert values


def check_the_hash_key_commands(block, tmp_path):
    # Run, in a root-only directory of its own, then read as the start
    # reads it.
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o700)
    text = block.text.replace("/etc/smtpproxy/", str(directory) + "/")
    subprocess.check_call(["bash", "-e", "-c", text])
    secret = smtpproxy.read_key_secret(str(directory / "hash.key"))
    assert len(secret) >= 32


def check_the_policy_example(block, tmp_path):
    # The module written, the command run (on a free port, checking).
    module, command = block.text.split("\nPYTHONPATH=", 1)
    (tmp_path / "mypolicy.py").write_text(module)
    command = "PYTHONPATH=" + command.replace(
        "python3 smtpproxy.py", " ".join(SMTPPROXY)).replace(
        "--listen 25", "--listen 127.0.0.1:%d" % free_port())
    assert "mypolicy.OurDomains" in command
    result = subprocess.run(["bash", "-c", command.replace(
        "--class mypolicy.OurDomains", "--class mypolicy.OurDomains "
        "--check-config --quiet")], cwd=str(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=60)
    assert "mypolicy" not in result.stdout, result.stdout
    assert result.returncode == 0, result.stdout
    check_commands(block.text.split("\n\n")[-1])


RULES = {
    "smtpproxy --config /etc/smtpproxy.conf    # or: python3 smtpproxy.py "
    "--config ...": check_statically,
    "SMTPPROXY=$PWD/smtpproxy.py": check_by_the_quick_start_tests,
    'python3 "$SMTPPROXY" --user nobody \\': check_by_the_quick_start_tests,
    "python3 -m venv /opt/smtpproxy": check_statically,
    "[Service]": check_the_systemd_override,
    "#smtp      inet  n       -       y       -       -       smtpd":
        check_the_master_cf_lines,
    "daemon_smtp_ports = 8025": check_the_exim_lines,
    "adduser --system --group --home /var/lib/smtpproxy smtpproxy  "
    "# Debian": check_statically,
    "cp contrib/init.d/smtpproxy /etc/init.d/smtpproxy": check_statically,
    "cp contrib/systemd/smtpproxy.service /etc/systemd/system/":
        check_statically,
    "/var/log/smtpproxy/*.log {": check_the_logrotate_file,
    "smtpd_recipient_restrictions =": check_the_main_cf_restrictions,
    "# postgrey's timings and keys": check_the_postgrey_block,
    "20261125093012.345 | client.example.net | 192.0.2.7 | <a@example.net> "
    "| <b@example.org> | ACCEPTED | 250 2.0.0 Ok: queued as 4XyZ |":
        check_the_transaction_line,
    "smtpproxy --config /etc/smtpproxy.conf --db-report":
        check_the_report_commands,
    "Greylisting in the 7 d before 2025-03-10 06:00:00 UTC (since "
    "2025-03-03 06:00:00 UTC)": check_the_report_sample,
    "scrape_configs:": check_the_prometheus_scrape,
    "20261125093012.345 action=greylist, reason=new, client_name=unknown, "
    "client_address=192.0.2.7, sender=a@example.net, "
    "recipient=b@example.org": check_the_policy_log_lines,
    "TRAPPED 192.0.2.0/24 | 2024-05-02T10:11:12Z | 2024-05-03T10:11:12Z | "
    "<trap@example.org>": check_the_trapped_line,
    "apt-get install postgresql": check_statically,
    "/opt/smtpproxy/bin/pip install '.[postgresql]'": check_statically,
    "through                  one message per connection  many per "
    "connection": check_the_speed_figures,
    "install -m 600 /dev/null /etc/smtpproxy/hash.key":
        check_the_hash_key_commands,
    "# mypolicy.py": check_the_policy_example,
    "bash .ci/run            # every CPython 3.6 to 3.13: about 25 "
    "minutes": check_statically,
    "python3 contrib/soak.py --duration 600": check_statically,
    "python3 contrib/soak.py --duration 3600": check_statically,
    "python3 contrib/bench.py": check_statically,
    "python3 contrib/bench_store.py": check_statically,
    "python3 contrib/bench_report.py [--index]": check_statically,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block", readme_blocks(), ids=repr)
def test_every_block_of_the_readme_is_checked(block, tmp_path):
    if block.first in RULES:
        RULES[block.first](block, tmp_path)
        return
    # Anything else must be a configuration block smtpproxy reads, every
    # key known, no value holding what was meant as a comment.
    try:
        values, warnings = parse_config(block.text, tmp_path)
    except smtpproxy.ConfigError as error:
        raise AssertionError("%r: no rule covers it, and it is no "
                             "configuration: %s" % (block, error))
    assert values and warnings == [], (block, warnings)
    for value in values.values():
        assert "#" not in str(value), (block, value)


def test_every_rule_still_has_its_block():
    firsts = set(block.first for block in readme_blocks())
    assert set(RULES) - firsts == set()


def test_the_readme_lists_every_key_as_the_code_makes_the_table():
    with open(README) as readme:
        assert readme_keys.readme_table(readme.read()) == \
            readme_keys.key_table()


def test_the_readmes_links_lead_to_its_parts():
    with open(README) as readme:
        text = readme.read()
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(
            " ", "-"))
    for link in re.findall(r"\]\(#([^)]+)\)", text):
        assert link in anchors, link
