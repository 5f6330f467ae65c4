#!/bin/sh
# vmbatch's `srun` inside a job's VM (docs/user-guide.md, "Job steps"): a step started from
# a batch script runs in this same VM, as the job's user, with the job's environment.
#
#   srun [OPTIONS] COMMAND [ARGS...]
#
# -n/--ntasks N starts N copies of COMMAND here, each with SLURM_PROCID/SLURM_LOCALID set
# (0..N-1) and SLURM_NTASKS=N, and waits for all; the status is the highest of theirs, as
# Slurm's srun reports it. -D/--chdir DIR runs them in DIR. Options that only place or
# size a step (cores, memory, time, names, accounts, binding) are accepted and have no
# effect: the VM is the job's allocation. What cannot be honoured in one VM is refused
# with exit status 2 and a line saying why: more than one node, --pty, --multi-prog,
# file options (-o/-e/-i: use the shell's redirections), and options this script does
# not know. POSIX sh only: it runs under busybox as well as dash/bash.
set -u
me="vmbatch: srun"
refuse() {
    printf '%s: %s\n' "$me" "$1" >&2
    exit 2
}
ntasks=1
chdir=
while [ $# -gt 0 ]; do
    opt=$1
    val=
    has=
    case $opt in
        --) shift; break ;;
        --*=*) val=${opt#*=}; opt=${opt%%=*}; has=1 ;;
        -[a-zA-Z]?*) val=${opt#-?}; opt=${opt%"$val"}; has=1 ;;
        -*) ;;
        *) break ;;
    esac
    case $opt in
        # Options with a value.
        -n|--ntasks|-N|--nodes|-D|--chdir|-c|--cpus-per-task|--mem|--mem-per-cpu|\
        -J|--job-name|-t|--time|-p|--partition|-A|--account|-q|--qos|--gres|\
        --cpu-bind|--mpi|-m|--distribution|--ntasks-per-node|-w|--nodelist|--export|\
        --gpus|-G|--mem-bind|--hint|--signal|--comment|-x|--exclude|--reservation)
            if [ -z "$has" ]; then
                [ $# -ge 2 ] || refuse "option $opt needs a value"
                val=$2
                shift
            fi
            case $opt in
                -n|--ntasks)
                    case $val in ''|*[!0-9]*|0|????*) refuse "-n/--ntasks needs a number from 1 to 999, not '$val'" ;; esac
                    ntasks=$val ;;
                -N|--nodes)
                    case $val in 1|1-1|1-) ;; *) refuse "a step inside a job's VM runs on its node only (-N $val); run one job per node, or several tasks here with -n" ;; esac ;;
                -D|--chdir) chdir=$val ;;
                --ntasks-per-node) case $val in ''|*[!0-9]*|0|????*) refuse "--ntasks-per-node needs a number from 1 to 999" ;; esac
                    ntasks=$val ;;
            esac
            ;;
        # Flags.
        --exclusive|--overlap|--exact|-u|--unbuffered|-v|--verbose|-Q|--quiet|\
        -K|--kill-on-bad-exit|-W|--wait|-l|--label|-X|--disable-status|--overcommit|-O)
            [ -z "$has" ] || [ "$opt" = --kill-on-bad-exit ] || [ "$opt" = --wait ] ||
                refuse "option $opt takes no value"
            ;;
        --pty) refuse "--pty needs a terminal, and a batch job has none; use 'srun --pty' from a login node or salloc" ;;
        --multi-prog) refuse "--multi-prog is not supported inside a job's VM; start the programs with -n and \$SLURM_PROCID" ;;
        -o|--output|-e|--error|-i|--input) refuse "option $opt is not supported inside a job's VM; use the shell's redirections (> < 2>)" ;;
        *) refuse "option $opt is not supported inside a job's VM (docs/user-guide.md, \"Job steps\")" ;;
    esac
    shift
done
[ $# -gt 0 ] || refuse "no command given"
if [ -n "$chdir" ]; then
    cd -- "$chdir" || refuse "cannot change to $chdir"
fi
command -v -- "$1" >/dev/null 2>&1 || {
    printf "vmbatch: %s: command not found in the job's VM\n" "$1" >&2
    exit 127
}
if [ "$ntasks" -eq 1 ]; then
    SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 "$@"
    exit $?
fi
pids=
i=0
# Every task reads the step's stdin, as with Slurm's srun (an asynchronous command would
# otherwise get /dev/null).
exec 3<&0
while [ "$i" -lt "$ntasks" ]; do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$ntasks "$@" <&3 &
    pids="$pids $!"
    i=$((i + 1))
done
worst=0
for p in $pids; do
    wait "$p"
    st=$?
    [ "$st" -le "$worst" ] || worst=$st
done
exit "$worst"
