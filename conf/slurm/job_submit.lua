-- job_submit.lua (next to slurm.conf on the controller, with JobSubmitPlugins=lua):
-- vmbatch.lua decides which jobs run in a VM and marks them with vmbatch's container.
-- A site with its own job_submit.lua adds these two calls to it instead (the first line
-- near the top, the call at the end of its slurm_job_submit / slurm_job_modify); see
-- docs/admin-slurm.md, "Scope, and living beside a site's own Prolog and job_submit".
-- slurmctld re-reads this file when its mtime changes, not vmbatch.lua: touch this file
-- after editing vmbatch.lua.
local vmbatch = dofile("/etc/slurm/vmbatch.lua")

function slurm_job_submit(job_desc, part_list, submit_uid)
    return vmbatch.job_submit(job_desc, part_list, submit_uid)
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
    return vmbatch.job_modify(job_desc, job_rec, part_list, modify_uid)
end

return slurm.SUCCESS
