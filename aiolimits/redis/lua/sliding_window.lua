-- aiolimits library, sliding_window.lua: SlidingWindow, the twin of aiolimits/_algorithms/sliding_window.py (parity:
-- tests/test_redis_parity.py). Loaded after base.lua, whose helpers it uses (see there).

-- SlidingWindow: the log of { id, expiry, amount }, oldest first, and its total.
builders.sliding_window = function()
  local A = {
    new = function(L, now)
      return { next_id = keyed_ids(), total = 0, log = {} }
    end,
  }
  local function prune(s, now)
    local log = s.log
    local drop = 0
    while drop < #log and log[drop + 1][2] <= now do
      drop = drop + 1
      s.total = s.total - log[drop][3]
    end
    if drop > 0 then
      local kept = {}
      for i = drop + 1, #log do kept[#kept + 1] = log[i] end
      s.log = kept
    end
    if #s.log == 0 then s.total = 0 end
  end
  local function add(s, L, amount, now)
    s.next_id = s.next_id + 1
    s.log[#s.log + 1] = { s.next_id, now + L.window, amount }
    s.total = s.total + amount
    return s.next_id
  end
  A.earliest = function(s, L, amount, now)
    prune(s, now)
    local excess = s.total + amount - L.cap
    if excess <= 0 then return now end
    for i = 1, #s.log do
      excess = excess - s.log[i][3]
      if excess <= 0 then return s.log[i][2] end
    end
    error('unreachable: an amount <= capacity fits an empty window')
  end
  A.take = function(s, L, amount, now)
    prune(s, now)
    return { { add(s, L, amount, now) } }
  end
  A.refund = function(s, L, receipt, amount, now)
    prune(s, now)
    local given = 0
    for r = #receipt, 1, -1 do
      if amount <= 0 then break end
      local i = find_id(s.log, receipt[r][1])
      -- An entry no longer logged has expired: it already left the window.
      if i ~= nil then
        local entry = s.log[i]
        if not (entry[2] <= now or entry[3] <= 0) then
          local x
          if entry[3] < amount then x = entry[3] else x = amount end
          entry[3] = entry[3] - x
          s.total = s.total - x
          amount = amount - x
          given = given + x
        end
      end
    end
    return given
  end
  A.charge = function(s, L, receipt, amount, now)
    prune(s, now)
    receipt[#receipt + 1] = { add(s, L, amount, now) }
    return receipt
  end
  A.available = function(s, L, now)
    prune(s, now)
    return L.cap - s.total
  end
  -- The limit L becomes N at now (SlidingWindowState.change): each entry counts until its
  -- admission + the new window.
  A.change = function(s, L, N, now)
    prune(s, now)
    local shift = N.window - L.window
    if shift ~= 0 then
      for i = 1, #s.log do s.log[i][2] = add_up(s.log[i][2], shift) end
    end
    prune(s, now)
  end
  -- When the last entry leaves the window (the log is in expiry order).
  -- When the last entry that holds units leaves the window (one emptied by refunds, or of
  -- none, counts for nothing: SlidingWindowState.is_fresh sums the units).
  A.fresh_at = function(s, L, now)
    local log = s.log
    for i = #log, 1, -1 do
      if log[i][3] > 0 then return log[i][2] end
    end
    return -INF
  end
  return A
end
