-- cli_filter.lua (next to slurm.conf on every host where users run srun/salloc, with
-- CliFilterPlugins=lua): an srun step of a job that runs in a VM gets vmbatch's bundle,
-- so the step runs in the job's VM through oci.conf's RunTimeRun. vmbatch.lua says which
-- jobs do; it must be at the path below on these hosts too (configless Slurm sends this
-- file, not vmbatch.lua). Where it is missing (a node without vmbatch), srun runs steps
-- as without vmbatch (`srun -v` says why), and a step of a job with a VM fails in the
-- TaskProlog with the reason. A site with its own cli_filter.lua adds the dofile line and
-- the call to its slurm_cli_pre_submit instead (docs/admin-slurm.md). Not a security
-- boundary: cli_filter runs in the user's own srun.
local VMBATCH_LUA = "/etc/slurm/vmbatch.lua"
local loaded, vmbatch = pcall(dofile, VMBATCH_LUA)

function slurm_cli_setup_defaults(options, early_pass)
    return slurm.SUCCESS
end

function slurm_cli_pre_submit(options, offset)
    if not loaded then
        slurm.log_verbose("vmbatch: no step runs in a VM from this host: %s", tostring(vmbatch))
        return slurm.SUCCESS
    end
    return vmbatch.cli_pre_submit(options, offset)
end

function slurm_cli_post_submit(offset, jobid, stepid)
    return slurm.SUCCESS
end
