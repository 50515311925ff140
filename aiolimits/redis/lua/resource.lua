-- aiolimits library, resource.lua: ResourceLimit, the twin of aiolimits/_algorithms/semaphore.py (parity:
-- tests/test_redis_parity.py). Loaded after base.lua, whose helpers it uses (see there).

-- ResourceLimit: leases { holder = { units, expiry } }. A holder that stops renewing loses its
-- slots when the lease expires, so a dead process cannot leak them.
builders.resource = function()
  local A = {
    new = function(L, now)
      return { leases = {} }
    end,
  }
  local function in_use(s, now)
    local used = 0
    local expired
    for holder, lease in pairs(s.leases) do
      if lease[2] <= now then
        if expired == nil then expired = {} end
        expired[#expired + 1] = holder
      else
        used = used + lease[1]
      end
    end
    if expired ~= nil then
      for i = 1, #expired do s.leases[expired[i]] = nil end
    end
    return used
  end
  A.earliest = function(s, L, amount, now)
    if in_use(s, now) + amount <= L.cap then return now end
    return INF
  end
  A.take = function(s, L, amount, now, holder, ttl)
    s.leases[holder] = { amount, now + ttl }
    return {}
  end
  A.available = function(s, L, now)
    return L.cap - in_use(s, now)
  end
  A.in_use = in_use
  A.change = function(s, L, N, now) end -- the leases stay held
  -- When the first live lease runs out (inf: none): a full resource may free up then, without
  -- a release, if its holder stopped renewing.
  A.next_expiry = function(s, now)
    local first = INF
    for _, lease in pairs(s.leases) do
      if lease[2] > now and lease[2] < first then first = lease[2] end
    end
    return first
  end
  -- When the last lease runs out.
  A.fresh_at = function(s, L, now)
    local last = -INF
    for _, lease in pairs(s.leases) do
      if lease[2] > last then last = lease[2] end
    end
    return last
  end
  return A
end
