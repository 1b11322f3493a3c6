#!/usr/bin/env bash
# Install what tests/slurm/start.sh needs: Debian's Slurm 22.05 (slurmctld, slurmd, client) and munge.
# Idempotent; ~15 s on a fresh Debian/Ubuntu machine. Needs root (or sudo) and apt.
#   bash tests/slurm/install.sh               # Slurm only (tests use jobcomp, not sacct)
#   SLURM_WITH_DBD=1 bash tests/slurm/install.sh   # + slurmdbd and mariadb, for sacct
set -euo pipefail
need=()
command -v munged >/dev/null || need+=(munge)
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
if [ "${SLURM_WITH_DBD:-0}" = 1 ]; then
  command -v slurmdbd >/dev/null || need+=(slurmdbd)
  command -v mariadbd >/dev/null || need+=(mariadb-server)
fi
[ ${#need[@]} -eq 0 ] && { echo "slurm: already installed ($(dpkg-query -W -f '${Version}' slurm-client 2>/dev/null || echo '?'))"; exit 0; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
command -v apt-get >/dev/null || { echo "error: apt-get not found: install ${need[*]} with your package manager" >&2; exit 1; }
echo "slurm: installing ${need[*]}"
# keep the packages' init scripts from starting their own munge/slurm daemons (start.sh starts its own)
tmp_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null; $SUDO chmod +x /usr/sbin/policy-rc.d; tmp_policy=1
fi
trap '[ "$tmp_policy" = 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d' EXIT
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "slurm: installed ($(dpkg-query -W -f '${Version}' slurm-client))"
