"""The node's side of vmbatch's Slurm scope: the Prolog, Epilog and job starter act only on
jobs that ``job_submit.lua`` marked with ``[slurm].bundle``, asked of slurmctld (squeue,
faked here), never of the job's environment. The decision itself is tested in
tests/integration/test_slurm_scope_lua.py, the whole in tests/system/test_slurm_scope.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vmbatch import config, process
from vmbatch.errors import ConfigError, HostError, JobError
from vmbatch.hooks import batch, entry, slurm
from vmbatch.hooks.jobstate import READY, Record, StateStore
from vmbatch.hooks.request import Resources

BUNDLE = "/etc/vmbatch/slurm-bundle"
CONTAINER_QUERY = ["-h", "-t", "all", "-j", "5", "-O", "Container:"]


class Squeue:
    """A fake vmbatch.process.run that answers the container query with ``answer``
    (None: squeue fails) and records every command."""

    def __init__(self, answer: str | None) -> None:
        self.answer = answer
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kw: object) -> process.Result:
        self.calls.append([str(a) for a in argv])
        if self.answer is None:
            raise HostError("squeue: error: Unable to contact slurm controller")
        return process.Result(tuple(argv), 0, self.answer, "")


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> config.Config:
    cfg = config.parse(
        {
            "batch": {
                "state_dir": str(tmp_path / "state"),
                "user_dir": str(tmp_path / "users"),
                "accounting_log": str(tmp_path / "acct.jsonl"),
            }
        }
    )
    monkeypatch.setattr(config, "load", lambda *args, **kw: cfg)
    monkeypatch.setattr(entry, "_logging", lambda script, job_id: None)
    return cfg


def _fake(monkeypatch: pytest.MonkeyPatch, answer: str | None) -> Squeue:
    fake = Squeue(answer)
    monkeypatch.setattr(slurm, "run_command", fake)
    return fake


def _never(what: str) -> Callable[..., object]:
    def fail(*args: object, **kw: object) -> object:
        raise AssertionError(f"{what} must not run for this job")

    return fail


PROLOG_ENV = {"SLURM_JOB_ID": "5", "SLURM_JOB_USER": "ann", "SLURMD_NODENAME": "n1"}


@pytest.mark.parametrize(
    "answer",
    [
        "\n",  # no container: the site's scope left the job on the host
        "/home/ann/bundle\n",  # the user's own container
        f"{BUNDLE} \n",  # look-alikes of the mark are not the mark
        f" {BUNDLE}\n",
        f"{BUNDLE}/\n",
        f"{BUNDLE}\nx\n",
    ],
)
def test_the_prologue_leaves_a_job_outside_the_scope_alone(
    cfg: config.Config, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, answer: str
) -> None:
    fake = _fake(monkeypatch, answer)
    monkeypatch.setattr(entry, "_reap_quickly", _never("the reaper's pass"))
    monkeypatch.setattr(batch, "prologue", _never("the VM's boot"))
    assert entry.run_prologue(["prolog"], PROLOG_ENV) == 0
    assert [c[1:] for c in fake.calls] == [CONTAINER_QUERY]
    assert fake.calls[0][0] == str(cfg.tools.squeue)
    assert not (tmp_path / "state").exists() and not (tmp_path / "users").exists()


def test_the_prologue_boots_the_vm_of_a_marked_job(
    cfg: config.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake(monkeypatch, f"{BUNDLE}\n")
    seen: list[str] = []
    monkeypatch.setattr(entry, "_reap_quickly", lambda c: seen.append("reaped"))
    job = batch.BatchJob("slurm", "5", "ann", Resources())
    monkeypatch.setattr(entry, "_slurm_job", lambda c, env: job)
    monkeypatch.setattr(batch, "prologue", lambda c, bj: seen.append(bj.job_id))
    assert entry.run_prologue(["prolog"], PROLOG_ENV) == 0
    assert seen == ["reaped", "5"]


def test_the_bundle_the_nodes_expect_is_the_sites_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = config.parse({"slurm": {"bundle": "/srv/vmbatch/bundle"}})
    _fake(monkeypatch, f"{BUNDLE}\n")
    assert not slurm.is_vmbatch_job(cfg, "5", {})
    _fake(monkeypatch, "/srv/vmbatch/bundle\n")
    assert slurm.is_vmbatch_job(cfg, "5", {})
    with pytest.raises(ConfigError, match=r"\[slurm\]\.bundle: must be an absolute path"):
        config.parse({"slurm": {"bundle": "slurm-bundle"}})


def test_the_prologue_drains_when_slurmctld_cannot_say(
    cfg: config.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for the job's other details: a node that cannot reach slurmctld is the node's
    problem; the job is requeued held by Slurm, not run on the host by mistake."""
    _fake(monkeypatch, None)
    drained: list[str] = []
    monkeypatch.setattr(entry, "_drain", lambda c, node, reason, env: drained.append(reason))
    monkeypatch.setattr(batch, "prologue", _never("the VM's boot"))
    assert entry.run_prologue(["prolog"], PROLOG_ENV) == 1
    assert drained and "Unable to contact slurm controller" in drained[0]
    _fake(monkeypatch, "")  # squeue no longer lists the job at all
    assert entry.run_prologue(["prolog"], PROLOG_ENV) == 1
    assert "gave no record of job 5" in drained[1]


def test_the_epilogue_does_nothing_for_a_job_outside_the_scope(
    cfg: config.Config, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = _fake(monkeypatch, "\n")
    monkeypatch.setattr(batch, "finish", _never("the teardown"))
    assert entry.run_epilogue(["epilog"], {**PROLOG_ENV, "SLURM_JOB_EXIT_CODE2": "0:0"}) == 0
    assert len(fake.calls) == 1
    assert not (tmp_path / "acct.jsonl").exists()


@pytest.mark.parametrize(
    ("answer", "record"),
    [(f"{BUNDLE}\n", False), (None, False), ("\n", True)],
    ids=["marked", "slurmctld-silent", "record-on-the-node"],
)
def test_the_epilogue_cleans_up_whatever_may_be_vmbatchs(
    cfg: config.Config, monkeypatch: pytest.MonkeyPatch, answer: str | None, record: bool
) -> None:
    """A marked job, a job slurmctld cannot say anything about, and any job this node
    holds a record of get the full (idempotent) teardown."""
    fake = _fake(monkeypatch, answer)
    if record:
        StateStore(cfg.batch.state_dir).write(Record("5", "ann", 1000, 1000, READY))
    finished: list[str] = []
    monkeypatch.setattr(batch, "finish", lambda c, jid, **kw: finished.append(jid))
    assert entry.run_epilogue(["epilog"], PROLOG_ENV) == 0
    assert finished == ["5"]
    assert len(fake.calls) == (0 if record else 1)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("\n", "runs without a vmbatch VM (it is outside the site's VM scope)"),
        ("/home/ann/b\n", "names the container '/home/ann/b'; on this node containers run"),
        (f"{BUNDLE}\n", None),  # vmbatch's: a missing VM is this run's fault (requeue)
        (None, None),  # slurmctld cannot say
    ],
)
def test_a_container_step_of_a_job_without_a_vm_says_why(
    cfg: config.Config,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    answer: str | None,
    message: str | None,
) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text("")
    _fake(monkeypatch, answer)
    outside = entry._outside_scope(cfg, "5", {"SLURM_CONF": str(conf)})
    if message is None:
        assert outside is None
    else:
        assert outside is not None and message in outside
    # Where no slurm.conf is found, squeue is not asked (it would query DNS SRV records).
    fake = _fake(monkeypatch, "\n")
    assert entry._outside_scope(cfg, "5", {"SLURM_CONF": str(tmp_path / "none")}) is None
    assert fake.calls == []


def test_a_job_that_asks_for_no_vm_is_not_given_one_silently(cfg: config.Config) -> None:
    """The controller decides; a node handed such a job (Torque, or a job_submit.lua
    without vmbatch.lua) fails it with the reason rather than running it in a VM."""
    job = batch.BatchJob("torque", "5", "ann", Resources(), script=b"#!/bin/sh\n#VMBATCH vm=no\n")
    with pytest.raises(JobError, match="says '#VMBATCH vm=no', but this job runs in a VM"):
        batch.job_spec(cfg, job, None)  # type: ignore[arg-type]


def test_doctor_says_which_jobs_get_a_vm_and_which_prolog_scripts_run(tmp_path: Path) -> None:
    from vmbatch import doctor

    bundle = tmp_path / "bundle"
    cfg = config.parse({"slurm": {"bundle": str(bundle)}})
    prolog_d = tmp_path / "prolog.d"
    prolog_d.mkdir()
    (prolog_d / "50-site").write_text("#!/bin/sh\ntouch /var/run/site-$SLURM_JOB_ID\n")
    values = {
        "JobSubmitPlugins": "lua",
        "Prolog": f"{prolog_d}/*",
        "Epilog": f"{tmp_path}/epilog.d/*",  # matches nothing: slurmd fails every Epilog
    }
    scope, prolog, epilog = doctor._slurm_scope(cfg, values)
    assert not scope.ok and "MISSING on this node" in scope.detail
    assert not prolog.ok and "runs, in this order: " + str(prolog_d / "50-site") in prolog.detail
    assert "none of them runs vmbatch-prologue" in prolog.detail
    assert not epilog.ok and "matches nothing: slurmd fails every job's Epilog" in epilog.detail
    _, _, epilog = doctor._slurm_scope(cfg, {**values, "Epilog": "(null)"})
    assert not epilog.ok and epilog.detail == "no Epilog: vmbatch's vmbatch-epilogue does not run"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    (prolog_d / "10-vmbatch").write_text('#!/bin/sh\nexec /opt/vmbatch/bin/vmbatch-prologue "$@"\n')
    scope, prolog, _ = doctor._slurm_scope(cfg, values)
    assert scope.ok and f"the container {bundle} run in VMs" in scope.detail
    # slurmd runs the matches in reverse lexical order: the site's first, vmbatch's last
    assert prolog.ok and prolog.detail.endswith("50-site, " + str(prolog_d / "10-vmbatch"))
    scope, *_ = doctor._slurm_scope(cfg, {**values, "JobSubmitPlugins": "(null)"})
    assert not scope.ok and "JobSubmitPlugins=(null)" in scope.detail
