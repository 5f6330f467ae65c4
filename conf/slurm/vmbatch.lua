-- vmbatch.lua: which Slurm jobs run in a vmbatch VM - the one place a site says so
-- (docs/admin-slurm.md, "Scope, and living beside a site's own Prolog and job_submit").
--
-- Loaded with dofile() by job_submit.lua on the controller, which decides for every job
-- and marks those that get a VM (their container is vmbatch's bundle), and by
-- cli_filter.lua wherever users run srun, which gives a step the bundle only when its
-- job has one. Everything on the nodes follows the mark: oci.conf runs a container step
-- through vmbatch-starter, and vmbatch's Prolog/Epilog act only on jobs whose container
-- is [slurm].bundle of vmbatch.toml; they leave every other job alone.
--
-- Slurm 22.05's Lua is 5.1 (liblua5.1); job_submit/lua and cli_filter/lua open the
-- standard libraries (luaL_openlibs), so dofile and io.popen are there.
local M = {}

--------------------------------------------------------------------- site settings
-- The OCI bundle that marks a job as vmbatch's: the same path as [slurm].bundle in
-- vmbatch.toml on the nodes.
M.bundle = "/etc/vmbatch/slurm-bundle"

-- Which jobs run in a VM. Every list that is set must match (partition AND QOS AND
-- account AND user); a list left nil matches every job. A job submitted to several
-- partitions (-p a,b) must be in scope for all of them or for none.
M.scope = {
    partitions = nil, -- e.g. { "vm" }: a pilot on one partition
    qos = nil,        -- e.g. { "vm" }
    accounts = nil,   -- e.g. { "physics" }
    users = nil,      -- e.g. { "alice", "bob" }
    -- May a batch job choose, with a '#VMBATCH vm=yes' or 'vm=no' line in the leading
    -- comment block of its script?
    --   "none":    jobs in scope run in a VM, others on the host; a vm= line that
    --              disagrees is refused at submission
    --   "opt_out": jobs in scope run in a VM unless their script says vm=no
    --   "opt_in":  jobs in scope run in a VM only if their script says vm=yes
    -- A job out of scope that says vm=yes is refused at submission.
    job_choice = "none",
}
--------------------------------------------------------------- end of site settings

local NO_VAL = "4294967294"

-- true, false, or nil (unknown: the job does not say, and its default is not known here)
local function member(list, value)
    if list == nil then
        return true
    end
    if value == nil then
        return nil
    end
    for _, v in ipairs(list) do
        if v == value then
            return true
        end
    end
    return false
end

-- Three-valued AND: false if any is false, else nil if any is unknown, else true.
local function all(...)
    local result = true
    for i = 1, select("#", ...) do
        local v = select(i, ...)
        if v == false then
            return false
        elseif v == nil then
            result = nil
        end
    end
    return result
end

-- "a,b" -> { "a", "b" }; nil or "" -> {}
function M.split(text)
    local items = {}
    for item in string.gmatch(text or "", "[^,%s]+") do
        items[#items + 1] = item
    end
    return items
end

-- The job as the scope's rules see it: "partition vm, account physics" (only what the
-- scope names).
local function describe(job)
    local s, items = M.scope, {}
    local function named(value)
        if value == nil or value == "" then
            return "(none)"
        end
        return value
    end
    if s.partitions ~= nil then
        local parts = job.partitions or {}
        items[#items + 1] = "partition "
            .. (#parts > 0 and table.concat(parts, ",") or "(default)")
    end
    if s.qos ~= nil then
        items[#items + 1] = "QOS " .. named(job.qos)
    end
    if s.accounts ~= nil then
        items[#items + 1] = "account " .. named(job.account)
    end
    if s.users ~= nil then
        items[#items + 1] = "user " .. named(job.user)
    end
    if #items == 0 then
        return "every partition"
    end
    return table.concat(items, ", ")
end

-- The job's own choice from its batch script: "yes", "no", nil (none), or false and a
-- message for a malformed vm= value. Read like the nodes' #VMBATCH parser
-- (vmbatch/hooks/request.py): only the leading comment block, after an optional #! line.
function M.choice(script)
    if script == nil then
        return nil
    end
    local found = nil
    local number = 0
    for raw in string.gmatch(script .. "\n", "([^\n]*)\n") do
        number = number + 1
        if number > 1000 then
            break
        end
        local line = string.match(raw, "^%s*(.-)%s*$")
        if not (number == 1 and string.sub(line, 1, 2) == "#!") then
            if line ~= "" and string.sub(line, 1, 1) ~= "#" then
                break -- the first command ends the directives, as for #SBATCH
            end
            local rest = (line == "#VMBATCH") and "" or string.match(line, "^#VMBATCH%s+(.*)$")
            for token in string.gmatch(rest or "", "%S+") do
                local key, value = string.match(token, "^([a-z_]+)=(.*)$")
                if key == "vm" then
                    if value ~= "yes" and value ~= "no" then
                        return false, string.format(
                            "job script line %d: '#VMBATCH vm=%s': write vm=yes or vm=no",
                            number, string.sub(value, 1, 40))
                    end
                    found = value
                end
            end
        end
    end
    return found
end

-- The decision for one job: "vm", "host", "unknown" (only where the job leaves a rule's
-- input to a default that is not known here: cli_filter), or "error" and a message for the
-- user. job = { partitions = { names } (empty: the default, not known), qos, account,
-- user (nil: not known), user_in_scope (true: the users rule is known to pass),
-- choice = "yes" / "no" / nil }.
function M.verdict(job)
    local s = M.scope
    local how = s.job_choice or "none"
    if how ~= "none" and how ~= "opt_in" and how ~= "opt_out" then
        return "error", "vmbatch.lua: scope.job_choice must be none, opt_in or opt_out"
    end
    local user_ok = true
    if not job.user_in_scope then
        user_ok = member(s.users, job.user)
    end
    local rest = all(member(s.qos, job.qos), member(s.accounts, job.account), user_ok)
    local eligible
    local parts = job.partitions or {}
    if s.partitions == nil then
        eligible = rest
    elseif #parts == 0 then
        eligible = all(nil, rest)
    else
        local yes, no = 0, 0
        for _, p in ipairs(parts) do
            local e = all(member(s.partitions, p), rest)
            if e == true then
                yes = yes + 1
            elseif e == false then
                no = no + 1
            end
        end
        if yes > 0 and no > 0 then
            return "error", string.format("the job may run in partitions with and without"
                .. " vmbatch VMs (%s); submit it to partitions of one kind", describe(job))
        end
        if yes == #parts then
            eligible = true
        elseif no == #parts then
            eligible = false
        end
    end
    local choice = job.choice
    if eligible == false then
        if choice == "yes" then
            return "error", string.format("the job asks for a VM ('#VMBATCH vm=yes'), but"
                .. " jobs of %s run without one on this cluster", describe(job))
        end
        return "host"
    end
    if how == "opt_in" and choice ~= "yes" then
        return "host"
    end
    if how == "opt_out" and choice == "no" then
        return "host"
    end
    if eligible == nil then
        return "unknown"
    end
    if how == "none" and choice == "no" then
        return "error", string.format("jobs of %s run in a VM on this cluster; remove"
            .. " '#VMBATCH vm=no' from the script", describe(job))
    end
    return "vm"
end

-- -- job_submit.lua (slurmctld) ------------------------------------------------------

local function default_partition(part_list)
    for name, part in pairs(part_list or {}) do
        if part.flag_default == 1 then
            return name
        end
    end
    return nil
end

local function refuse(message)
    slurm.log_user("vmbatch: %s", message)
    return slurm.ERROR
end

-- Decide for a new job and mark it: its container becomes vmbatch's bundle if it gets a
-- VM. Call it from slurm_job_submit; returns slurm.SUCCESS or slurm.ERROR (with the reason
-- for the user).
function M.job_submit(job_desc, part_list, submit_uid)
    local parts = M.split(job_desc.partition)
    if #parts == 0 then
        parts = { default_partition(part_list) }
    end
    local choice, bad = M.choice(job_desc.script)
    if choice == false then
        return refuse(bad)
    end
    local verdict, message = M.verdict({
        partitions = parts,
        qos = job_desc.qos or job_desc.default_qos or "",
        account = job_desc.account or job_desc.default_account or "",
        user = job_desc.user_name or "",
        choice = choice,
    })
    if verdict == "error" then
        return refuse(message)
    end
    local container = job_desc.container
    if container == "" then
        container = nil
    end
    if verdict == "vm" then
        if container == nil then
            job_desc.container = M.bundle
        elseif container ~= M.bundle then
            return refuse("this job runs in a vmbatch VM and cannot name another container ("
                .. string.sub(container, 1, 80) .. ")")
        end
    elseif container == M.bundle then
        return refuse("this job names vmbatch's container, but jobs of "
            .. table.concat(parts, ",") .. " run without a VM here")
    end
    return slurm.SUCCESS
end

-- A pending job's container cannot change (slurmctld's update_job ignores it), so a
-- change of partition, QOS or account that would move the job across the scope is
-- refused: the job is resubmitted instead. Call it from slurm_job_modify.
function M.job_modify(job_desc, job_rec, part_list, modify_uid)
    if job_desc.partition == nil and job_desc.qos == nil and job_desc.account == nil then
        return slurm.SUCCESS
    end
    local has_vm = job_rec.container == M.bundle
    local choice = M.choice(job_rec.script)
    local verdict = M.verdict({
        partitions = M.split(job_desc.partition or job_rec.partition),
        qos = job_desc.qos or job_rec.qos or "",
        account = job_desc.account or job_rec.account or "",
        -- job_rec names only the uid: a job with a VM passed the users rule at submission,
        -- one without may not have (then the verdict is "unknown" and the change allowed)
        user_in_scope = has_vm,
        choice = choice or nil,
    })
    if verdict == "error" or (verdict == "vm" and not has_vm)
        or (verdict == "host" and has_vm) then
        -- 22.05's scontrol update shows only "Unspecified error": say it in slurmctld's
        -- log too
        local message = string.format("job %s cannot move %s a vmbatch VM's scope;"
            .. " cancel it and submit it again", tostring(job_rec.job_id),
            has_vm and "out of" or "into")
        slurm.log_info("vmbatch: %s", message)
        return refuse(message)
    end
    return slurm.SUCCESS
end

-- -- cli_filter.lua (srun, as the user) --------------------------------------------

-- The container of job `id` as slurmctld has it ("" if none), nil if squeue fails.
function M.job_container(id)
    if not string.match(id or "", "^%d+$") then
        return nil
    end
    local pipe = io.popen("squeue -h -O Container: -j " .. id .. " 2>/dev/null")
    if pipe == nil then
        return nil
    end
    local out = pipe:read("*a")
    pipe:close()
    return (string.gsub(out or "", "%s+$", ""))
end

-- slurmctld's default partition ("scontrol show partition": Default=YES), nil if unknown.
function M.default_partition()
    local pipe = io.popen("scontrol -o show partition 2>/dev/null")
    if pipe == nil then
        return nil
    end
    local found = nil
    for line in pipe:lines() do
        if string.find(line, " Default=YES", 1, true) then
            found = string.match(line, "^PartitionName=(%S+)")
        end
    end
    pipe:close()
    return found
end

-- Does this srun's step belong in the job's VM? Inside an allocation (salloc, or a job
-- running on the host) Slurm says whether the job has vmbatch's container; for a job the
-- srun is about to submit, the scope decides as job_submit.lua will.
function M.step_in_vm(options)
    local id = options["jobid"]
    if id == nil or id == "unset" or id == "0" or id == NO_VAL then
        id = os.getenv("SLURM_JOB_ID")
    end
    if id ~= nil and id ~= "" then
        return M.job_container(id) == M.bundle
    end
    local parts = M.split(options["partition"])
    if #parts == 0 and M.scope.partitions ~= nil then
        parts = { M.default_partition() }
    end
    return M.verdict({
        partitions = parts,
        qos = options["qos"],
        account = options["account"],
        user = os.getenv("USER") or os.getenv("LOGNAME"),
    }) == "vm"
end

local function count(value)
    return tonumber(string.match(value or "", "^%d+") or "") or 0
end

-- Give an srun step vmbatch's bundle when its job runs in a VM, so the step runs there
-- too (Slurm 22.05 gives the job's container to its batch step only; a step's comes from
-- `srun --container`). Call it from slurm_cli_pre_submit. Not a security boundary: it runs
-- in the user's own srun.
function M.cli_pre_submit(options, offset)
    if options["type"] ~= "srun" then
        return slurm.SUCCESS
    end
    if (options["container"] == nil or options["container"] == "") and M.step_in_vm(options) then
        options["container"] = M.bundle
    end
    if options["container"] ~= M.bundle then
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

return M
