"""--help is the admin's manual: every option and every key, and none of the
developer's map (the design, the hooks table, the reading order), which is
the comment "# == The map ==" after the imports.  __all__ names what that
map and the README document as public."""

import argparse
import inspect
import os
import re

import smtpproxy

SOURCE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "smtpproxy.py")


def help_text(capsys):
    assert smtpproxy.main(["--help"]) == 0
    return capsys.readouterr().out


def the_parser(monkeypatch):
    """The parser main() builds, caught as it parses (argv: --help)."""
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args

    def catching(self, *args, **kwargs):
        parsers.append(self)
        return parse_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catching)
    smtpproxy.main(["--help"])
    return parsers[0]


def the_map():
    """The comment block "# == The map ==", its lines without the "# "."""
    lines = []
    with open(SOURCE) as source:
        inside = False
        for line in source:
            if line.startswith("# == The map =="):
                inside = True
            elif inside and not line.startswith("#"):
                break
            if inside:
                lines.append(line[2:].rstrip("\n"))
    assert lines, "no '# == The map ==' comment in smtpproxy.py"
    return lines


def paragraph(lines, opening, table=False):
    """The lines from the one that begins ``opening`` to the next empty
    one; with ``table``, and the table after that empty line."""
    start = next(i for i, line in enumerate(lines)
                 if line.startswith(opening))
    found, parts = [], 2 if table else 1
    for line in lines[start:]:
        if not line.strip():
            parts -= 1
            if not parts:
                break
            continue
        found.append(line)
    return found


def hooks_table():
    """The rows of the hooks table: (group, text)."""
    lines = paragraph(the_map(), "Hooks", table=True)
    rows = [line for line in lines if line.startswith("  ")]
    assert len(rows) > 10, rows
    return rows


def test_help_holds_every_option(capsys, monkeypatch):
    parser = the_parser(monkeypatch)
    text = help_text(capsys)
    options = [option for action in parser._actions
               for option in action.option_strings]
    assert "--db-pass" in options and "--grace-period" in options
    for option in options:
        assert re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(option),
                         text), option


def test_help_holds_every_key_with_its_default_under_its_section(capsys):
    # Each key's help is --sample-config's: --help names the key, its
    # default and its section, for an admin looking for a name.
    text = " ".join(help_text(capsys).split())
    for key in smtpproxy.KEYS:
        item = re.search(r"[;:] %s \(%s\)" % (
            re.escape(key.name), re.escape(smtpproxy.shown_default(key))),
            text)
        assert item, key.name
        assert item.start() > text.index(" %s: " % key.section), key.name
    assert "--sample-config" in text


def test_help_holds_the_signals_and_exit_statuses(capsys):
    text = help_text(capsys)
    for word in ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2",
                 "Exit status", "Files:"):
        assert word in text


def test_help_holds_none_of_the_developers_map(capsys):
    text = " ".join(help_text(capsys).split())
    for row in hooks_table():
        assert " ".join(row.split()) not in text, row
    for opening in ("Design.", "The module reads top to bottom",
                    "Programmatic use"):
        assert opening not in text
    # ... but says where the hooks are, in one line.
    assert '"# Hooks"' in text
    assert any(line.startswith("Hooks:") for line in the_map())


def test_every_name_in_all_exists():
    for name in smtpproxy.__all__:
        assert hasattr(smtpproxy, name), name
        assert not name.startswith("_"), name


def test_every_class_the_map_documents_is_in_all():
    lines = the_map()
    documented = " ".join(paragraph(lines, "Design.", table=True)
                          + paragraph(lines, "With policy_listen")
                          + hooks_table())
    classes = set(name for name in re.findall(r"\b[A-Z]\w+\b", documented)
                  if inspect.isclass(getattr(smtpproxy, name, None)))
    assert {"Greylister", "PolicyHandler", "PostgreSQLStore",
            "UpstreamRelay", "DataScanner"} <= classes
    missing = classes - set(smtpproxy.__all__)
    assert not missing
