# vmbatch guest-side supervisor: starts one job detached from the SSH connection.
#
#   sh supervisor.sh DIR WALLTIME GRACE
#
# Uploaded into the job's guest directory DIR (mode 0700, owned by the job's user) by
# vmbatch/guest/session.py together with `start` (the job's environment and working
# directory, generated with every value shell-quoted) and `job` (the job script, 0700).
# POSIX sh only: it runs under busybox as well as bash/dash.
#
# Contract with the host:
# - the job runs as `setsid sh DIR/start DIR`: its own session and process group, whose id
#   is written to DIR/pid before anything else can ask for it (written to DIR/pid.new,
#   then renamed); stdin is DIR/stdin (a file, or a named pipe the host writes into until
#   it creates DIR/stdin.eof), stdout and stderr go to DIR/stdout and DIR/stderr;
# - when it ends, its status as the shell reports it (exit code, or 128+N after signal N)
#   is written to DIR/status (via rename, so a reader sees all of it or nothing);
# - WALLTIME > 0: after that many seconds the process group gets SIGTERM, GRACE seconds
#   later SIGKILL, and DIR/walltime records it;
# - this script returns at once; the supervising subshell keeps no descriptor of the SSH
#   session and ignores SIGHUP, so the job goes on when the connection drops.
set -u
D=$1
WALL=${2:-0}
GRACE=${3:-30}
umask 077
# Started already (the host repeats this command if the connection dropped before it got
# the answer): do not start a second copy; just wait for the pid below.
if mkdir "$D/started" 2>/dev/null; then
    (
        trap '' HUP
        keeper=
        if [ -p "$D/stdin" ]; then
            # A named pipe the host streams the job's stdin into: hold it open for writing
            # (read-write: no wait for a reader) until the host marks its end, so that the
            # job sees end of file then, not when one of the host's writers goes away.
            (
                exec 3<>"$D/stdin"
                while [ ! -e "$D/stdin.eof" ]; do sleep 0.2 2>/dev/null || sleep 1; done
            ) &
            keeper=$!
        fi
        setsid sh "$D/start" "$D" <"$D/stdin" >"$D/stdout" 2>"$D/stderr" &
        pid=$!
        echo "$pid" >"$D/pid.new" && mv "$D/pid.new" "$D/pid"
        dog=
        if [ "$WALL" -gt 0 ]; then
            (
                sleep "$WALL"
                echo "$WALL" >"$D/walltime"
                kill -TERM -"$pid"
                sleep "$GRACE"
                kill -KILL -"$pid"
            ) 2>/dev/null &
            dog=$!
        fi
        wait "$pid"
        st=$?
        [ -z "$dog" ] || kill "$dog" 2>/dev/null
        if [ -n "$keeper" ]; then
            # First the name, so that a late writer from the host creates a plain file
            # instead of waiting for a reader that will never come; then the keeper.
            rm -f "$D/stdin"
            kill "$keeper" 2>/dev/null
        fi
        echo "$st" >"$D/status.new" && mv "$D/status.new" "$D/status"
    ) </dev/null >>"$D/supervisor.log" 2>&1 &
fi
# Wait until the job's pid is known, so that a signal forwarded right after start finds it.
i=0
while [ ! -e "$D/pid" ] && [ $i -lt 100 ]; do
    sleep 0.1 2>/dev/null || sleep 1
    i=$((i + 1))
done
[ -e "$D/pid" ]
