"""``manage.py selfheal_fix``: move sequences past their table's keys."""

from __future__ import annotations

from ..._commands import SequenceCommand


class Command(SequenceCommand):
    """Move every sequence behind its table's keys past them; never backwards.

    Exit codes, as ``selfheal fix``: 0 all in sync afterwards, 1 drift left
    (``--dry-run``), 2 error.
    """

    help = ("Move id sequences behind their table's keys past them; never backwards."
            " Exit code 0 all in sync afterwards, 1 drift left (--dry-run), 2 error.")
    fix = True
