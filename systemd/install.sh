#!/bin/sh
# Install (or remove) the taxonedge service on a device: system user, directories, config, systemd unit,
# Coral udev rule. Safe to run again: files that are ours are refreshed, the operator's config,
# credentials and state are never overwritten.
#
#   sudo systemd/install.sh                      install into / and enable the service
#   sudo systemd/install.sh --start              ... and (re)start it now
#   systemd/install.sh --root /mnt/image         install into an image or staging tree (nothing runs there)
#   sudo systemd/install.sh --uninstall          remove unit, udev rule, sysusers entry; keep config and state
#   sudo systemd/install.sh --uninstall --purge  ... and delete /etc/taxonedge, /var/lib/taxonedge, the user
#
# The program itself is not installed here; see docs/deploy-device.md (`pip install 'taxonedge[edge]'`
# into /opt/taxonedge, or --exec PATH for another location).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=/
ACTION=install
PURGE=0
ENABLE=1
START=0
EXEC=/opt/taxonedge/bin/taxonedge
EXAMPLE=$HERE/config.example.toml

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    cat <<EOF

Options:
  --root DIR        operate on the tree under DIR instead of the running system (no systemctl/udevadm
                    calls except 'systemctl --root enable')
  --uninstall       remove what install added (config, credentials and state are kept)
  --purge           with --uninstall: also delete config, credentials, state and the taxonedge user
  --exec PATH       the taxonedge executable ExecStart runs (default $EXEC)
  --config-example FILE   the commented config copied to /etc/taxonedge/config.toml when none exists
                    (default $EXAMPLE)
  --no-enable       install files but do not enable the service
  --start           (re)start the service after installing (live system only)
  -h, --help        this help
EOF
}

die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#--root=}; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        --exec) [ $# -ge 2 ] || die "--exec needs a path"; EXEC=$2; shift 2 ;;
        --config-example) [ $# -ge 2 ] || die "--config-example needs a file"; EXAMPLE=$2; shift 2 ;;
        --no-enable) ENABLE=0; shift ;;
        --start) START=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

[ -d "$ROOT" ] || die "--root $ROOT is not a directory"
ROOT=$(cd "$ROOT" && pwd)
LIVE=0
[ "$ROOT" = / ] && LIVE=1
[ "$PURGE" = 0 ] || [ "$ACTION" = uninstall ] || die "--purge only goes with --uninstall"
[ "$START" = 0 ] || [ "$LIVE" = 1 ] || die "--start needs the live system (no --root)"
case "$EXEC" in /*) ;; *) die "--exec must be an absolute path (systemd requires it): $EXEC" ;; esac
# Paths below are written as "$R/etc/..."; R is empty for the live system.
R=${ROOT%/}

UNIT=$R/etc/systemd/system/taxonedge.service
UDEV=$R/etc/udev/rules.d/99-coral-edgetpu.rules
SYSUSERS=$R/usr/lib/sysusers.d/taxonedge.conf
CONF_DIR=$R/etc/taxonedge
STATE_DIR=$R/var/lib/taxonedge

# Ownership needs root; an unprivileged run against --root (image builds in CI) keeps the caller's owner.
if [ "$(id -u)" = 0 ]; then AS_ROOT=1; else AS_ROOT=0; fi
[ "$AS_ROOT" = 1 ] || [ "$LIVE" = 0 ] || die "installing into the running system needs root (sudo)"

# Look the service user up in the target tree's own /etc/passwd: the image's ids, not the build host's.
lookup_id() { awk -F: -v n=taxonedge '$1 == n { print $3 }' "$R/etc/$1" 2>/dev/null; }

# install(1) -C rewrites a file only when its content or mode changed, so repeated runs are no-ops.
put() {  # put MODE OWNER GROUP SRC DEST
    if [ "$AS_ROOT" = 1 ]; then
        install -C -D -m "$1" -o "$2" -g "$3" "$4" "$5"
    else
        install -C -D -m "$1" "$4" "$5"
    fi
}
mkdir_owned() {  # mkdir_owned MODE OWNER GROUP DIR
    if [ "$AS_ROOT" = 1 ]; then
        install -d -m "$1" -o "$2" -g "$3" "$4"
    else
        install -d -m "$1" "$4"
    fi
}

systemctl_target() {
    if [ "$LIVE" = 1 ]; then systemctl "$@"; else systemctl --root="$ROOT" "$@"; fi
}

do_install() {
    [ -f "$EXAMPLE" ] || die "config example $EXAMPLE not found (--config-example FILE)"
    command -v systemd-sysusers >/dev/null || die "systemd-sysusers not found: this needs a systemd system"

    # 1. The system user and group, declared the systemd way so images and live systems agree.
    put 0644 0 0 "$HERE/taxonedge.sysusers" "$SYSUSERS"
    mkdir -p "$R/etc"
    if [ "$LIVE" = 1 ]; then systemd-sysusers "$SYSUSERS"; else systemd-sysusers --root="$ROOT" "$SYSUSERS"; fi
    uid=$(lookup_id passwd); gid=$(lookup_id group)
    [ -n "$uid" ] && [ -n "$gid" ] || die "systemd-sysusers did not create user taxonedge in $R/etc/passwd"
    say "user taxonedge ($uid:$gid)"

    # 2. Directories. Config is root-owned and group-readable: the service reads it but cannot change it.
    mkdir_owned 0750 0 "$gid" "$CONF_DIR"
    mkdir_owned 0750 0 "$gid" "$CONF_DIR/tls"
    mkdir_owned 0750 "$uid" "$gid" "$STATE_DIR"

    # 3. Config from the commented example, only when there is none: the operator's edits survive.
    if [ -e "$CONF_DIR/config.toml" ]; then
        say "kept existing $CONF_DIR/config.toml"
    else
        put 0640 0 "$gid" "$EXAMPLE" "$CONF_DIR/config.toml"
        say "installed $CONF_DIR/config.toml from $(basename "$EXAMPLE"): edit it (lines marked EDIT)"
    fi
    # The broker password: root-only; the unit hands it to the daemon with LoadCredential=, which fails
    # the start when the file is missing, so an empty one is created for the operator to fill in.
    if [ ! -e "$CONF_DIR/mqtt-password" ]; then
        (umask 077; : > "$CONF_DIR/mqtt-password")
        say "created empty $CONF_DIR/mqtt-password (0600): write the device's broker password into it"
    fi
    [ "$AS_ROOT" = 0 ] || chown 0:0 "$CONF_DIR/mqtt-password"
    chmod 0600 "$CONF_DIR/mqtt-password"

    # 4. Unit and udev rule (ours: refreshed on every run).
    tmp=$(mktemp)
    trap 'rm -f "$tmp"' EXIT
    sed "s#^ExecStart=/opt/taxonedge/bin/taxonedge #ExecStart=$EXEC #" "$HERE/taxonedge.service" > "$tmp"
    put 0644 0 0 "$tmp" "$UNIT"
    put 0644 0 0 "$HERE/99-coral-edgetpu.rules" "$UDEV"
    say "installed $UNIT and $UDEV"
    [ -x "$R$EXEC" ] || say "warning: $EXEC is not installed yet (see docs/deploy-device.md)"

    # 5. Activate.
    if [ "$LIVE" = 1 ]; then
        systemctl daemon-reload
        if command -v udevadm >/dev/null; then
            udevadm control --reload-rules
            udevadm trigger --subsystem-match=usb --subsystem-match=apex || true
        fi
    fi
    if [ "$ENABLE" = 1 ]; then
        systemctl_target enable taxonedge.service
    fi
    if [ "$START" = 1 ]; then
        systemctl restart taxonedge.service
        say "started; follow it with: journalctl -u taxonedge -f"
    elif [ "$LIVE" = 1 ]; then
        say "next: edit /etc/taxonedge/config.toml, then: systemctl restart taxonedge"
    fi
}

do_uninstall() {
    if [ -e "$UNIT" ]; then
        if [ "$LIVE" = 1 ]; then
            systemctl disable --now taxonedge.service || true
        else
            systemctl --root="$ROOT" disable taxonedge.service || true
        fi
    fi
    rm -f "$UNIT" "$UDEV" "$SYSUSERS"
    say "removed unit, udev rule and sysusers entry"
    if [ "$LIVE" = 1 ]; then
        systemctl daemon-reload
        ! command -v udevadm >/dev/null || udevadm control --reload-rules
    fi
    if [ "$PURGE" = 1 ]; then
        rm -rf "$CONF_DIR" "$STATE_DIR"
        if [ "$AS_ROOT" = 0 ]; then
            # userdel/groupdel must read the image's /etc/shadow and /etc/gshadow (mode 0000): root only.
            say "purged $CONF_DIR and $STATE_DIR; kept user taxonedge: deleting it needs root"
            return
        fi
        if [ -n "$(lookup_id passwd)" ]; then
            if [ "$LIVE" = 1 ]; then userdel taxonedge; else userdel --prefix "$ROOT" taxonedge; fi
        fi
        # userdel removes the user's own group only when nothing else uses it.
        if [ -n "$(lookup_id group)" ]; then
            if [ "$LIVE" = 1 ]; then groupdel taxonedge; else groupdel --prefix "$ROOT" taxonedge; fi
        fi
        say "purged $CONF_DIR, $STATE_DIR and user taxonedge"
    else
        say "kept $CONF_DIR, $STATE_DIR and user taxonedge (--purge deletes them)"
    fi
}

if [ "$ACTION" = install ]; then do_install; else do_uninstall; fi
