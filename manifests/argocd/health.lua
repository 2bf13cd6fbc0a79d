-- Argo CD health check for consensusfit.dev/ConsensusFit; argocd-cm.yaml carries it as
-- resource.customizations.health.consensusfit.dev_ConsensusFit (scripts/render.sh copies it there).
-- Healthy: Succeeded. Degraded: Failed. Suspended: spec.suspend while running. Progressing:
-- otherwise, and whenever the operator has not yet seen the latest spec (observedGeneration).
-- Plain Lua 5.1 (Argo CD runs gopher-lua); tests/platform runs it under lua5.4.
local hs = {status = "Progressing", message = "Waiting for the operator"}

local function find_condition(status, wanted)
  if status.conditions == nil then
    return nil
  end
  for _, condition in ipairs(status.conditions) do
    if condition.type == wanted then
      return condition
    end
  end
  return nil
end

local function shard_progress(status)
  local shards = status.shards
  if shards == nil or shards.total == nil then
    return ""
  end
  local round = ""
  if status.rounds ~= nil and status.rounds.current ~= nil and status.rounds.current > 0 then
    round = string.format(" in round %d of at most %d", status.rounds.current, status.rounds.max or 0)
  end
  return string.format(": %d/%d shards done%s", shards.succeeded or 0, shards.total, round)
end

local status = obj.status
local generation = obj.metadata.generation
if status == nil then
  return hs
end
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.message = string.format("Waiting for the operator to observe generation %d", generation)
  return hs
end

local phase = status.phase or "Pending"
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded"
  if status.result ~= nil and status.result.uri ~= nil then
    hs.message = hs.message .. ": " .. status.result.uri
  end
  if status.diagnostics ~= nil and status.diagnostics.rhatMax ~= nil and status.diagnostics.rhatMax > 1.01 then
    hs.message = hs.message .. string.format(" (warning: R-hat max %.3f above 1.01)", status.diagnostics.rhatMax)
  end
  local converged = find_condition(status, "Converged")
  if converged ~= nil and converged.status ~= "True" then
    hs.message = hs.message .. " (warning: " .. (converged.message or converged.reason or "EP did not converge") .. ")"
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = "Failed"
  local failed = find_condition(status, "Failed")
  if failed ~= nil then
    hs.message = (failed.reason or "Failed") .. ": " .. (failed.message or "")
  end
elseif obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "Suspended in " .. phase .. shard_progress(status)
else
  hs.message = phase .. shard_progress(status)
  -- Blocked pods (an image pull error, a missing Secret): still Progressing, as a Deployment is
  -- until its deadline; the operator fails the fit after its grace period.
  local blocked = find_condition(status, "Blocked")
  if blocked ~= nil and blocked.status == "True" then
    hs.message = hs.message .. " (blocked: " .. (blocked.reason or "Blocked") .. ": " .. (blocked.message or "") .. ")"
  end
end
return hs
