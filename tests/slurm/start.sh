#!/usr/bin/env bash
# Start a real single-host Slurm cluster (no systemd) for CI tests (tests/test_slurm.py) and local trials of slurm/.
# The project's copy of shared/slurm-local/start.sh: packages come from tests/slurm/install.sh, and accounting
# (slurmdbd + mariadb, for sacct) is off by default since the tests read job states from scontrol / jobcomp.
# Idempotent: installs packages if missing, (re)writes config, starts only daemons not already running,
# and waits until every node is idle.
#
# Env knobs:
#   SLURM_ROOT=/tmp/skipgpt-slurm   everything (config, state, logs, pid files) lives here
#   SLURM_NODES=2                number of emulated nodes n1..nN (all on this host, distinct slurmd ports)
#   SLURM_PARTITIONS="debug gpu" partitions (first is default), each containing all nodes; "name:TIER" gives a
#                                PriorityTier and turns on preempt/partition_prio with PreemptMode=REQUEUE
#   SLURM_CPUS_PER_NODE=$(nproc)  CPUs each emulated node declares (more than the host has lets more tiny jobs run
#                                at once; slurmd then trusts the config: SlurmdParameters=config_overrides)
#   SLURM_GPUS_PER_NODE=0        >0: fake gpu GRES (no real devices) so --gpus-per-node/--gres=gpu:N are accepted
#   SLURM_WITH_DBD=0             1: mariadb + slurmdbd so sacct works (+~20-35 s install, +~2.5 s start); 0: jobcomp/filetxt only
#   SLURM_KEEP_STATE=0           1: keep slurmctld job state across a cold start (default: fresh state)
#   SLURM_LINK_ETC=1             1: symlink /etc/slurm/slurm.conf -> $SLURM_ROOT/etc/slurm.conf (if not a foreign file)
#                                   so sbatch/srun work without SLURM_CONF; always also `export SLURM_CONF=...`
set -euo pipefail

ROOT=${SLURM_ROOT:-/tmp/skipgpt-slurm}
NODES=${SLURM_NODES:-2}
PARTS=${SLURM_PARTITIONS:-debug}
GPUS=${SLURM_GPUS_PER_NODE:-0}
WITH_DBD=${SLURM_WITH_DBD:-0}
KEEP_STATE=${SLURM_KEEP_STATE:-0}
LINK_ETC=${SLURM_LINK_ETC:-1}
CTLD_PORT=${SLURM_CTLD_PORT:-6817}
DBD_PORT=${SLURM_DBD_PORT:-6819}
SLURMD_BASE_PORT=${SLURM_SLURMD_BASE_PORT:-17000}
MYSQL_PORT=${SLURM_MYSQL_PORT:-13306}
export SLURM_CONF=$ROOT/etc/slurm.conf

log() { echo "[start-slurm $(date +%T)] $*" >&2; }
# alive PIDFILE COMM: pid file names a live process whose /proc/PID/comm is COMM (guards against pid reuse)
alive() { [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]; }
t_start=$(date +%s.%N)

# ---------- 1. packages (tests/slurm/install.sh; a no-op when installed) ----------
SLURM_WITH_DBD=$WITH_DBD bash "$(dirname "${BASH_SOURCE[0]}")/install.sh" >&2

mkdir -p "$ROOT"/{etc,log,run,var/state,var/spool}
H=$(hostname)
CPUS=${SLURM_CPUS_PER_NODE:-$(nproc)}
MEM_MB=$(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo)
NODE_MEM=$(( MEM_MB * 8 / 10 / NODES ))

# ---------- 2. /etc/hosts aliases so node names (n1..nN) resolve, e.g. MASTER_ADDR=$(scontrol show hostnames | head -1)
names=""; for i in $(seq 1 "$NODES"); do names+=" n$i"; done
if ! grep -q "# local-slurm nodes:$names\$" /etc/hosts; then
  { grep -v '# local-slurm nodes' /etc/hosts; echo "127.0.0.1$names # local-slurm nodes:$names"; } > "$ROOT/run/hosts.new"
  cat "$ROOT/run/hosts.new" > /etc/hosts   # rewrite in place (works when /etc/hosts is a bind mount)
fi

# ---------- 3. munge ----------
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$ROOT/run/munged.pid"   # marks that *we* started it
fi

# ---------- 4. config ----------
gres_line=""; node_gres=""
if [ "$GPUS" -gt 0 ]; then
  gres_line="GresTypes=gpu"; node_gres="Gres=gpu:$GPUS"
  # tracking GPUs as a TRES needs slurmdbd (slurmctld refuses to start otherwise)
  [ "$WITH_DBD" = 1 ] && gres_line+=$'\nAccountingStorageTRES=gres/gpu'
  # slurmd drops file-less GPUs ("Removing file-less GPU") and wants char devices ("is not a valid character
  # or block device"), so File= points at symlinks to /dev/null; CUDA_VISIBLE_DEVICES is then set per job.
  mkdir -p "$ROOT/dev"; for g in $(seq 0 $((GPUS - 1))); do ln -sfn /dev/null "$ROOT/dev/fakegpu$g"; done
  echo "AutoDetect=off" > "$ROOT/etc/gres.conf"
  echo "Name=gpu File=$ROOT/dev/fakegpu[0-$((GPUS - 1))]" >> "$ROOT/etc/gres.conf"
else
  rm -f "$ROOT/etc/gres.conf"
fi
if [ "$WITH_DBD" = 1 ]; then
  acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux"
else
  acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
{
cat <<EOF
# generated by start.sh
ClusterName=ci
SlurmctldHost=$H(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs become eligible again after cred_expire (default 120 s)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$acct
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
$( [ "$CPUS" != "$(nproc)" ] && echo "SlurmdParameters=config_overrides" )
MailProg=/bin/true
$gres_line
StateSaveLocation=$ROOT/var/state
SlurmdSpoolDir=$ROOT/var/spool/slurmd-%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
EOF
for i in $(seq 1 "$NODES"); do
  echo "NodeName=n$i NodeHostname=$H NodeAddr=127.0.0.1 Port=$((SLURMD_BASE_PORT + i)) CPUs=$CPUS RealMemory=$NODE_MEM $node_gres State=UNKNOWN"
done
def=YES
case "$PARTS" in *:*) echo "PreemptType=preempt/partition_prio"; echo "PreemptMode=REQUEUE";; esac
for p in $PARTS; do
  tier=1; case "$p" in *:*) tier=${p#*:}; p=${p%%:*};; esac
  echo "PartitionName=$p Nodes=ALL Default=$def MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=$tier"; def=NO
done
} > "$ROOT/etc/slurm.conf.new"
if [ -f "$ROOT/etc/slurm.conf" ] && ! cmp -s "$ROOT/etc/slurm.conf.new" "$ROOT/etc/slurm.conf" && alive "$ROOT/run/slurmctld.pid" slurmctld; then
  log "WARNING: config changed while slurmctld is running; run tests/slurm/stop.sh first to apply it"
fi
mv "$ROOT/etc/slurm.conf.new" "$ROOT/etc/slurm.conf"

if [ "$LINK_ETC" = 1 ]; then
  mkdir -p /etc/slurm
  if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf)" = "$ROOT/etc/slurm.conf" ]; then
    ln -sfn "$ROOT/etc/slurm.conf" /etc/slurm/slurm.conf
  else
    log "WARNING: /etc/slurm/slurm.conf exists and is not ours; export SLURM_CONF=$SLURM_CONF"
  fi
fi

FRESH=0
if ! alive "$ROOT/run/slurmctld.pid" slurmctld && [ "$KEEP_STATE" != 1 ]; then FRESH=1; fi

# ---------- 5. accounting: mariadb + slurmdbd ----------
if [ "$WITH_DBD" = 1 ]; then
  SOCK=$ROOT/run/mysqld/mysqld.sock
  mkdir -p "$ROOT/run/mysqld" "$ROOT/var/mysql"; chown mysql:mysql "$ROOT/run/mysqld" "$ROOT/var/mysql"
  touch "$ROOT/log/mariadb.log"; chown mysql:mysql "$ROOT/log/mariadb.log"
  if [ ! -d "$ROOT/var/mysql/mysql" ]; then
    log "initialising mariadb datadir"
    mariadb-install-db --user=mysql --datadir="$ROOT/var/mysql" --skip-test-db > "$ROOT/log/mariadb-install.log" 2>&1
  fi
  if ! alive "$ROOT/run/mysqld/mysqld.pid" mariadbd; then
    log "starting mariadbd"
    setsid /usr/sbin/mariadbd --user=mysql --datadir="$ROOT/var/mysql" --socket="$SOCK" \
      --port="$MYSQL_PORT" --bind-address=127.0.0.1 --pid-file="$ROOT/run/mysqld/mysqld.pid" \
      --log-error="$ROOT/log/mariadb.log" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
      </dev/null >/dev/null 2>&1 &
    for _ in $(seq 120); do mariadb-admin --socket="$SOCK" ping >/dev/null 2>&1 && break; sleep 0.25; done
    mariadb-admin --socket="$SOCK" ping >/dev/null || { log "mariadb failed"; tail -20 "$ROOT/log/mariadb.log"; exit 1; }
  fi
  mariadb --socket="$SOCK" -uroot <<'SQL'
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
  cat > "$ROOT/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$ROOT/log/slurmdbd.log
PidFile=$ROOT/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ROOT/etc/slurmdbd.conf"
  if ! alive "$ROOT/run/slurmdbd.pid" slurmdbd; then
    # fresh controller state restarts job ids at 1: drop old accounting so sacct never mixes runs
    [ "$FRESH" = 1 ] && mariadb --socket="$SOCK" -uroot -e 'DROP DATABASE IF EXISTS slurm_acct_db'
    log "starting slurmdbd"
    slurmdbd   # reads slurmdbd.conf from dirname($SLURM_CONF)
    for _ in $(seq 100); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  sacctmgr -n show cluster format=cluster | grep -qw ci || sacctmgr -i add cluster ci >/dev/null
fi

# ---------- 6. slurmctld + slurmd per node ----------
if ! alive "$ROOT/run/slurmctld.pid" slurmctld; then
  if [ "$FRESH" = 1 ]; then rm -rf "$ROOT/var/state"; mkdir -p "$ROOT/var/state"; fi
  # another cluster's daemons on these ports would answer for ours (and run our jobs): refuse to mix
  if (exec 3<>"/dev/tcp/127.0.0.1/$CTLD_PORT") 2>/dev/null; then
    log "port $CTLD_PORT is in use by another slurmctld: stop that cluster (tests/slurm/stop.sh with its SLURM_ROOT)"
    exit 1
  fi
  log "starting slurmctld"
  slurmctld -i
fi
for i in $(seq 1 "$NODES"); do
  n=n$i
  mkdir -p "$ROOT/var/spool/slurmd-$n"
  if ! alive "$ROOT/run/slurmd-$n.pid" slurmd; then
    if (exec 3<>"/dev/tcp/127.0.0.1/$((SLURMD_BASE_PORT + i))") 2>/dev/null; then
      log "port $((SLURMD_BASE_PORT + i)) of $n is in use by a slurmd of another cluster: stop that cluster first"
      exit 1
    fi
    log "starting slurmd -N $n"
    slurmd -N "$n"
  fi
done
# the daemons detach at once; make sure they are still there (a bad config makes them exit after a moment)
sleep 1
for spec in "slurmctld.pid:slurmctld" $(for i in $(seq 1 "$NODES"); do echo "slurmd-n$i.pid:slurmd"; done); do
  if ! alive "$ROOT/run/${spec%%:*}" "${spec#*:}"; then
    log "${spec#*:} (${spec%%:*}) is not running:"; tail -5 "$ROOT/log/slurmctld.log" "$ROOT"/log/slurmd-*.log >&2
    exit 1
  fi
done

# ---------- 7. wait for all nodes idle ----------
for _ in $(seq 120); do
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
  total=$(echo "$states" | awk 'NF' | awk '{print $1}' | sort -u | wc -l)
  idle=$(echo "$states" | awk '$2=="idle"{print $1}' | sort -u | wc -l)
  [ "$total" -eq "$NODES" ] && [ "$idle" -eq "$NODES" ] && break
  sleep 0.5
done
if [ "${idle:-0}" -ne "$NODES" ]; then
  log "nodes not idle: $states"
  tail -30 "$ROOT/log/slurmctld.log" >&2; for f in "$ROOT"/log/slurmd-*.log; do tail -10 "$f" >&2; done
  exit 1
fi
log "cluster up: $NODES node(s) idle, partitions: $PARTS, gpus/node: $GPUS ($(python3 -c "print(round($(date +%s.%N)-$t_start,1))") s)"
log "use: export SLURM_CONF=$SLURM_CONF"
sinfo
