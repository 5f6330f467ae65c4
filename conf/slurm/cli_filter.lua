-- cli_filter.lua (next to slurm.conf on every host where users run srun/salloc, with
-- CliFilterPlugins=lua): every srun job step gets vmbatch's bundle, so the step runs in
-- the job's VM through oci.conf's RunTimeRun. Slurm 22.05 gives only the batch step the
-- job's container; a step's comes from `srun --container` (docs/admin-slurm.md).
-- Not a security boundary: cli_filter runs in the user's own srun.
local VMBATCH_BUNDLE = "/etc/vmbatch/slurm-bundle"

local function count(value)
    return tonumber(string.match(value or "", "^%d+") or "") or 0
end

function slurm_cli_setup_defaults(options, early_pass)
    return slurm.SUCCESS
end

function slurm_cli_pre_submit(options, offset)
    if options["type"] ~= "srun" then
        return slurm.SUCCESS
    end
    if options["container"] == nil or options["container"] == "" then
        options["container"] = VMBATCH_BUNDLE
    end
    if options["container"] ~= VMBATCH_BUNDLE then
        return slurm.SUCCESS
    end
    -- Slurm starts a container step with one task per node: say so before it fails with
    -- "Unspecified error".
    local ntasks = count(options["ntasks"])
    local per_node = count(options["ntasks-per-node"])
    local nodes = count(options["nodes"])
    if nodes == 0 then
        nodes = math.max(count(os.getenv("SLURM_JOB_NUM_NODES")), 1)
    end
    -- Inside an allocation srun takes its task counts from salloc's environment
    -- (SLURM_NTASKS, SLURM_NTASKS_PER_NODE): a plain `srun CMD` there runs one task per
    -- node in the VM instead of being refused.
    if ntasks > nodes and options["ntasks"] == os.getenv("SLURM_NTASKS") then
        options["ntasks"] = tostring(nodes)
        ntasks = nodes
    end
    if per_node > 1 and options["ntasks-per-node"] == os.getenv("SLURM_NTASKS_PER_NODE") then
        options["ntasks-per-node"] = "1"
        per_node = 1
    end
    if per_node > 1 or ntasks > nodes then
        slurm.log_error("vmbatch: a job step runs as one task per node in the job's VM;"
            .. " start the tasks inside the step instead (e.g. srun sh -c './a & ./b & wait')"
            .. " or run mpirun inside the VM (docs/user-guide.md, \"Job steps\")")
        return slurm.ERROR
    end
    return slurm.SUCCESS
end

function slurm_cli_post_submit(offset, jobid, stepid)
    return slurm.SUCCESS
end
