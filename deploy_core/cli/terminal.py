"""Text from scripts and records, made safe to print on an operator's terminal.

A deployment's output, error and stage come from scripts that whoever holds a ``deploy``
token wrote.  Printed raw, their control sequences act on the terminal of the person reading
them: ``ESC ] 52`` writes the clipboard, ``ESC [ 2J`` clears the screen, ``\\r`` overwrites
what was printed.  :func:`terminal_safe` shows them escaped instead (``\\x1b]52;…``).
"""

from __future__ import annotations

# Every C0 control but newline and tab, DEL, and every C1 control, as a visible \xNN.
_ESCAPES = {
    code: f"\\x{code:02x}"
    for code in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0))
    if code not in (0x0A, 0x09)
}


def terminal_safe(text: object) -> str:
    """``text`` (a string, or anything ``str()`` turns into one) with C0/C1 control characters
    other than newline and tab shown as ``\\xNN`` escapes, so it cannot move the cursor,
    change colours, set the title or the clipboard when printed.

    Every ``deployctl`` command (and plugins' commands) prints text that came from the server
    through this: log lines, errors, stages, result fields, client ids.
    """
    return str(text).translate(_ESCAPES)
