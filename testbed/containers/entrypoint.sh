#!/bin/sh
# edgeagent-node: one testbed node's entrypoint (testbed/containers; runs under docker's init).
#
# The first start of the issuer node (EA_ROLE=issuer) creates the cluster ('edgeagent init'),
# starts the agent and, once it answers, writes a join token to /shared/token (no issuer
# address in it when EA_TOKEN_MODE=mdns: joiners find the issuer by mDNS). The first start of a
# member waits for that file and enrolls with it ('edgeagent join', retried). Every later start
# (docker start after a stop or kill) finds the material in the state dir and only runs the
# agent. Environment: EA_NAME (required), EA_ROLE issuer|member, EA_CLUSTER, EA_TOKEN_MODE
# mdns|address, EA_RUN_ARGS (more 'edgeagent run' flags), EA_WAIT_S (token wait, default 120).
set -eu

STATE=/var/lib/edgeagent
SHARED=/shared
NAME=${EA_NAME:?EA_NAME is not set}
WAIT_S=${EA_WAIT_S:-120}

run_agent() {
    # shellcheck disable=SC2086 # EA_RUN_ARGS is a list of flags
    exec edgeagent run --name "$NAME" --state-dir "$STATE" --bind 0.0.0.0:7946 ${EA_RUN_ARGS:-}
}

publish_token() {
    address=--no-address
    [ "${EA_TOKEN_MODE:-mdns}" = address ] && address=
    i=0
    while [ "$i" -lt "$WAIT_S" ]; do
        # shellcheck disable=SC2086 # $address is empty or one flag
        if edgeagent token create --state-dir "$STATE" --ttl 24h $address >"$SHARED/token.tmp" 2>/dev/null; then
            mv -f "$SHARED/token.tmp" "$SHARED/token"
            echo "edgeagent-node: join token written to $SHARED/token" >&2
            return 0
        fi
        i=$((i + 1))
        sleep 1
    done
    echo "edgeagent-node: the agent never answered; no join token written" >&2
}

if [ -f "$STATE/keyring" ]; then
    run_agent
fi

case "${EA_ROLE:-member}" in
issuer)
    edgeagent init --name "$NAME" --cluster "${EA_CLUSTER:-edgeagent}" --state-dir "$STATE" \
        --bind 0.0.0.0:7946 >/dev/null
    publish_token &
    run_agent
    ;;
member)
    i=0
    while [ ! -s "$SHARED/token" ]; do
        i=$((i + 1))
        if [ "$i" -gt "$WAIT_S" ]; then
            echo "edgeagent-node: no join token in $SHARED/token after ${WAIT_S} s" >&2
            exit 2
        fi
        sleep 1
    done
    i=0
    until edgeagent join --name "$NAME" --state-dir "$STATE" - <"$SHARED/token"; do
        i=$((i + 1))
        if [ "$i" -ge 30 ]; then
            echo "edgeagent-node: enrollment failed 30 times; giving up" >&2
            exit 2
        fi
        sleep 2
    done
    run_agent
    ;;
*)
    echo "edgeagent-node: EA_ROLE must be issuer or member, not '$EA_ROLE'" >&2
    exit 2
    ;;
esac
