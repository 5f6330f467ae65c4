"""Job requests from Torque's prologue arguments and #VMBATCH directives; VM sizing."""

from __future__ import annotations

import re

import pytest

from vmbatch.errors import Disposition, JobError
from vmbatch.hooks.request import (
    Resources,
    VmSize,
    choose_image,
    directives,
    size_vm,
    torque_prologue,
    torque_resources,
    torque_size,
    torque_time,
)

#: As pbs_mom 6.1.3 calls the prologue (docs/platform.md): 8 arguments after the program.
TORQUE_ARGV = [
    "/var/spool/torque/mom_priv/prologue",
    "42.server.example.org",
    "alice",
    "physics",
    "my job",
    "neednodes=1:ppn=2,nodes=1:ppn=2,walltime=01:30:00,mem=3gb",
    "batch",
    "",
    "/var/spool/torque/mom_priv/jobs/42.server.example.org.SC",
]


def test_torque_prologue_arguments() -> None:
    job = torque_prologue(TORQUE_ARGV)
    assert (job.job_id, job.user, job.group, job.name) == (
        "42.server.example.org",
        "alice",
        "physics",
        "my job",
    )
    assert (job.queue, job.account) == ("batch", "")
    assert job.script.endswith("/jobs/42.server.example.org.SC")
    assert job.resources == Resources(vcpus=2, memory_mib=3072, walltime=5400)
    with pytest.raises(JobError, match="expected 8 arguments"):
        torque_prologue(TORQUE_ARGV[:4])


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", Resources()),
        ("walltime=600", Resources(walltime=600)),
        ("nodes=1:ppn=4:gpus=1,pmem=512mb", Resources(vcpus=4, memory_mib=2048)),
        ("nodes=node07+node08:ppn=2", Resources(vcpus=1)),  # first node spec: no ppn
        ("ncpus=3,mem=1000kb", Resources(vcpus=3, memory_mib=1)),  # rounded up
        ("procs=2,walltime=10:00", Resources(vcpus=2, walltime=600)),
    ],
)
def test_torque_resources(text: str, expected: Resources) -> None:
    assert torque_resources(text) == expected


def test_torque_units() -> None:
    assert torque_size("2GB") == 2 << 30 and torque_size("64w") == 512
    assert torque_size("100") == 100 and torque_size("1tb") == 1 << 40
    assert torque_time("01:02:03") == 3723 and torque_time("45") == 45
    for bad in ("2 gigs", "-1mb", "1.5gb"):
        with pytest.raises(JobError, match="not understood"):
            torque_size(bad)
    with pytest.raises(JobError, match="not understood"):
        torque_time("1:2:3:4")


def test_directives_only_in_the_leading_comment_block() -> None:
    script = b"#!/bin/bash\n#PBS -l nodes=1\n\n#VMBATCH image=cernvm4\necho hi\n#VMBATCH image=x\n"
    assert directives(script) == {"image": "cernvm4"}
    assert directives(b"echo no directives\n") == {}
    assert directives(b"#VMBATCH\n") == {}


@pytest.mark.parametrize(
    "line,message",
    [
        (b"#VMBATCH image", "'image' is not key=value"),
        (b"#VMBATCH image=$(reboot)", "is not key=value"),
        (b"#VMBATCH memory=99999", "unknown #VMBATCH key 'memory'"),
        (b"#VMBATCH image=a;b", "is not key=value"),
    ],
)
def test_malformed_directives_are_refused_with_the_line(line: bytes, message: str) -> None:
    with pytest.raises(JobError, match="line 2: .*" + re.escape(message)) as exc:
        directives(b"#!/bin/sh\n" + line + b"\n")
    assert exc.value.disposition is Disposition.ABORT_JOB


def test_image_choice_follows_the_allow_list() -> None:
    assert choose_image(None, "debian", ["cernvm4"]) == "debian"
    assert choose_image("cernvm4", "debian", ["cernvm4"]) == "cernvm4"
    with pytest.raises(JobError, match="'alma9' is not offered") as exc:
        choose_image("alma9", "debian", ["cernvm4"])
    assert "choose one of cernvm4, debian" in str(exc.value)
    with pytest.raises(JobError, match="no default image"):
        choose_image(None, "", [])


def test_vm_size_follows_the_request_within_the_node() -> None:
    node = {"host_cpus": 8, "host_memory": 16384, "reserve_memory": 2048}
    defaults = {"default_vcpus": 1, "default_memory": 1024}
    assert size_vm(Resources(), **defaults, **node) == VmSize(1, 1024, 1024)
    assert size_vm(Resources(vcpus=4, memory_mib=8192), **defaults, **node) == VmSize(4, 8192, 8192)
    with pytest.raises(JobError, match="can have at most 8 "):
        size_vm(Resources(vcpus=9), **defaults, **node)
    with pytest.raises(JobError, match="at most 14336 MiB"):
        size_vm(Resources(memory_mib=15000), **defaults, **node)
    with pytest.raises(JobError, match="at most 4096 MiB"):
        size_vm(Resources(memory_mib=5000), **defaults, **node, max_memory=4096)
    with pytest.raises(JobError, match="can have at most 2 "):
        size_vm(Resources(vcpus=3), **defaults, **node, max_vcpus=2)
