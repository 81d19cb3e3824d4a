"""Text from outside (S3 keys, table items, files, error messages, the command line) made inert for a terminal.

S3 keys are chosen by whoever uploads, and a key may hold any character: ESC starts sequences that clear the
screen, set the window title or open hyperlinks (OSC 8), and bidi controls such as U+202E reverse what follows.
Every human-readable line the CLI prints passes such text through ``inert``, which shows each character Python
does not call printable (C0 and C1 controls, DEL, bidi and other format characters, line and paragraph separators,
non-space blanks) as its Python escape (``\\x1b``, ``\\n``, ``\\u202e``) and leaves the rest as it is. Rich markup
is made inert by never handing rich such text as markup (``output.py`` prints it as ``rich.text.Text``).

A backslash is left as it is, so a key that holds the four characters ``\\x1b`` reads like one holding ESC; either
way nothing reaches the terminal but printable characters. JSON output needs none of this: ``json.dumps`` escapes
every control and non-ASCII character."""

from __future__ import annotations

import logging


def inert(text: str) -> str:
    """``text`` with every non-printable character shown as its Python escape, e.g. ESC as ``\\x1b``."""
    if text.isprintable():
        return text
    return "".join(character if character.isprintable() else visible_escape(character) for character in text)


def visible_escape(character: str) -> str:
    """The escape Python's ``repr`` writes for one character (``\\t``, ``\\x1b``, ``\\u202e``, ``\\U000e0041``)."""
    return repr(character)[1:-1]


class InertFormatter(logging.Formatter):
    """A log formatter whose lines (message, and traceback when there is one) carry no control character but the
    line breaks between them."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(inert(line) for line in super().format(record).split("\n"))
