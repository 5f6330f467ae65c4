-- job_submit.lua (next to slurm.conf, with JobSubmitPlugins=lua): every job that names no
-- container gets vmbatch's bundle, so users need no flag and their scripts stay unchanged.
local VMBATCH_BUNDLE = "/etc/vmbatch/slurm-bundle"

function slurm_job_submit(job_desc, part_list, submit_uid)
    if job_desc.container == nil or job_desc.container == "" then
        job_desc.container = VMBATCH_BUNDLE
    end
    return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
    return slurm.SUCCESS
end

return slurm.SUCCESS
