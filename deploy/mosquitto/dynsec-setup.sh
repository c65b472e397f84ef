#!/bin/sh
# Creates the broker accounts around the gateway in Mosquitto's dynamic security plugin
# (a broker running dynamic-security.conf). Device accounts are not made here: the
# gateway creates them (POST /v1/devices/{id}/credentials).
#
#   dynsec-setup.sh gateway PASSWORD [TOPIC_PREFIX]
#       The gateway's account, username "gateway". Its role receives heartbeats and
#       requests, sends commands, settings, replies and events, and administers the plugin
#       (device accounts). Shared subscriptions (GATEWAY_SHARE_GROUP) are allowed.
#   dynsec-setup.sh backend NAME PASSWORD [TOPIC_PREFIX]
#       A backend service, username NAME: publishes requests, receives replies on
#       api/v1/replies/NAME/... only (name its reply topics so), and receives events
#       (events/v1/#, shared subscriptions included).
#
# mosquitto_ctrl's connection options come from MOSQUITTO_CTRL_OPTS (default
# "-h 127.0.0.1 -u admin"; add "-P ADMIN_PASSWORD", or it asks). Safe to run again:
# existing roles, ACLs and clients are kept ("already exists" errors) and the password
# is set anew.
set -eu

usage() {
    echo "usage: $0 gateway PASSWORD [TOPIC_PREFIX] | backend NAME PASSWORD [TOPIC_PREFIX]" >&2
    exit 2
}

ctl() {
    # mosquitto_ctrl exits 0 whatever happens: read what it says instead.
    # shellcheck disable=SC2086 # the options are meant to split into words
    out=$(mosquitto_ctrl ${MOSQUITTO_CTRL_OPTS:--h 127.0.0.1 -u admin} dynsec "$@" 2>&1 \
        | grep -v -e '^Warning: You are running mosquitto_ctrl without encryption' \
                  -e '^This means all of the configuration changes' -e '^$' || true)
    [ -z "$out" ] || echo "$out"
    case "$out" in
        *"Connection error"* | *"Connection refused"* | *"Error: Timed out"*)
            echo "$0: cannot administer the broker; check MOSQUITTO_CTRL_OPTS" >&2
            exit 1
            ;;
    esac
}

account() {  # username password role
    ctl createRole "$3"
    ctl createClient "$1" -p "$2"
    ctl setClientPassword "$1" "$2"
    ctl addClientRole "$1" "$3"
}

[ $# -ge 1 ] || usage
kind=$1
shift
case "$kind" in
    gateway)
        [ $# -ge 1 ] && [ $# -le 2 ] || usage
        password=$1
        p=${2:+$2/}
        account gateway "$password" gateway
        for filter in "${p}devices/+/heartbeat" "${p}api/v1/requests"; do
            ctl addRoleACL gateway subscribePattern "$filter" allow
            ctl addRoleACL gateway subscribePattern "\$share/+/$filter" allow
        done
        # Each gateway connection's own barrier topic, for draining on shutdown.
        ctl addRoleACL gateway subscribePattern "${p}gateway/barrier/#" allow
        ctl addRoleACL gateway publishClientSend "${p}gateway/barrier/#" allow
        ctl addRoleACL gateway subscribePattern '$CONTROL/dynamic-security/#' allow
        # The plugin's answers are not covered by the default "receive: allow".
        ctl addRoleACL gateway publishClientReceive '$CONTROL/dynamic-security/#' allow
        ctl addRoleACL gateway publishClientSend "${p}devices/+/commands" allow
        ctl addRoleACL gateway publishClientSend "${p}devices/+/settings" allow
        ctl addRoleACL gateway publishClientSend "${p}api/v1/replies/#" allow
        ctl addRoleACL gateway publishClientSend "${p}events/v1/#" allow
        ctl addRoleACL gateway publishClientSend '$CONTROL/dynamic-security/v1' allow
        ;;
    backend)
        [ $# -ge 2 ] && [ $# -le 3 ] || usage
        name=$1
        password=$2
        p=${3:+$3/}
        account "$name" "$password" "backend:$name"
        ctl addRoleACL "backend:$name" publishClientSend "${p}api/v1/requests" allow
        ctl addRoleACL "backend:$name" subscribePattern "${p}api/v1/replies/$name/#" allow
        ctl addRoleACL "backend:$name" subscribePattern "${p}events/v1/#" allow
        ctl addRoleACL "backend:$name" subscribePattern "\$share/+/${p}events/v1/#" allow
        ;;
    *)
        usage
        ;;
esac
