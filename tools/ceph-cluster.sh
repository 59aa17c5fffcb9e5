#!/bin/bash
# A throw-away single-node Ceph for tests and demos: 1 mon, 1 mgr, 1 OSD on
# 127.0.0.1, no auth unless CEPH_AUTH=cephx, everything under one directory,
# nothing in /etc, /var or /run.  Needs Debian's ceph-mon, ceph-mgr, ceph-osd
# and ceph-common.
#
#   tools/ceph-cluster.sh start DIR [memstore|bluestore]   # prints CEPH_CONF=DIR/ceph.conf
#   tools/ceph-cluster.sh stop DIR                         # clean stop (memstore keeps its data)
#   tools/ceph-cluster.sh stop-osd DIR / start-osd DIR     # the OSD alone (restart tests)
#   tools/ceph-cluster.sh restart DIR                      # the daemons again, on the same data
#   tools/ceph-cluster.sh destroy DIR                      # kill the daemons, remove DIR
#   tools/ceph-cluster.sh kill-osd DIR                     # SIGKILL the OSD
#
# CEPH_MON_PORT (default 3300; the v1 port is the next one, or 6789 for
# the default) lets two clusters run on one host side by side.
#
# CEPH_AUTH=cephx (default none) starts it with cephx: every daemon gets a
# key of its own, and client.admin's keyring is DIR/keyring (the conf's
# [client] keyring, so ceph, rados, rbd and cowblock find it by themselves;
# another client takes --id/--keyring, e.g. in $CEPH_ARGS).
#
# Every client call has a timeout: when no OSD serves a placement group,
# ceph, rados and rbd otherwise wait for ever.
set -euo pipefail
CMD=${1:?usage: $0 start|stop|restart|stop-osd|start-osd|destroy DIR [memstore|bluestore]}
D=${2:?usage: $0 $CMD DIR}
STORE=${3:-memstore}
T=${CEPH_TIMEOUT:-30}
export CEPH_CONF=$D/ceph.conf
MON_V2=${CEPH_MON_PORT:-3300}
MON_V1=$([ "$MON_V2" = 3300 ] && echo 6789 || echo $((MON_V2 + 1)))
AUTH=${CEPH_AUTH:-none}
case $AUTH in none|cephx) ;; *) echo "CEPH_AUTH is none or cephx, not $AUTH" >&2; exit 2 ;; esac

ceph_() { timeout "$T" ceph --connect-timeout "$T" "$@"; }

wait_osd_up() {
    local end=$((SECONDS + 60))
    until ceph_ osd stat 2>/dev/null | grep -q ' 1 up'; do
        [ $SECONDS -lt $end ] || { echo "the OSD did not come up in 60 s; see $D/log" >&2; exit 1; }
        sleep 0.5
    done
}

wait_clean() {   # every placement group active: data operations go through
    local end=$((SECONDS + 120))
    while ceph_ pg stat 2>/dev/null | grep -qvE '^[0-9]+ pgs: [0-9]+ active\+clean;'; do
        [ $SECONDS -lt $end ] || { echo "placement groups not clean in 120 s" >&2; exit 1; }
        sleep 0.5
    done
}

stop_one() {   # SIGTERM and wait: a memstore OSD writes its data out as it stops
    local p
    p=$(cat "$D/run/$1.pid" 2>/dev/null) || return 0
    kill "$p" 2>/dev/null || true
    local end=$((SECONDS + 60))
    while kill -0 "$p" 2>/dev/null; do
        if [ $SECONDS -ge $end ]; then kill -9 "$p" 2>/dev/null || true; fi
        sleep 0.2
    done
    rm -f "$D/run/$1.pid"
}

start_daemons() {
    ceph-mon -i a
    ceph-mgr -i a
    ceph-osd -i 0 2>>"$D/log/osd-start.log"
    wait_osd_up
}

case $CMD in
start)
    command -v ceph-mon >/dev/null || { echo "ceph-mon is missing: apt-get install ceph-mon ceph-mgr ceph-osd ceph-common" >&2; exit 1; }
    [ ! -e "$D/ceph.conf" ] || { echo "$D holds a cluster already (restart or destroy it)" >&2; exit 1; }
    mkdir -p "$D"/{mon,mgr/a,osd/0,run,log}
    FSID=$(uuidgen)
    if [ "$STORE" = bluestore ]; then
        OSDSTORE="osd_objectstore = bluestore
bluestore_block_size = ${CEPH_BLUESTORE_BYTES:-10737418240}
osd_memory_target = 1073741824"
    else
        # osd_fast_shutdown = false: otherwise a memstore OSD drops all its
        # data on stop and the restarted cluster hangs with every PG unknown.
        OSDSTORE="osd_objectstore = memstore
memstore_device_bytes = ${CEPH_MEMSTORE_BYTES:-4294967296}
osd_fast_shutdown = false"
    fi
    # cephx: each daemon's key in its data directory, the admin's in DIR
    if [ "$AUTH" = cephx ]; then
        KEYRING_CLIENT="[client]
keyring = $D/keyring"
        KEYRING_MGR="keyring = \$mgr_data/keyring"
        KEYRING_OSD="keyring = \$osd_data/keyring"
    else
        KEYRING_CLIENT= KEYRING_MGR= KEYRING_OSD=
    fi
    cat > "$CEPH_CONF" <<CONF
[global]
fsid = $FSID
mon_host = [v2:127.0.0.1:$MON_V2,v1:127.0.0.1:$MON_V1]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
auth_cluster_required = $AUTH
auth_service_required = $AUTH
auth_client_required = $AUTH
auth_allow_insecure_global_id_reclaim = false
run_dir = $D/run
pid_file = $D/run/\$name.pid
log_file = $D/log/\$name.log
mon_cluster_log_file = $D/log/cluster.log
mon_data = $D/mon/\$id
mgr_data = $D/mgr/\$id
osd_data = $D/osd/\$id
$OSDSTORE
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
# statistics every second, so that a pool over its quota (or a full
# cluster) is flagged, and its writes refused, in a second or two
mgr_stats_period = 1
osd_mon_report_interval = 1
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 2
mon_data_avail_crit = 1
mgr_initial_modules =
[mon]
admin_socket = $D/run/\$name.asok
[mgr]
admin_socket = $D/run/\$name.asok
$KEYRING_MGR
[osd]
admin_socket = $D/run/\$name.asok
$KEYRING_OSD
$KEYRING_CLIENT
CONF
    monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_V2,v1:127.0.0.1:$MON_V1]" "$D/monmap" >/dev/null
    MON_KEYRING=()
    if [ "$AUTH" = cephx ]; then
        ceph-authtool --create-keyring "$D/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
        ceph-authtool --create-keyring "$D/keyring" --gen-key -n client.admin --cap mon 'allow *' \
            --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
        ceph-authtool "$D/mon.keyring" --import-keyring "$D/keyring" >/dev/null
        MON_KEYRING=(--keyring "$D/mon.keyring")
    fi
    ceph-mon --mkfs -i a --monmap "$D/monmap" "${MON_KEYRING[@]}"
    ceph-mon -i a
    if [ "$AUTH" = cephx ]; then
        ceph_ auth get-or-create mgr.a mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
            -o "$D/mgr/a/keyring"
    fi
    ceph-mgr -i a
    U=$(uuidgen)
    ID=$(ceph_ osd new "$U")
    [ "$ID" = 0 ] || { echo "unexpected OSD id $ID" >&2; exit 1; }
    if [ "$AUTH" = cephx ]; then
        ceph_ auth get-or-create osd.0 mon 'allow profile osd' mgr 'allow profile osd' osd 'allow *' \
            -o "$D/osd/0/keyring"
    fi
    ceph-osd -i 0 --mkfs --osd-uuid "$U" >"$D/log/osd-mkfs.log" 2>&1
    ceph-osd -i 0 2>>"$D/log/osd-start.log"
    wait_osd_up
    # The pool the tests and the demo use: no autoscaler (it would split PGs
    # under the tests), the rbd application so RBD can share it.
    ceph_ osd pool create cowblock 32 32 >/dev/null
    ceph_ osd pool set cowblock pg_autoscale_mode off >/dev/null
    ceph_ osd pool application enable cowblock rbd >/dev/null
    wait_clean
    echo "CEPH_CONF=$CEPH_CONF"
    ;;
stop)
    for n in osd.0 mgr.a mon.a; do stop_one $n; done
    ;;
stop-osd)
    stop_one osd.0
    ;;
kill-osd)
    p=$(cat "$D/run/osd.0.pid") && kill -9 "$p" && while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
    rm -f "$D/run/osd.0.pid"
    ;;
start-osd)
    ceph-osd -i 0 2>>"$D/log/osd-start.log"
    wait_osd_up
    ;;
restart)
    start_daemons
    ;;
destroy)   # nothing is kept, so no clean stop: SIGKILL, wait, remove
    for n in osd.0 mgr.a mon.a; do
        p=$(cat "$D/run/$n.pid" 2>/dev/null) || continue
        kill -9 "$p" 2>/dev/null || true
        while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
    done
    rm -rf "$D"
    ;;
*)
    echo "unknown command $CMD" >&2; exit 2
    ;;
esac
