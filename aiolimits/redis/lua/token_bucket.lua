-- aiolimits library, token_bucket.lua: TokenBucket and GCRA, the twin of aiolimits/_algorithms/token_bucket.py and gcra.py (parity:
-- tests/test_redis_parity.py). Loaded after base.lua, whose helpers it uses (see there).

-- TokenBucket (and GCRA, the same maths): the level in tokens at a stamp; the level at t is
-- min(C, level + (t - stamp)·C/W). Decisions are exact (has), the level kept is never above the
-- exact one (takes round down, full is C exactly, the refill is folded in only after a window).
-- States written before the level was kept in tokens ({level in unit-seconds, stamp}, or GCRA's
-- {tat}) are read as what they meant.
builders.token_bucket = function()
  local A = {
    new = function(L, now)
      return { u = 1, level = L.cap, stamp = now, peaks = new_peaks() }
    end,
  }
  local function upgrade(s, L, now)
    if s.u == 1 then return end
    if s.tat ~= nil then
      local owed = s.tat - now
      if owed > 0 then s.level = L.cap - owed * L.cap / L.window else s.level = L.cap end
      s.stamp = now
      s.tat = nil
    else
      s.level = s.level / L.window
    end
    s.u = 1
  end
  local function level_at(s, L, now)
    local elapsed = now - s.stamp
    if elapsed <= 0 then return s.level end
    local level = s.level + elapsed * L.cap / L.window
    if level < L.cap then return level end
    return L.cap
  end
  local function has(s, L, need, now)
    local level = s.level
    if need <= level then return true end
    local start = s.stamp
    if now <= start then return false end
    return exact_at_least(start, now, L.cap, need, level, L.window)
  end
  local function bring(s, L, now)
    upgrade(s, L, now)
    if now <= s.stamp then return end
    if has(s, L, L.cap, now) then
      s.level = L.cap
      s.stamp = now
    elseif now - s.stamp >= FOLD_AFTER * L.window then
      local estimate = level_at(s, L, now)
      s.level = -first_true(function(u) return has(s, L, -u, now) end, -estimate, -L.cap)
      s.stamp = now
    end
  end
  A.earliest = function(s, L, amount, now)
    upgrade(s, L, now)
    if has(s, L, amount, now) then return now end
    local approx = s.stamp + (amount - s.level) * L.window / L.cap
    return first_true(function(t) return has(s, L, amount, t) end, approx, now)
  end
  A.take = function(s, L, amount, now)
    bring(s, L, now)
    local seq = peak_record(s.peaks, level_at(s, L, now))
    s.level = sub_down(s.level, amount)
    return { { seq, amount } }
  end
  A.refund = function(s, L, receipt, amount, now)
    bring(s, L, now)
    local given = give_back(s.peaks, receipt, amount, level_at(s, L, now), L.cap)
    if given > 0 then
      s.level = sub_down(s.level, -given)
      if has(s, L, L.cap, now) then
        s.level = L.cap
        s.stamp = now
      end
    end
    return given
  end
  A.charge = function(s, L, receipt, amount, now)
    bring(s, L, now)
    local seq = peak_record(s.peaks, level_at(s, L, now))
    s.level = sub_down(s.level, amount)
    receipt[#receipt + 1] = { seq, amount }
    return receipt
  end
  A.available = function(s, L, now)
    upgrade(s, L, now)
    return level_at(s, L, now)
  end
  -- The limit L becomes N at now (TokenBucketState.change): the deficit C - level is kept,
  -- rounded down, and the level is at most the new capacity (so acquire's fast path, which reads
  -- the new numbers from the call, takes the state as it is).
  A.change = function(s, L, N, now)
    upgrade(s, L, now)
    if now > s.stamp and not has(s, L, L.cap, now) then
      local estimate = level_at(s, L, now)
      s.level = -first_true(function(u) return has(s, L, -u, now) end, -estimate, -L.cap)
      s.stamp = now
    end
    bring(s, L, now)
    local level = sub_down(sub_down(s.level, L.cap), -N.cap)
    if level >= N.cap then level = N.cap end
    s.level = level
    if now > s.stamp then s.stamp = now end
    if N.cap ~= L.cap then peak_lift(s.peaks, 0, N.cap - L.cap) end
  end
  -- Kept in the field "b:<key>", the most frequent state read and written, as little-endian
  -- doubles (struct: a fraction of the cost of cmsgpack's tables, or of text, on both sides):
  -- level, stamp, operation number, then the peak log oldest first, operation number and level
  -- per entry; a log of one entry, the last operation's (the common form), is its level alone
  -- (32 bytes). A state of an earlier version (cmsgpack in "s:<key>") is read once, and moved
  -- here when written (`old`).
  A.prefix = 'b:'
  A.old_prefix = 's:'
  A.bucket = true -- acquire's fast path (bucket_take) applies
  A.load = function(raw)
    if #raw == 32 then
      local level, stamp, seq, peak = struct.unpack('<dddd', raw)
      return { u = 1, level = level, stamp = stamp,
               peaks = { seq = seq, seqs = { seq }, levels = { peak } } }
    end
    local level, stamp, seq, at = struct.unpack('<ddd', raw)
    local seqs, levels = {}, {}
    for i = 1, (#raw - 24) / 16 do
      seqs[i], levels[i], at = struct.unpack('<dd', raw, at)
    end
    return { u = 1, level = level, stamp = stamp,
             peaks = { seq = seq, seqs = seqs, levels = levels } }
  end
  A.dump = function(s)
    local peaks = s.peaks
    local seqs, levels = peaks.seqs, peaks.levels
    local n = #seqs
    if n == 1 and seqs[1] == peaks.seq then
      return struct.pack('<dddd', s.level, s.stamp, peaks.seq, levels[1])
    end
    local out = { struct.pack('<ddd', s.level, s.stamp, peaks.seq) }
    for i = 1, n do out[i + 1] = struct.pack('<dd', seqs[i], levels[i]) end
    return table.concat(out)
  end
  -- When the bucket is full again (within float error: the margin covers it).
  A.fresh_at = function(s, L, now)
    upgrade(s, L, now)
    if s.level >= L.cap then return s.stamp end
    return s.stamp + (L.cap - s.level) * L.window / L.cap
  end
  return A
end

-- GCRA: the theoretical arrival time stamp + (C - level)·W/C, kept exactly as TokenBucket's pair.
builders.gcra = builders.token_bucket


-- -- acquire's fast path: a bucket taken from the text of its field --------------------------

-- The fast path applies to a bucket's state kept with no peak or the last operation's alone (24
-- or 32 bytes: almost every bucket, since a take from a full bucket leaves that log), without
-- building its tables.
local function bucket_fast(raw)
  return raw and (#raw == 32 or #raw == 24)
end

-- Whether the bucket of state `raw` (bucket_fast) has `amount` at now: TokenBucket `has`.
local function bucket_has(raw, L, amount, now)
  local level, stamp = struct.unpack('<dd', raw)
  if amount <= level then return true end
  if now <= stamp then return false end
  return exact_at_least(stamp, now, L.cap, amount, level, L.window)
end

-- TokenBucket `take` of `amount` (which it has) at now on the state `raw` (bucket_fast), step
-- by step the same floats as bring, level_at, peak_record and sub_down: the new state as its
-- text, the operation number, and when the bucket is full again (its fresh_at, for a keyed
-- hash's expiry); nil when the refill is to be folded (the general path).
local function bucket_take(raw, L, amount, now)
  local cap, w = L.cap, L.window
  local level, stamp, seq, l1
  if #raw == 32 then
    level, stamp, seq, l1 = struct.unpack('<dddd', raw)
  else
    level, stamp, seq = struct.unpack('<ddd', raw)
  end
  if now > stamp then
    if cap <= level or exact_at_least(stamp, now, cap, cap, level, w) then
      level, stamp = cap, now
    elseif now - stamp >= FOLD_AFTER * w then
      return nil
    end
  end
  local peak = level
  local elapsed = now - stamp
  if elapsed > 0 then
    peak = level + elapsed * cap / w
    if not (peak < cap) then peak = cap end
  end
  seq = seq + 1
  local left = sub_down(level, amount)
  local fresh = stamp
  if left < cap then fresh = stamp + (cap - left) * w / cap end
  if l1 == nil or peak >= l1 then return struct.pack('<dddd', left, stamp, seq, peak), seq, fresh end
  return struct.pack('<ddddddd', left, stamp, seq, seq - 1, l1, seq, peak), seq, fresh
end
