#!/usr/bin/env bash
# Installs what the Slurm tests (tests/slurm, pytest marker `slurm`) start a local cluster from: Debian's
# slurm-wlm (slurmctld, slurmd, sbatch, srun, scontrol) and munge. Called by `make test` / `make slurm-deps`.
# Nothing to do when they are installed; without root or apt the tests skip and say why.
set -uo pipefail
need=(slurmctld slurmd munged sbatch srun scontrol scancel)
missing=()
for b in "${need[@]}"; do
  command -v "$b" >/dev/null 2>&1 || [[ -x "/usr/sbin/$b" ]] || missing+=("$b")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "slurm-deps: missing ${missing[*]} and no root/apt-get to install them: the slurm tests will skip" >&2
  exit 0
fi
echo "slurm-deps: installing slurm-wlm and munge with apt-get (missing: ${missing[*]})" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurm-wlm munge >/dev/null; } \
  || echo "slurm-deps: apt-get install slurm-wlm munge failed: the slurm tests will skip" >&2
exit 0
