#!/usr/bin/env bash
# Entrypoint of the dist_bn images (docker/Dockerfile.gpu, docker/Dockerfile.cpu).
#
#   entrypoint.sh worker            run an SSH server in the foreground, so that a
#                                   launcher (horovodrun, mpirun) can start ranks here
#   entrypoint.sh launcher CMD ...  wait until every host in WAIT_FOR accepts TCP
#                                   connections (its SSH server is up), then run CMD
#   entrypoint.sh keygen DIR        create a throwaway key pair in DIR (id_ed25519,
#                                   id_ed25519.pub, authorized_keys) unless one is there
#   entrypoint.sh CMD ...           run CMD (e.g. bash, dist-bn-verify)
#
# Settings (environment):
#   SSH_PORT             port of the SSH server (default 2222)
#   SSH_LISTEN_ADDRESS   address it listens on (default: every address)
#   SSH_KEYS_DIR         mounted keys (default ~/.ssh): its authorized_keys lets the
#                        launcher in; the launcher uses its id_* (or launcher.ssh_identity_file)
#   SSH_AUTHORIZED_KEYS  the public keys file to accept (default $SSH_KEYS_DIR/authorized_keys)
#   SSHD_RUN_DIR         where the server's config, host keys and pid file go
#                        (default /run/dist-bn-sshd); host keys are made on first start
#   SSHD                 the sshd binary (default /usr/sbin/sshd)
#   WAIT_FOR             launcher: "host:port,host:port" to wait for (default: none)
#   WAIT_FOR_HOSTFILE    launcher: also wait for every host of this host file ("host slots=N"
#                        lines, e.g. the MPI Operator's /etc/mpi/hostfile) on SSH_PORT
#   WAIT_TIMEOUT         launcher: seconds to wait for all of them (default 120)
#
# Keys are mounted at run time, never baked into an image. Nothing here edits
# system files: the server runs from its own config in SSHD_RUN_DIR.
set -euo pipefail

log() { printf '[entrypoint] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

SSH_PORT=${SSH_PORT:-2222}
SSH_KEYS_DIR=${SSH_KEYS_DIR:-${HOME:-/root}/.ssh}
SSHD_RUN_DIR=${SSHD_RUN_DIR:-/run/dist-bn-sshd}
SSHD=${SSHD:-/usr/sbin/sshd}

keygen() {
    local dir=${1:?usage: entrypoint.sh keygen DIR}
    mkdir -p "$dir"
    chmod 700 "$dir"
    if [[ ! -f $dir/id_ed25519 ]]; then
        ssh-keygen -q -t ed25519 -N "" -C dist-bn-throwaway -f "$dir/id_ed25519"
        log "made a key pair in $dir"
    fi
    [[ -f $dir/authorized_keys ]] || cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
    chmod 600 "$dir/id_ed25519" "$dir/authorized_keys"
}

worker() {
    if ! [[ $SSH_PORT =~ ^[0-9]+$ ]] || ((SSH_PORT < 1 || SSH_PORT > 65535)); then
        die "SSH_PORT=$SSH_PORT is not a port"
    fi
    [[ -x $SSHD ]] || die "$SSHD not found: install openssh-server"
    local keys=${SSH_AUTHORIZED_KEYS:-$SSH_KEYS_DIR/authorized_keys}
    [[ -s $keys ]] || die "no public keys at $keys: mount the launcher's public key there (or set SSH_AUTHORIZED_KEYS / SSH_KEYS_DIR)"

    mkdir -p "$SSHD_RUN_DIR"
    chmod 700 "$SSHD_RUN_DIR"
    [[ -f $SSHD_RUN_DIR/ssh_host_ed25519_key ]] ||
        ssh-keygen -q -t ed25519 -N "" -C dist-bn-host -f "$SSHD_RUN_DIR/ssh_host_ed25519_key"
    install -m 600 "$keys" "$SSHD_RUN_DIR/authorized_keys"
    # sshd's compiled-in privilege separation directory (the package makes it at boot).
    [[ $(id -u) != 0 || -d /run/sshd ]] || install -d -m 755 /run/sshd

    local config=$SSHD_RUN_DIR/sshd_config
    {
        echo "# Written by docker/entrypoint.sh: key-only SSH for starting ranks."
        echo "Port $SSH_PORT"
        [[ -z ${SSH_LISTEN_ADDRESS:-} ]] || echo "ListenAddress $SSH_LISTEN_ADDRESS"
        echo "HostKey $SSHD_RUN_DIR/ssh_host_ed25519_key"
        echo "PidFile $SSHD_RUN_DIR/sshd.pid"
        echo "AuthorizedKeysFile $SSHD_RUN_DIR/authorized_keys"
        echo "PermitRootLogin prohibit-password"
        echo "PubkeyAuthentication yes"
        echo "PasswordAuthentication no"
        echo "KbdInteractiveAuthentication no"
        echo "UsePAM no"
        # Mounted keys (Kubernetes secrets, volumes) have owners and modes of their own;
        # the copy above is root's and 0600.
        echo "StrictModes no"
        echo "X11Forwarding no"
        echo "PrintMotd no"
        echo "UseDNS no"
        echo "MaxStartups 100:30:200"   # a launcher opens many connections at once
        echo "MaxSessions 100"
        echo "Subsystem sftp internal-sftp"
    } >"$config"
    "$SSHD" -t -f "$config" || die "sshd rejected $config"
    log "sshd listening on ${SSH_LISTEN_ADDRESS:-*}:$SSH_PORT (keys from $keys)"
    exec "$SSHD" -D -e -f "$config"
}

wait_for() {
    local deadline=$((SECONDS + ${WAIT_TIMEOUT:-120})) target host port line
    local -a targets=()
    local wait_for=${WAIT_FOR:-}
    for target in ${wait_for//,/ }; do
        targets+=("$target")
    done
    if [[ -n ${WAIT_FOR_HOSTFILE:-} ]]; then
        [[ -r $WAIT_FOR_HOSTFILE ]] || die "WAIT_FOR_HOSTFILE=$WAIT_FOR_HOSTFILE cannot be read"
        while read -r line; do
            line=${line%%#*}
            [[ -z ${line// /} ]] || targets+=("${line%% *}:$SSH_PORT")
        done <"$WAIT_FOR_HOSTFILE"
    fi
    for target in "${targets[@]}"; do
        host=${target%:*}
        port=${target##*:}
        [[ $host != "$target" && $port =~ ^[0-9]+$ ]] || die "WAIT_FOR entry '$target' must be host:port"
        until timeout 2 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; do
            ((SECONDS < deadline)) || die "$host:$port did not accept connections within ${WAIT_TIMEOUT:-120} s"
            sleep 1
        done
        log "$host:$port is up"
    done
}

(($#)) || set -- bash
role=$1
case $role in
    worker | sshd)
        (($# <= 1)) || die "worker takes no arguments, got: ${*:2}"
        worker
        ;;
    launcher)
        shift
        (($#)) || die "usage: entrypoint.sh launcher CMD ..."
        [[ -z ${WAIT_FOR:-}${WAIT_FOR_HOSTFILE:-} ]] || wait_for
        exec "$@"
        ;;
    keygen)
        shift
        keygen "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
