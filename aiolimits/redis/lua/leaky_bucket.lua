-- aiolimits library, leaky_bucket.lua: LeakyBucket, the twin of aiolimits/_algorithms/leaky_bucket.py (parity:
-- tests/test_redis_parity.py). Loaded after base.lua, whose helpers it uses (see there).

builders.leaky_bucket = function()
  local A = {
    new = function(L, now)
      return { next_id = keyed_ids(), slots = {} }
    end,
  }
  local function interval(L) return L.window / L.cap end
  local function next_free(s)
    local n = #s.slots
    if n > 0 then return s.slots[n][2] end
    return -INF
  end
  local function prune(s, now)
    local slots = s.slots
    local drop = 0
    while drop < #slots and slots[drop + 1][2] <= now do drop = drop + 1 end
    if drop > 0 then
      local kept = {}
      for i = drop + 1, #slots do kept[#kept + 1] = slots[i] end
      s.slots = kept
    end
  end
  local function occupy(s, L, amount, now)
    prune(s, now)
    local nf = next_free(s)
    local start
    if nf > now then start = nf else start = now end
    s.next_id = s.next_id + 1
    s.slots[#s.slots + 1] = { s.next_id, add_up(start, amount * interval(L)), amount }
    return s.next_id
  end
  A.earliest = function(s, L, amount, now)
    local nf = next_free(s)
    if nf > now then return nf end
    return now
  end
  A.take = function(s, L, amount, now)
    return { { occupy(s, L, amount, now) } }
  end
  A.refund = function(s, L, receipt, amount, now)
    prune(s, now)
    local given = 0.0
    local slots = s.slots
    local T = interval(L)
    for r = #receipt, 1, -1 do
      if amount <= 0 then break end
      local i = find_id(slots, receipt[r][1])
      -- A slot no longer listed has ended: it was used, nothing to give back.
      if i ~= nil then
        local slot = slots[i]
        local e, held = slot[2], slot[3]
        if not (e <= now or held <= 0) then
          local future = (e - now) / T
          local least
          if amount < held then least = amount else least = held end
          local x, new_end
          if future <= least then
            x, new_end = future, now
          else
            if held < amount then x = held else x = amount end
            new_end = add_up(e, -x * T)
          end
          local freed = e - new_end
          slot[2] = new_end
          slot[3] = held - x
          for j = i + 1, #slots do slots[j][2] = add_up(slots[j][2], -freed) end
          amount = amount - x
          given = given + x
        end
      end
    end
    return given
  end
  A.charge = function(s, L, receipt, amount, now)
    receipt[#receipt + 1] = { occupy(s, L, amount, now) }
    return receipt
  end
  A.available = function(s, L, now)
    if next_free(s) <= now then return L.cap end
    return 0.0
  end
  -- The limit L becomes N at now (LeakyBucketState.change): what is left of each slot keeps
  -- its units, at the new interval (rounded up, exactly as _scaled_up).
  A.change = function(s, L, N, now)
    prune(s, now)
    local old, new = interval(L), interval(N)
    if new == old then return end
    for i = 1, #s.slots do
      local x = s.slots[i][2] - now
      local y = x / old * new
      -- The least y with y·old >= x·new exactly.
      while exact_sign({ y * old, product_error(y, old, y * old), -(x * new),
                         -product_error(x, new, x * new) }) < 0 do
        y = next_up(y)
      end
      s.slots[i][2] = add_up(now, y)
    end
  end
  A.fresh_at = function(s, L, now)
    return next_free(s)
  end
  return A
end
