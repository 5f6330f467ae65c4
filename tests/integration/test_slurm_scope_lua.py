"""The scope decision of ``conf/slurm/vmbatch.lua``, run by a real Lua 5.1 interpreter (the
version Slurm 22.05's job_submit/lua and cli_filter/lua link): which jobs get a VM, how
``job_submit.lua`` marks them, which ``srun`` steps ``cli_filter.lua`` sends to the VM.

The ``slurm`` table Slurm's plugins provide is stubbed with what the module uses
(``SUCCESS``, ``ERROR``, ``log_user``, ``log_error``); job descriptions are plain tables
with the field names job_submit/lua gives (src/plugins/job_submit/lua/job_submit_lua.c).
The real plugins run it in tests/system/test_slurm_scope.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmbatch.errors import JobError
from vmbatch.hooks.request import directives

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "conf" / "slurm" / "vmbatch.lua"
LUA = shutil.which("lua5.1")
BUNDLE = "/etc/vmbatch/slurm-bundle"

pytestmark = pytest.mark.skipif(LUA is None, reason="lua5.1 (Debian package lua5.1) missing")

PRELUDE = """
slurm = { SUCCESS = 0, ERROR = -1 }
function slurm.log_user(fmt, ...) io.write("USER: ", string.format(fmt, ...), "\\n") end
function slurm.log_error(fmt, ...) io.write("ERROR: ", string.format(fmt, ...), "\\n") end
function slurm.log_info(fmt, ...) io.write("INFO: ", string.format(fmt, ...), "\\n") end
function slurm.log_verbose(fmt, ...) io.write("VERBOSE: ", string.format(fmt, ...), "\\n") end
local M = dofile(MODULE)
local function show(...)
    local out = {}
    for i = 1, select("#", ...) do out[#out + 1] = tostring((select(i, ...))) end
    io.write(table.concat(out, " | "), "\\n")
end
"""


def lua(body: str, *, scope: str = "", env: dict[str, str] | None = None) -> list[str]:
    """Run ``body`` after loading the module (``scope``: Lua that sets ``M.scope``);
    return its output lines."""
    assert LUA is not None
    code = f"MODULE = {str(MODULE)!r}\n{PRELUDE}\n{scope}\n{body}\n"
    run_env = {"PATH": "/usr/bin:/bin", **(env or {})}
    r = subprocess.run([LUA, "-"], input=code, capture_output=True, text=True, timeout=30,
                       env=run_env, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def verdict(job: str, scope: str = "") -> str:
    return lua(f"show(M.verdict({job}))", scope=scope)[0]


def test_by_default_every_job_runs_in_a_vm() -> None:
    assert verdict('{partitions = {"any"}, qos = "", account = "", user = "u"}') == "vm"
    assert verdict("{partitions = {}}") == "vm"  # nothing to know


PILOT = 'M.scope.partitions = { "vm" }'


@pytest.mark.parametrize(
    ("partitions", "expected"),
    [
        ('{"vm"}', "vm"),
        ('{"plain"}', "host"),
        ("{}", "unknown"),  # the default partition, not known here (cli_filter)
        ('{"vm", "plain"}', "error"),  # may run in either kind
        ('{"plain", "other"}', "host"),
    ],
)
def test_a_pilot_on_one_partition(partitions: str, expected: str) -> None:
    out = verdict(f'{{partitions = {partitions}, user = "u"}}', PILOT)
    assert out.split(" | ")[0] == expected
    if expected == "error":
        assert "with and without vmbatch VMs" in out


def test_every_rule_that_is_set_must_match() -> None:
    scope = 'M.scope.partitions = {"vm"}; M.scope.accounts = {"phys"}; M.scope.users = {"ann"}'
    job = '{{partitions = {{"vm"}}, qos = "normal", account = {}, user = {}}}'
    assert verdict(job.format('"phys"', '"ann"'), scope) == "vm"
    assert verdict(job.format('"chem"', '"ann"'), scope) == "host"
    assert verdict(job.format('"phys"', '"bob"'), scope) == "host"
    # An unknown account (the user's default, not known to cli_filter) leaves it open,
    # unless another rule already rules the job out.
    assert verdict(job.format("nil", '"ann"'), scope) == "unknown"
    assert verdict(job.format("nil", '"bob"'), scope) == "host"
    assert verdict('{partitions = {"vm"}, qos = "vm"}', 'M.scope.qos = {"vm", "vmlong"}') == "vm"
    assert verdict('{partitions = {"vm"}, qos = ""}', 'M.scope.qos = {"vm"}') == "host"


@pytest.mark.parametrize(
    ("how", "in_scope", "choice", "expected"),
    [
        ("none", True, "nil", "vm"),
        ("none", True, '"yes"', "vm"),
        ("none", True, '"no"', "error"),  # the site runs all of these in VMs
        ("none", False, "nil", "host"),
        ("none", False, '"no"', "host"),
        ("none", False, '"yes"', "error"),  # no VM to be had here
        ("opt_out", True, "nil", "vm"),
        ("opt_out", True, '"no"', "host"),
        ("opt_out", False, '"yes"', "error"),
        ("opt_in", True, "nil", "host"),
        ("opt_in", True, '"yes"', "vm"),
        ("opt_in", True, '"no"', "host"),
        ("opt_in", False, '"yes"', "error"),
    ],
)
def test_the_job_chooses_where_the_site_lets_it(
    how: str, in_scope: bool, choice: str, expected: str
) -> None:
    part = '"vm"' if in_scope else '"plain"'
    out = verdict(
        f"{{partitions = {{{part}}}, choice = {choice}}}",
        f'{PILOT}; M.scope.job_choice = "{how}"',
    )
    assert out.split(" | ")[0] == expected, out


def test_a_refusal_names_what_the_scope_looked_at() -> None:
    scope = 'M.scope.partitions = {"vm"}; M.scope.accounts = {"phys"}'
    out = verdict('{partitions = {"vm"}, account = "", user = "ann", choice = "yes"}', scope)
    assert out == (
        "error | the job asks for a VM ('#VMBATCH vm=yes'), but jobs of partition vm,"
        " account (none) run without one on this cluster"
    )
    out = verdict('{partitions = {"a"}, choice = "no"}')
    assert out.endswith("jobs of every partition run in a VM on this cluster; remove"
                        " '#VMBATCH vm=no' from the script")  # fmt: skip


def test_a_misspelt_job_choice_setting_refuses_jobs_rather_than_guessing() -> None:
    out = verdict('{partitions = {"vm"}}', 'M.scope.job_choice = "optin"')
    assert out.startswith("error | ") and "opt_in" in out


SCRIPTS = [
    ("#!/bin/sh\n#VMBATCH vm=no\necho hi\n", "no"),
    ("#!/bin/sh\n#SBATCH -n 1\n\n#VMBATCH image=demo vm=yes\nhostname\n", "yes"),
    ("#!/bin/sh\necho first\n#VMBATCH vm=no\n", None),  # after the first command
    ("#VMBATCH vm=yes\n", "yes"),
    ("#!/bin/sh\n  #VMBATCH   vm=no  \n", "no"),
    ("#!/bin/sh\n#VMBATCHvm=no\n", None),
    ("#!/bin/sh\n", None),
]


@pytest.mark.parametrize(("script", "choice"), SCRIPTS)
def test_the_job_choice_is_read_like_the_nodes_read_directives(
    script: str, choice: str | None
) -> None:
    """job_submit.lua and the Prolog's parser (vmbatch/hooks/request.py) agree on which
    lines are directives."""
    out = lua(f"show(M.choice({script!r}))")[0]
    assert out == (choice or "nil")
    assert directives(script.encode()).get("vm") == choice


def test_a_malformed_choice_is_refused_with_its_line() -> None:
    out = lua("show(M.choice('#!/bin/sh\\n#VMBATCH vm=maybe\\n'))")[0]
    assert out.startswith("false | job script line 2") and "vm=yes or vm=no" in out
    with pytest.raises(JobError):  # the node's parser would not let it pass either
        directives(b"#!/bin/sh\n#VMBATCH vm=\n")


SUBMIT = """
local parts = { vm = {}, plain = { flag_default = 1 } }
setmetatable(parts.vm, { __index = function() return 0 end })
local function submit(job)
    local rc = M.job_submit(job, parts, 1000)
    show(rc, job.container)
end
"""


def test_job_submit_marks_the_jobs_that_get_a_vm() -> None:
    out = lua(
        SUBMIT
        + """
submit({ partition = "vm", user_name = "ann" })
submit({ partition = "plain", user_name = "ann" })
submit({ user_name = "ann" })  -- the default partition, plain
submit({ partition = "vm", user_name = "ann", container = "" })
""",
        scope=PILOT,
    )
    assert out == [f"0 | {BUNDLE}", "0 | nil", "0 | nil", f"0 | {BUNDLE}"]


def test_job_submit_refuses_what_it_cannot_honour_and_says_why() -> None:
    out = lua(
        SUBMIT
        + f"""
submit({{ partition = "plain", container = "{BUNDLE}" }})
submit({{ partition = "vm", container = "/home/ann/my-bundle" }})
submit({{ partition = "vm,plain" }})
submit({{ partition = "plain", script = "#!/bin/sh\\n#VMBATCH vm=yes\\ntrue\\n" }})
submit({{ partition = "vm", script = "#!/bin/sh\\n#VMBATCH vm=perhaps\\n" }})
submit({{ partition = "plain", container = "/home/ann/my-bundle" }})
""",
        scope=PILOT,
    )
    refused = [line for line in out if line.startswith("USER: ")]
    assert [line for line in out if not line.startswith("USER: ")] == [
        f"-1 | {BUNDLE}",
        "-1 | /home/ann/my-bundle",
        "-1 | nil",
        "-1 | nil",
        "-1 | nil",
        "0 | /home/ann/my-bundle",  # not vmbatch's business outside its scope
    ]
    assert len(refused) == 5 and all(line.startswith("USER: vmbatch: ") for line in refused)
    assert "run without a VM here" in refused[0]
    assert "cannot name another container" in refused[1]
    assert "vm=yes or vm=no" in refused[4]


def test_a_pending_job_cannot_move_across_the_scope() -> None:
    out = lua(
        f"""
local function modify(desc, rec) show(M.job_modify(desc, rec, {{}}, 0)) end
local vm_job = {{ job_id = 7, partition = "vm", container = "{BUNDLE}" }}
local host_job = {{ job_id = 8, partition = "plain" }}
modify({{ partition = "plain" }}, vm_job)
modify({{ partition = "vm" }}, host_job)
modify({{ partition = "vm" }}, vm_job)
modify({{ time_limit = 5 }}, vm_job)
modify({{ partition = "other" }}, host_job)
""",
        scope=PILOT,
    )
    results = [line for line in out if not line.startswith(("USER: ", "INFO: "))]
    assert results == ["-1", "-1", "0", "0", "0"]
    assert out[0] == out[1].replace("USER: ", "INFO: ", 1)  # also in slurmctld's log
    assert "job 7 cannot move out of" in out[1] and "job 8 cannot move into" in out[4]


CLI = """
M.job_container = function(id) CALLS = (CALLS or "") .. id .. ";"; return CONTAINER end
M.default_partition = function() return "plain" end
local function pre(options)
    options.type = options.type or "srun"
    local rc = M.cli_pre_submit(options, 0)
    show(rc, options.container, CALLS)
end
"""


def test_a_step_inside_an_allocation_follows_its_job() -> None:
    """srun inside salloc (or a job on the host): slurmctld says whether the job has
    vmbatch's container; the scope is not evaluated again."""
    body = CLI + 'pre({ partition = "plain" })\n'
    assert lua(f'CONTAINER = "{BUNDLE}"\n' + body, scope=PILOT, env={"SLURM_JOB_ID": "42"}) == [
        f"0 | {BUNDLE} | 42;"
    ]
    assert lua('CONTAINER = ""\n' + body, scope=PILOT, env={"SLURM_JOB_ID": "42"}) == [
        "0 | nil | 42;"
    ]
    # srun --jobid=N from outside the allocation
    assert lua(f'CONTAINER = "{BUNDLE}"\n' + CLI + 'pre({ jobid = "43" })\n', scope=PILOT) == [
        f"0 | {BUNDLE} | 43;"
    ]


def test_a_new_srun_job_is_decided_as_job_submit_will() -> None:
    out = lua(
        CLI
        + """
pre({ partition = "vm", jobid = "unset" })
pre({ partition = "plain" })
pre({})                          -- the default partition: plain
pre({ type = "salloc", partition = "vm" })
pre({ partition = "plain", container = "/home/ann/b" })
""",
        scope=PILOT,
        env={"USER": "ann"},
    )
    assert out == [f"0 | {BUNDLE} | nil", "0 | nil | nil", "0 | nil | nil", "0 | nil | nil",
                   "0 | /home/ann/b | nil"]  # fmt: skip


def test_a_vm_step_runs_one_task_per_node_and_srun_says_so() -> None:
    out = lua(CLI + 'pre({ partition = "vm", ntasks = "4" })\n', scope=PILOT)
    assert out[0].startswith("ERROR: vmbatch: a job step runs as one task per node")
    assert out[1].startswith("-1 | ")
    # The same srun in a partition without VMs is none of vmbatch's business.
    assert lua(CLI + 'pre({ partition = "plain", ntasks = "4" })\n', scope=PILOT) == [
        "0 | nil | nil"
    ]


def test_the_shipped_plugin_scripts_delegate_to_the_module(tmp_path: Path) -> None:
    """job_submit.lua and cli_filter.lua as installed: one dofile line naming vmbatch.lua
    (the site's copy: here the checkout's) and the Slurm entry points calling it."""
    for name, calls in (
        ("job_submit.lua", "show(slurm_job_submit({ partition = 'x' }, {}, 0))"),
        ("cli_filter.lua", "show(slurm_cli_pre_submit({ type = 'sbatch' }, 0))"),
    ):
        text = (ROOT / "conf" / "slurm" / name).read_text()
        assert text.count("/etc/slurm/vmbatch.lua") == 1
        script = tmp_path / name
        script.write_text(text.replace("/etc/slurm/vmbatch.lua", str(MODULE)))
        assert lua(f"dofile({str(script)!r})\n{calls}") == ["0"]


def test_without_the_module_srun_runs_steps_as_without_vmbatch(tmp_path: Path) -> None:
    """A host that runs srun but has no vmbatch.lua (a node without vmbatch, under
    configless Slurm): srun works, and ``srun -v`` says why no step goes to a VM."""
    text = (ROOT / "conf" / "slurm" / "cli_filter.lua").read_text()
    script = tmp_path / "cli_filter.lua"
    script.write_text(text.replace("/etc/slurm/vmbatch.lua", str(tmp_path / "missing.lua")))
    options = "{ type = 'srun', partition = 'vm' }"
    out = lua(f"dofile({str(script)!r})\nlocal o = {options}\n"
              "show(slurm_cli_pre_submit(o, 0), o.container)")  # fmt: skip
    assert out[0].startswith("VERBOSE: vmbatch: no step runs in a VM from this host: ")
    assert "missing.lua" in out[0] and out[1] == "0 | nil"


def test_the_taskprolog_chain_runs_vmbatchs_check_then_the_sites(tmp_path: Path) -> None:
    """conf/slurm/taskprolog-chain: the site's TaskProlog output reaches slurmstepd; a
    step vmbatch refuses never reaches the site's script; a node without vmbatch runs
    the site's script alone."""
    site = tmp_path / "site"
    site.write_text("#!/bin/sh\necho export SITE=1\n")
    starter = tmp_path / "python"
    chain = tmp_path / "chain"
    text = (ROOT / "conf" / "slurm" / "taskprolog-chain").read_text()
    text = text.replace("/etc/slurm/taskprolog.site", str(site))
    chain.write_text(text.replace("/opt/vmbatch/bin/python", str(starter)))
    for p in (site, chain):
        p.chmod(0o755)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(chain)], capture_output=True, text=True, timeout=30,
                              env={}, check=False)  # fmt: skip

    assert (run().returncode, run().stdout) == (0, "export SITE=1\n")  # no vmbatch here
    starter.write_text('#!/bin/sh\n[ "$*" = "-I -m vmbatch.hooks.taskprolog" ] || exit 9\n')
    starter.chmod(0o755)
    assert (run().returncode, run().stdout) == (0, "export SITE=1\n")
    starter.write_text("#!/bin/sh\necho print vmbatch: error: outside the VM\nexit 1\n")
    assert (run().returncode, run().stdout) == (1, "print vmbatch: error: outside the VM\n")
    chain.write_text(chain.read_text().replace(f"SITE_TASKPROLOG={site}", "SITE_TASKPROLOG="))
    starter.write_text("#!/bin/sh\n")
    assert (run().returncode, run().stdout) == (0, "")


def test_the_taskprolog_module_leaves_the_hooks_machinery_unloaded() -> None:
    """The TaskProlog runs before every task of every job on the node, those without a VM
    too: it must not pay for importing libvirt, paramiko and the hooks (~0.5 s)."""
    code = (
        "import sys, vmbatch.hooks.taskprolog\n"
        "print(sorted(m for m in ('libvirt', 'paramiko', 'vmbatch.hooks.batch',"
        " 'vmbatch.hooks.entry') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, check=True, cwd=ROOT)  # fmt: skip
    assert r.stdout == "[]\n"


def test_the_bundle_is_the_one_the_nodes_expect() -> None:
    """vmbatch.lua's M.bundle and [slurm].bundle's default are the same path."""
    from vmbatch.config import SlurmConfig

    assert lua("show(M.bundle)") == [str(SlurmConfig().bundle)]
    assert os.path.isabs(BUNDLE)
