"""The README's table of every configuration key, made from the key table
(KEYS in smtpproxy.py), so that the README says what the code does.

    python3 tests/readme_keys.py            print the table
    python3 tests/readme_keys.py --write    put it in README.md, between
                                            its two markers

tests/test_readme.py checks that README.md holds exactly this text.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import smtpproxy  # noqa: E402

README = os.path.join(ROOT, "README.md")
BEGIN = ("<!-- every key: made by python3 tests/readme_keys.py --write; "
         "do not edit -->")
END = "<!-- end of every key -->"


def _cell(text):
    """Text fit for a cell of a Markdown table."""
    return text.replace("|", "\\|").replace("\n", " ")


def key_table():
    """Every key of KEYS, by the sample configuration's sections: its
    name, its default as --help shows it, and its help."""
    lines = []
    section = None
    for key in smtpproxy.KEYS:
        if key.section != section:
            section = key.section
            if lines:
                lines.append("")
            lines.extend(["**%s**" % section, "",
                          "| key | default | what |", "| --- | --- | --- |"])
        name = "`%s:` (a list)" % key.name if key.kind == "list" else (
            "`%s`" % key.name)
        what = key.help[0].upper() + key.help[1:] + "."
        if key.restart:
            what += " Takes a restart."
        if key.option:
            what += " Also `--%s`." % key.name.replace("_", "-")
        lines.append("| %s | `%s` | %s |" % (
            name, _cell(smtpproxy.shown_default(key)), _cell(what)))
    return "\n".join(lines) + "\n"


def readme_table(text):
    """The table as README.md holds it, between the markers."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write():
    with open(README) as readme:
        text = readme.read()
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    with open(README, "w") as readme:
        readme.write("%s%s\n\n%s\n%s%s" % (before, BEGIN, key_table(), END,
                                          after))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        sys.stdout.write(key_table())
