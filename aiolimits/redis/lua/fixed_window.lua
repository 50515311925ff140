-- aiolimits library, fixed_window.lua: FixedWindow, the twin of aiolimits/_algorithms/fixed_window.py (parity:
-- tests/test_redis_parity.py). Loaded after base.lua, whose helpers it uses (see there).

-- FixedWindow: the current window's index, bounds and count, and the shift added to grid indices
-- after a change of window (none before: nil), so that no index repeats.
builders.fixed_window = function()
  local A = {}
  local function window_index(t, w)
    local k = math.floor(t / w)
    while k * w > t do k = k - 1 end
    while (k + 1) * w <= t do k = k + 1 end
    return k
  end
  local function roll(s, L, now)
    if now >= s.stop then
      local k = window_index(now, L.window)
      s.index = k + (s.shift or 0)
      s.start = k * L.window
      s.stop = (k + 1) * L.window
      s.count = 0
    end
  end
  A.new = function(L, now)
    local s = { count = 0, index = -1, start = -INF, stop = -INF }
    roll(s, L, now)
    return s
  end
  A.earliest = function(s, L, amount, now)
    roll(s, L, now)
    if s.count + amount <= L.cap then return now end
    return s.stop
  end
  A.take = function(s, L, amount, now)
    roll(s, L, now)
    s.count = s.count + amount
    return { { s.index, amount } }
  end
  A.refund = function(s, L, receipt, amount, now)
    roll(s, L, now)
    local given = 0
    for r = #receipt, 1, -1 do
      if amount <= 0 then break end
      local part = receipt[r]
      if part[1] == s.index and part[2] > 0 then
        local x
        if part[2] < amount then x = part[2] else x = amount end
        part[2] = part[2] - x
        s.count = s.count - x
        amount = amount - x
        given = given + x
      end
    end
    return given
  end
  A.charge = function(s, L, receipt, amount, now)
    roll(s, L, now)
    s.count = s.count + amount
    receipt[#receipt + 1] = { s.index, amount }
    return receipt
  end
  A.available = function(s, L, now)
    roll(s, L, now)
    return L.cap - s.count
  end
  -- The limit L becomes N at now (FixedWindowState.change): the current window lasts until the
  -- first boundary of the new grid at or after its end; indices go on from the old ones.
  A.change = function(s, L, N, now)
    roll(s, L, now)
    if N.window == L.window then return end
    local k = window_index(s.stop, N.window)
    if k * N.window < s.stop then k = k + 1 end
    s.stop = k * N.window
    s.shift = s.index + 1 - k
  end
  -- An empty window is fresh; a counted one, once it has ended.
  A.fresh_at = function(s, L, now)
    if s.count == 0 then return -INF end
    return s.stop
  end
  return A
end
