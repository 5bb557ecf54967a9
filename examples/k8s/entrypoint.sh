#!/bin/sh
# Container entrypoint snippet: heal sequences before the app starts when
# asked to, e.g. on a staging environment freshly restored from production.
#
#   SELFHEAL_FIX_ON_START=1         run `selfheal fix` on $DATABASE_URL first
#   SELFHEAL_FIX_ARGS="--databases tenant%"   extra arguments (word-split)
#   SELFHEAL_GUARD_ON_START=1       then `selfheal guard install` (same arguments;
#                                   needs the tables' owner or TRIGGER privilege)
#
# A restore is the case the guard cannot see (pg_restore --data-only
# --disable-triggers, session_replication_role = replica): run `fix` after it,
# guard or no guard.
#
# Use it as the image's ENTRYPOINT, with the app as CMD:
#   ENTRYPOINT ["/entrypoint.sh"]
#   CMD ["gunicorn", "app:wsgi"]
set -eu

case "${SELFHEAL_FIX_ON_START:-0}" in
  1|true|yes)
    # An error (exit 2: database unreachable, lock timeout) stops the start:
    # the app would fail on the same database, and a restart retries both.
    # shellcheck disable=SC2086  # SELFHEAL_FIX_ARGS is meant to be word-split
    selfheal fix ${SELFHEAL_FIX_ARGS:-}
    ;;
esac

case "${SELFHEAL_GUARD_ON_START:-0}" in
  1|true|yes)
    # Idempotent: a guarded table is left as it is.
    # shellcheck disable=SC2086
    selfheal guard install ${SELFHEAL_FIX_ARGS:-}
    ;;
esac

exec "$@"
