#!/usr/bin/env bash
# Prepares the head of cluster/local.yaml: an sshd of the cluster's own that ssh starts for each connection (inetd
# mode, the `ssh_proxy_command` of local.yaml). Nothing listens on a port and nothing outlives a connection; no
# system sshd, ~/.ssh/authorized_keys or dotfile of yours is needed or changed. A login on this head gets
# HOME=<STATE>/home (where Ray keeps its bootstrap files and `ray submit` its script; the sweep writes runs/ and
# mlflow.db there) and a ~/.bashrc there that puts this checkout's .venv first on PATH and turns on Ray's token
# authentication, so `ray submit` runs the script with the venv's python and the cluster reuses the checkout's
# installed environment.
#
#   bash cluster/local-head.sh [STATE]          # STATE defaults to .local-head (what local.yaml names)
#
# Idempotent: keys are made once; the config is rewritten. RAY_TMPDIR, when set here, is passed on to the head.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state=$(realpath -m "${1:-$root/.local-head}")
venv="$root/.venv"
[ -x "$venv/bin/ray" ] || { echo "local-head: $venv/bin/ray missing: run 'bash .ci/install' first" >&2; exit 1; }
for tool in /usr/sbin/sshd rsync ssh-keygen; do
  command -v "$tool" > /dev/null || { echo "local-head: $tool missing: apt-get install openssh-server rsync" >&2; exit 1; }
done
if [ "$(id -u)" = 0 ] && [ ! -d /run/sshd ]; then
  mkdir -m 755 /run/sshd  # sshd's privilege-separation folder (the package's service makes it at boot)
fi
mkdir -p "$state/home"
chmod 700 "$state"
[ -f "$state/host_key" ] || ssh-keygen -q -t ed25519 -N '' -C clipzss-local-head -f "$state/host_key"
[ -f "$state/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C clipzss-local-user -f "$state/id_ed25519"
cp "$state/id_ed25519.pub" "$state/authorized_keys"
cat > "$state/sshd_config" <<CONFIG
HostKey $state/host_key
AuthorizedKeysFile $state/authorized_keys
AllowUsers $(id -un)
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
SetEnv HOME=$state/home${RAY_TMPDIR:+ RAY_TMPDIR=$RAY_TMPDIR}
CONFIG
cat > "$state/home/.bashrc" <<BASHRC
# written by cluster/local-head.sh: the head's login shells use the checkout's environment
. "$venv/bin/activate"
export PYTHONPATH="$root"  # this checkout's clipzss, also where .venv is shared with another checkout
export RAY_AUTH_MODE=token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # Ray's switch that keeps the addresses it resolves on loopback
cd "\$HOME"  # sshd starts sessions in your passwd home: the sweep writes runs/ and mlflow.db here instead
BASHRC
echo "local head ready in $state (ssh user $(id -un)); now: ray up -y cluster/local.yaml"
