"""The job's groups in the guest: the node's names and gids, never a privileged group.

The job's user gets its primary group and its supplementary groups with the names and gids
the node gives it (:meth:`vmbatch.job.JobUser.from_host`: ``os.getgrouplist`` and ``grp``,
read by the prologue as root from the node's databases; nothing the job controls), so that
``id -gn``, ``id -Gn``, ``ls -l`` and scripts that test group names see what they see on the
node. Two writers apply the same rules: the POSIX sh script of :func:`boot_script` (run by
cloud-init's ``bootcmd`` for ``nocloud`` and ``cernvm``, by the HEPiX reader and by the tiny
test guest, all before the account is created) and :func:`apply` (offline injection, on the
image's files from the host). For each group (node name N, gid G), in this order:

1. A *supplementary* group whose node name is privileged (:data:`PRIVILEGED` plus
   ``[context].privileged_groups``) is not given: membership of ``sudo``, ``wheel``, ``adm``,
   ``docker``, ``disk`` and the like grants rights inside the guest (and root in the guest
   can reach shared filesystems as anybody). :func:`plan` leaves it out; vmbatch logs it.
2. The image has gid G under the name M:
   - M is privileged: a supplementary group is not given (logged); for the *primary* group
     the job is refused (:func:`check_guest`, run after login, raises JobError);
   - M is N: used;
   - M is another name: used with the image's name M (the gid is what files on shared
     filesystems carry; both names are logged), so ``id -Gn`` shows M.
3. The image has no gid G: the group is created as N, unless N is privileged or the image
   already has a group called N (with another gid, e.g. the node's ``users`` is 1000, the
   image's 100): then it is created as ``vmbatch-gG`` (logged), never merged with the image's.

New groups get ``x`` as password field, with or without ``/etc/gshadow`` (busybox's own
group parser, as in the tiny test guest, does not resolve a line whose password field is
empty; for glibc ``x`` without gshadow is a password nothing matches). Memberships go
straight into the member lists of ``/etc/group`` and ``/etc/gshadow`` (the
account does not exist yet when ``bootcmd`` runs, and ``gpasswd``/``usermod`` need it; group
membership is read from those lists by ``initgroups(3)`` at login), so the cloud-config
``users`` entry names only the primary gid, and cloud-init never adds a group vmbatch left
out. The script rewrites files in place (``cat >``: inode, owner, mode and SELinux label
kept) and is idempotent (``bootcmd`` runs on every boot). Names reach it validated
(:data:`vmbatch.job.USER_NAME`) and shell-quoted; it uses only ``awk``, ``cat``, ``tail``,
``printf`` and ``rm`` (coreutils or busybox). It always exits 0 (an error must not stop
cloud-init's other boot commands): what matters is checked on the host after login.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass

from vmbatch.errors import ImageError, JobError
from vmbatch.job import JobUser

#: Groups that grant rights in a Linux guest (Debian's and RHEL's base-passwd/setup
#: descriptions): root-equivalent (root, sudo, wheel, admin, staff: writes /usr/local,
#: disk, kmem, mem, docker, lxd, incus-admin, libvirt, kvm), readers of secrets and logs
#: (shadow, adm, systemd-journal), and sys and tty. Sites add their own with
#: ``[context].privileged_groups``.
PRIVILEGED = frozenset(
    {
        "root", "sudo", "wheel", "admin", "staff", "adm", "shadow", "disk", "kmem", "mem",
        "sys", "tty", "docker", "lxd", "incus-admin", "libvirt", "kvm", "systemd-journal",
    }
)  # fmt: skip


def fallback_name(gid: int) -> str:
    """The guest's name for gid ``gid`` when the node's name cannot be used there."""
    return f"vmbatch-g{gid}"


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """The groups to give ``user`` in the guest, after rule 1 (see the module doc)."""

    user: str
    primary: tuple[str, int]
    #: Supplementary groups to give, as (node name, gid).
    members: tuple[tuple[str, int], ...]
    #: Supplementary groups left out because their node name is privileged.
    skipped: tuple[tuple[str, int], ...]
    privileged: frozenset[str]


def plan(user: JobUser, privileged: Iterable[str] = PRIVILEGED) -> GroupPlan:
    """Rule 1: leave out the supplementary groups named like a privileged group."""
    names = frozenset(privileged) | PRIVILEGED
    members = tuple(g for g in user.groups if g[0] not in names)
    skipped = tuple(g for g in user.groups if g[0] in names)
    return GroupPlan(user.name, (user.group, user.gid), members, skipped, names)


# -- the boot script (cloud-init bootcmd, the HEPiX reader, the tiny guest) -----------------

#: First line of the boot script (the tiny guest's init and tests find it by this).
MARKER = "# vmbatch: the job's groups with the node's names and gids"

_FUNCTIONS = r"""say() { echo "vmbatch: groups: $*" >&2; }
name_of() { awk -F: -v g="$1" '$3 "" == g "" { print $1; exit }' "$G"; }
has_name() { awk -F: -v n="$1" '$1 == n { f = 1 } END { exit !f }' "$G"; }
member() {
  for f in "$G" "$S"; do
    [ -f "$f" ] || continue
    awk -F: -v OFS=: -v n="$1" -v u="$U" '$1 == n && NF >= 4 {
      k = split($4, m, ","); for (i = 1; i <= k; i++) if (m[i] == u) { print; next }
      $4 = ($4 == "") ? u : ($4 "," u) } { print }' "$f" >"$f.vmbatch" && cat "$f.vmbatch" >"$f"
    rm -f "$f.vmbatch"
  done
}
add() {
  for f in "$G" "$S"; do
    [ ! -s "$f" ] || [ -z "$(tail -c 1 "$f")" ] || echo >>"$f"
  done
  printf '%s:x:%s:%s\n' "$1" "$2" "$3" >>"$G"
  [ ! -f "$S" ] || printf '%s:!::%s\n' "$1" "$3" >>"$S"
}
group() {
  m=$(name_of "$2")
  if [ -n "$m" ]; then
    case "$P" in *" $m "*)
      if [ "$3" = primary ]; then
        say "ERROR: the primary gid $2 ($1 on the node) is the image's privileged group $m"
      else
        say "not given: gid $2 ($1 on the node) is the image's privileged group $m"
      fi
      return ;;
    esac
    [ "$m" = "$1" ] || say "gid $2 is $m in the image ($1 on the node): the image's name is kept"
    [ "$3" = primary ] || member "$m"
    return
  fi
  n=$1
  case "$P" in *" $1 "*) n=vmbatch-g$2 ;; esac
  [ "$n" != "$1" ] || ! has_name "$1" || n=vmbatch-g$2
  if has_name "$n"; then
    say "not given: gid $2 ($1 on the node): the image has a group $n with another gid"
    return
  fi
  [ "$n" = "$1" ] ||
    say "gid $2 ($1 on the node) is $n in the guest: $1 is privileged or another gid's name"
  if [ "$3" = primary ]; then add "$n" "$2" ""; else add "$n" "$2" "$U"; fi
}"""


def boot_script(groups: GroupPlan, etc: str = "/etc") -> str:
    """The POSIX sh script applying rules 2 and 3 to the guest's files under ``etc``.

    A subshell, so that cloud-init's ``bootcmd`` (all items in one script, cloud-init
    ``util.shellify``) keeps no variable or function of it. No tab and no trailing blank:
    it must stay a YAML literal block, which the tiny guest's init reads.
    """
    q = shlex.quote
    lines = [
        "(",
        MARKER,
        f"U={q(groups.user)}",
        f"P={q(' ' + ' '.join(sorted(groups.privileged)) + ' ')}",
        f"G={q(etc + '/group')}",
        f"S={q(etc + '/gshadow')}",
        _FUNCTIONS,
        f"group {q(groups.primary[0])} {groups.primary[1]} primary",
        *(f"group {q(name)} {gid} member" for name, gid in groups.members),
        ")",
    ]
    return "\n".join(lines)


# -- offline injection: the same rules in Python ---------------------------------------------


def _entries(text: str) -> list[list[str]]:
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _join(entries: list[list[str]]) -> str:
    return "".join(":".join(e) + "\n" for e in entries)


def _add_member(entries: list[list[str]] | None, name: str, user: str) -> None:
    for e in entries or []:
        if e[0] == name and len(e) >= 4:
            members = [m for m in e[3].split(",") if m]
            if user not in members:
                e[3] = ",".join([*members, user])


def apply(groups: GroupPlan, group: str, gshadow: str | None) -> tuple[str, str | None, list[str]]:
    """Rules 2 and 3 on the image's ``/etc/group`` and ``/etc/gshadow`` texts.

    Returns the new texts and the notes the boot script would print. A primary gid that is
    a privileged group of the image raises JobError (the boot script leaves that to
    :func:`check_guest`).
    """
    gr = _entries(group)
    gsh = _entries(gshadow) if gshadow is not None else None
    if any(len(e) < 4 for e in gr):
        raise ImageError("the image's /etc/group is malformed; refused")
    notes: list[str] = []
    todo = [(*groups.primary, True), *((n, g, False) for n, g in groups.members)]
    for name, gid, primary in todo:
        found = [e[0] for e in gr if e[2] == str(gid)]
        if found:
            m = found[0]
            if m in groups.privileged:
                if primary:
                    raise _privileged_primary(gid, name, m)
                notes.append(f"not given: gid {gid} ({name} on the node) is the image's"
                             f" privileged group {m}")  # fmt: skip
                continue
            if m != name:
                notes.append(
                    f"gid {gid} is {m} in the image ({name} on the node): the image's name is kept"
                )
            if not primary:
                _add_member(gr, m, groups.user)
                _add_member(gsh, m, groups.user)
            continue
        new = fallback_name(gid) if name in groups.privileged else name
        if new == name and any(e[0] == name for e in gr):
            new = fallback_name(gid)
        if any(e[0] == new for e in gr):
            notes.append(f"not given: gid {gid} ({name} on the node): the image has a group"
                         f" {new} with another gid")  # fmt: skip
            continue
        if new != name:
            notes.append(f"gid {gid} ({name} on the node) is {new} in the guest: {name} is"
                         " privileged or another gid's name")  # fmt: skip
        members = "" if primary else groups.user
        gr.append([new, "x", str(gid), members])
        if gsh is not None:
            gsh.append([new, "!", "", members])
    return _join(gr), _join(gsh) if gsh is not None else None, notes


# -- after login: what the guest really gave --------------------------------------------------


def _privileged_primary(gid: int, name: str, image_name: str) -> JobError:
    return JobError(
        f"the job's primary group {name} (gid {gid}) is the privileged group {image_name!r}"
        " in the image; the job was not started",
        hint="use an image where that gid is an ordinary group, or ask the site to change"
        " the account's primary group",
    )


def check_guest(groups: GroupPlan, primary: str, names: Iterable[str], image: str) -> None:
    """Refuse the job if the guest gave its user a privileged group (fail-closed).

    ``primary`` and ``names`` are what ``id -gn`` and ``id -Gn`` print in the guest. This
    catches a primary gid that is privileged in the image (which contextualization cannot
    avoid) and memberships the image itself lists for an account of that name.
    """
    if primary in groups.privileged:
        raise _privileged_primary(groups.primary[1], groups.primary[0], primary)
    bad = sorted({n for n in names if n in groups.privileged})
    if bad:
        raise JobError(
            f"image {image!r} makes the job's user {groups.user} a member of the privileged"
            f" group(s) {', '.join(bad)}; the job was not started",
            hint="remove the account or its memberships from the image",
        )
