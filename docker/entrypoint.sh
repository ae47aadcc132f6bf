#!/bin/sh
# datalakefs sidecar entrypoint: clean a stale mount, mount, and unmount on SIGTERM/SIGINT.
#
#   entrypoint.sh [datalakefs mount options...]      e.g.  entrypoint.sh -o scopes=user.jdoe
#
# Environment:
#   DATALAKEFS_MOUNTPOINT   where to mount (default /lake; share it with the notebook container
#                           through a volume with Bidirectional mount propagation)
#   DATALAKEFS_CONFIG       datalakefs TOML config (default: ~/.config/datalakefs/config.toml)
#   RUCIO_CONFIG            the rucio.cfg the catalogue uses (its auth: userpass, x509, oidc token file)
#   BEARER_TOKEN_FILE       the storage token, refreshed by another container (re-read when it changes)
#   DATALAKEFS              the datalakefs command (default: datalakefs)
#   DATALAKEFS_STOP_TIMEOUT seconds to wait for a clean unmount before a lazy one (default 30)
#
# The daemon runs in the foreground as a child of this script (logs on stderr, one key=value line per
# event). On SIGTERM (pod deletion) the signal is passed on: the daemon unmounts and exits; if it has
# not exited after DATALAKEFS_STOP_TIMEOUT seconds, the mount is detached lazily so the notebook
# container never keeps a dead mount. The exit status is the daemon's.
set -u

MOUNTPOINT=${DATALAKEFS_MOUNTPOINT:-/lake}
DATALAKEFS=${DATALAKEFS:-datalakefs}
STOP_TIMEOUT=${DATALAKEFS_STOP_TIMEOUT:-30}

log() { echo "ts=$(date -u +%Y-%m-%dT%H:%M:%SZ) level=INFO logger=entrypoint $*" >&2; }

is_mounted() {
    # a FUSE mount at $1 (not the volume it sits on: a pod's /lake is itself a bind mount).
    # /proc/self/mountinfo field 5 is the mount point (octal escapes for spaces), the field after "-"
    # the type; never stat the mount itself: a stale FUSE mount answers ENOTCONN
    awk -v mp="$1" '{ gsub(/\\040/, " ", $5); for (i = 7; $i != "-"; i++) ; if ($5 == mp && $(i + 1) ~ /^fuse/) found = 1 }
        END { exit !found }' /proc/self/mountinfo
}

if is_mounted "$MOUNTPOINT"; then
    log "event=stale-mount mountpoint=$MOUNTPOINT action=lazy-unmount"
    fusermount3 -uz "$MOUNTPOINT" 2>/dev/null || umount -l "$MOUNTPOINT"
fi
mkdir -p "$MOUNTPOINT"

$DATALAKEFS mount --foreground "$@" "$MOUNTPOINT" &
child=$!

watchdog=
stop() {
    log "event=stop mountpoint=$MOUNTPOINT pid=$child"
    kill -TERM "$child" 2>/dev/null
    # the daemon unmounts on SIGTERM; if it has not after STOP_TIMEOUT, detach the mount and kill it
    (
        waited=0
        while [ "$waited" -lt "$STOP_TIMEOUT" ]; do sleep 1; waited=$((waited + 1)); done
        if is_mounted "$MOUNTPOINT"; then
            log "event=stop-timeout mountpoint=$MOUNTPOINT action=lazy-unmount"
            fusermount3 -uz "$MOUNTPOINT" 2>/dev/null || umount -l "$MOUNTPOINT"
        fi
        kill -KILL "$child" 2>/dev/null
    ) &
    watchdog=$!
}
trap stop TERM INT

# `wait` returns early (status > 128) when a trapped signal arrives while the daemon still runs:
# then wait again, until the daemon's own exit status is known
status=0
while :; do
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break
done
if [ -n "$watchdog" ]; then kill "$watchdog" 2>/dev/null; fi
log "event=exit mountpoint=$MOUNTPOINT status=$status"
exit "$status"
