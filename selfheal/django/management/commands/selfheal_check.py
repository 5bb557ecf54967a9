"""``manage.py selfheal_check``: report sequences behind their table's keys."""

from __future__ import annotations

from ..._commands import SequenceCommand


class Command(SequenceCommand):
    """Report sequences behind their table's keys; moves nothing.

    Exit codes, as ``selfheal check``: 0 all in sync, 1 drift found, 2 error.
    """

    help = ("Report id sequences behind their table's keys; moves nothing."
            " Exit code 0 all in sync, 1 drift found, 2 error.")
