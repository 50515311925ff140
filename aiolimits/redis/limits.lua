-- aiolimits: the state of one LimitSet, decided atomically inside Redis.
--
-- The same maths as aiolimits/_algorithms/*.py, step by step: Lua numbers are doubles like
-- Python floats, so every float operation is written in the same order as there, and the two
-- give bit-identical answers (tests/test_redis_parity.py runs the Python decision tables and a
-- property against both). Keep them in step: a change to one is a change to the other.
--
-- KEYS[1] is one hash per LimitSet (its name in a hash tag, so that a Cluster keeps it in one
-- slot). Fields: "s:<limit key>" holds a limit's state (cmsgpack, which stores doubles exactly),
-- "!t" the highest server time seen (the clock never runs backwards, even across a failover to a
-- replica whose clock is behind), "!p" the end of a pause, "!g" the grant count, "!r:<key>" the
-- units refunded, "!d" the declaration and "!h" its digest (written by the client; `run` checks
-- the digest).
--
-- A KeyedLimitSet keeps each client key in a hash of its own, "<prefix>:k:{<len(name)>:<name>:<key>}"
-- (plain sets are "{<prefix>:<name>}": only a keyed hash does not start with "{"). A keyed hash
-- expires: after every operation its PEXPIRE is at least the time until its state is fresh again
-- (every bucket full, every window empty, no lease live, no pause) plus a margin, so Redis drops
-- it only once it decides exactly as a key never seen. Its ids (bucket operation numbers, slot and
-- log entry ids) start from Redis TIME in microseconds, so that a receipt from before an expiry
-- never names anything of the state made again after it (see keyed_ids below).
--
-- ARGV[1] is the operation, ARGV[2] the time: "" for Redis server time (TIME), "d<digest>" for
-- server time on a plain set's hash that must hold that declaration (see `run`), or seconds for
-- the test hook that drives the script with a fake clock. Numbers come in as Python's repr of a
-- float (which strtod reads back exactly) and go out as %.17g strings (which Python's float()
-- reads back exactly): Redis would truncate a Lua number in a reply to an integer.
--
-- Loaded two ways, from this one text (aiolimits/redis/_script.py): as a function library
-- (FUNCTION LOAD, then FCALL: this top level runs once, at load, and registers `run`), or as an
-- EVAL script where the server has no functions (Redis < 7: the whole text runs on every call).
-- The loader puts the function's name, FUNCTION_NAME, in front of the first line of a library.

-- Under EVAL a call's keys and arguments are globals; a function gets them as the arguments of
-- its callback (and reading a global that does not exist is an error there).
local EVAL = redis.register_function == nil
local EVAL_KEYS, EVAL_ARGV
if EVAL then EVAL_KEYS, EVAL_ARGV = KEYS, ARGV end

-- The call being run: its hash, its arguments, and the states it has read (set by `run` at the
-- start of every call; a library's upvalues outlive its calls, so nothing may carry over).
local key, ARGV, cache
-- Also per call: the limit of each state in the cache (by field), when a lease renewed by this
-- call runs out, whether the hash is a key's of a KeyedLimitSet (which expires), and the first id
-- of a state this call makes in it (keyed_ids).
local limit_of, fresh_hint, KEYED, id_base
-- Also per call: Redis TIME as read by the call (its reply, or nil), the time "!c" keeps and the
-- grant count it held, and whether the hash existed before the call (nil: not known).
local time_reply, now_kept, grants_seen, existed
-- Only `redis` can be read while a library loads (the standard library, cmsgpack and the rest
-- exist when its function is called): this top level uses operators, not math.huge or ldexp.
local INF = 1 / 0
local TINY = 2 ^ -1074 -- the smallest subnormal double
local PEAK_LIMIT = 512 -- PeakLog.LIMIT
local FRESH_MARGIN_MS = 1000 -- a keyed hash is kept this long after it is fresh
local MAX_TTL_MS = 9e12 -- the longest PEXPIRE a keyed hash is given (%d-exact, < 2^53)

-- The first id of a new state: 0 in a plain set's hash (which never expires); in a keyed hash,
-- Redis TIME in microseconds, above every id of an earlier incarnation of the same hash (that one
-- expired at least FRESH_MARGIN_MS after its last operation, and a state issues fewer than one id
-- per microsecond of its life). A stale receipt then names an id below the new state's: bucket
-- refunds find the peak of the whole new log (its first take, from a full bucket: nothing to give
-- back) and slot and entry ids are not found.
local function keyed_ids()
  if not KEYED then return 0 end
  if id_base == nil then
    local t = time_reply or redis.call('TIME')
    id_base = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return id_base
end

-- A whole number below 2^53 as %d: the same digits as %.17g, made much faster (the receipts of
-- the buckets and most counts are whole).
-- The last number made into text, and its text: a call writes its time three times or more.
local fmt_x, fmt_text = 0, '0'
local function fmt(x)
  if x == fmt_x and x ~= 0 then return fmt_text end
  local text
  if x >= 1 and x < 9007199254740992 and x % 1 == 0 then
    text = string.format('%d', x)
  else
    text = string.format('%.17g', x)
  end
  fmt_x, fmt_text = x, text
  return text
end

-- -- float care: math.ulp, math.nextafter, add_up, first_true of _algorithms/_base.py --------

local function ulp(x)
  if x < 0 then x = -x end
  if x == 0 then return TINY end
  if x == INF then return INF end
  local _, e = math.frexp(x)
  local u = math.ldexp(1, e - 53)
  if u < TINY then return TINY end
  return u
end

-- math.nextafter(x, inf)
local function next_up(x)
  if x ~= x or x == INF then return x end
  if x == 0 then return TINY end
  if x > 0 then return x + ulp(x) end
  local y = -x
  local m, e = math.frexp(y)
  local step
  if m == 0.5 and y > math.ldexp(1, -1022) then
    step = math.ldexp(1, e - 54) -- just below a power of two the floats are twice as dense
  else
    step = ulp(y)
  end
  return -(y - step)
end

-- math.nextafter(x, -inf)
local function next_down(x)
  return -next_up(-x)
end

local function add_up(a, b)
  local s = a + b
  local bb = s - a
  local err = (a - (s - bb)) + (b - bb)
  if err > 0 then return next_up(s) end
  return s
end

local function first_true(pred, approx, lo)
  if pred(lo) then return lo end
  local hi = approx
  if lo > approx then hi = lo end
  if not (hi < INF) then return INF end -- nan or inf: a state out of the number range
  local below, step
  if not pred(hi) then
    below = hi
    if hi ~= 0 then step = ulp(hi) else step = ulp(1.0) end
    hi = hi + step
    -- The step doubles: at most about 2,100 rounds (the float exponent range), whatever the
    -- numbers, and none past infinity, where nothing finite holds.
    while not pred(hi) do
      if hi == INF then return INF end
      below = hi
      step = step * 2
      hi = hi + step
    end
  else
    below = next_down(hi)
    if hi ~= 0 then step = ulp(hi) else step = ulp(1.0) end
    while below > lo and pred(below) do
      hi = below
      step = step * 2
      local x = hi - step
      if x > lo then below = x else below = lo end
    end
    if lo > below then below = lo end
  end
  while true do
    local mid = below + (hi - below) / 2
    if mid <= below or mid >= hi then return hi end
    if pred(mid) then hi = mid else below = mid end
  end
end

-- The rounding error of the product p = a * b (Dekker): p + err is the exact product. It stands
-- in for Python's Fraction comparison in TokenBucketState._has.
local SPLITTER = 134217729 -- 2^27 + 1
local function split(a)
  local c = SPLITTER * a
  local hi = c - (c - a)
  return hi, a - hi
end
local function product_error(a, b, p)
  local ah, al = split(a)
  local bh, bl = split(b)
  return ((ah * bh - p) + ah * bl + al * bh) + al * bl
end

-- a - b rounded down (TokenBucketState's sub_down): two-sum of a and -b gives the exact error.
local function sub_down(a, b)
  local s = a - b
  local bb = s - a
  local err = (a - (s - bb)) + (-b - bb)
  if err < 0 then return next_down(s) end
  return s
end

-- The exact sign of the sum of the floats xs (Shewchuk's grow-expansion: each x is added to a
-- non-overlapping expansion with two-sums, which lose nothing; the sign of an expansion is that
-- of its largest component, the last non-zero one).
local function exact_sign(xs)
  local e = {}
  for i = 1, #xs do
    local q = xs[i]
    local h = {}
    for j = 1, #e do
      local sum = q + e[j]
      local bb = sum - q
      local err = (q - (sum - bb)) + (e[j] - bb)
      if err ~= 0 then h[#h + 1] = err end
      q = sum
    end
    h[#h + 1] = q
    e = h
  end
  for i = #e, 1, -1 do
    if e[i] > 0 then return 1 end
    if e[i] < 0 then return -1 end
  end
  return 0
end

-- Whether (t1 - t0)·c >= (n - lv)·w exactly (TokenBucketState._has): the floats decide when
-- they are clearly apart (by the same relative bound as there), the exact sign of the expanded difference
-- otherwise; the same answer as Python's rationals.
local APART = 1 + 2 ^ -49 -- TokenBucketState's _APART and _NORMAL
local NORMAL = 2 ^ -1000
local FOLD_AFTER = 1024 -- TokenBucketState's _FOLD_AFTER
local function exact_at_least(t0, t1, c, n, lv, w)
  local lhs = (t1 - t0) * c
  local rhs = (n - lv) * w
  if lhs > rhs * APART and rhs > NORMAL then return true end
  if rhs > lhs * APART and lhs > NORMAL then return false end
  -- t1 - t0 = e1 + e2 and n - lv = d1 + d2 exactly (two-sums), then each product exactly.
  local e1 = t1 - t0
  local bb = e1 - t1
  local e2 = (t1 - (e1 - bb)) + (-t0 - bb)
  local d1 = n - lv
  bb = d1 - n
  local d2 = (n - (d1 - bb)) + (-lv - bb)
  local p1, p2, q1, q2 = c * e1, c * e2, w * d1, w * d2
  return exact_sign({
    p1, product_error(c, e1, p1), p2, product_error(c, e2, p2),
    -q1, -product_error(w, d1, q1), -q2, -product_error(w, d2, q2),
  }) >= 0
end

-- -- PeakLog and give_back --------------------------------------------------------------------

local function new_peaks()
  return { seq = keyed_ids(), seqs = {}, levels = {} }
end

-- bisect_right, 1-based: the first index whose seq is > seq
local function after_seq(seqs, seq)
  local lo, hi = 1, #seqs + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if seq < seqs[mid] then hi = mid else lo = mid + 1 end
  end
  return lo
end

local function peak_record(log, level)
  log.seq = log.seq + 1
  local levels, seqs = log.levels, log.seqs
  while #levels > 0 and levels[#levels] <= level do
    levels[#levels] = nil
    seqs[#seqs] = nil
  end
  levels[#levels + 1] = level
  seqs[#seqs + 1] = log.seq
  local n = #levels
  if n > PEAK_LIMIT then
    -- Pairs (1, 2), (3, 4), ...: the older level, the newer number; an odd last stays.
    local nl, ns = {}, {}
    for i = 1, n - 1, 2 do
      nl[#nl + 1] = levels[i]
      ns[#ns + 1] = seqs[i + 1]
    end
    if n % 2 == 1 then
      nl[#nl + 1] = levels[n]
      ns[#ns + 1] = seqs[n]
    end
    log.levels, log.seqs = nl, ns
  end
  return log.seq
end

local function peak_since(log, seq)
  local i = after_seq(log.seqs, seq)
  local v = log.levels[i]
  if v == nil then return -INF end
  return v
end

local function peak_lift(log, seq, by)
  local levels, seqs = log.levels, log.seqs
  local i = after_seq(seqs, seq)
  local n = #levels
  if i > n then return end
  for j = i, n do levels[j] = levels[j] + by end
  local top, k = levels[i], i
  while k > 1 and levels[k - 1] <= top do k = k - 1 end
  if k < i then
    local d = i - k
    for j = k, n - d do
      levels[j] = levels[j + d]
      seqs[j] = seqs[j + d]
    end
    for j = n - d + 1, n do
      levels[j] = nil
      seqs[j] = nil
    end
  end
end

local function give_back(log, parts, amount, level, full)
  local keep = 0.0
  for i = 1, #parts do
    local seq, units = parts[i][1], parts[i][2]
    local peak = peak_since(log, seq)
    local room
    if level > peak then room = full - level else room = full - peak end
    keep = keep + units
    if keep > room then
      if room > 0 then keep = room else keep = 0.0 end
    end
  end
  local given
  if amount < keep then given = amount else given = keep end
  local left = given
  for i = #parts, 1, -1 do
    if left <= 0 then break end
    local part = parts[i]
    local x
    if part[2] < left then x = part[2] else x = left end
    part[2] = part[2] - x
    left = left - x
    peak_lift(log, part[1], x)
  end
  local kept = {}
  for i = 1, #parts do
    if parts[i][2] > 0 then kept[#kept + 1] = parts[i] end
  end
  for i = 1, #parts do parts[i] = kept[i] end
  return given
end

local function find_id(list, id)
  for i = 1, #list do
    if list[i][1] == id then return i end
  end
  return nil
end

-- -- the algorithms: new(now), earliest, take, refund, charge, available -------------------
-- Each takes the state table s and the limit L = { cap = C, window = W }.

-- Each algorithm is built on first use: under EVAL a script runs from the top every time, and
-- building all six would cost more than the decision itself (a library keeps what it built).
local builders = {}
local algos = {}
local function algo(name)
  local A = algos[name]
  if A == nil then
    local build = builders[name]
    if build == nil then return nil end
    A = build()
    -- How the state is kept in its field: cmsgpack (which stores doubles exactly) unless the
    -- algorithm says otherwise.
    if A.prefix == nil then
      A.prefix = 's:'
      A.load = function(raw) return cmsgpack.unpack(raw) end
      A.dump = function(s) return cmsgpack.pack(s) end
    end
    algos[name] = A
  end
  return A
end

-- TokenBucket: the level in unit-seconds and the time it was brought up to date.
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
  A.fresh_at = function(s, L, now)
    return next_free(s)
  end
  return A
end

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
  -- When the last entry leaves the window (the log is in expiry order).
  A.fresh_at = function(s, L, now)
    local n = #s.log
    if n == 0 then return -INF end
    return s.log[n][2]
  end
  return A
end

-- FixedWindow: the current window's index, bounds and count.
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
      s.index = k
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
  -- An empty window is fresh; a counted one, once it has ended.
  A.fresh_at = function(s, L, now)
    if s.count == 0 then return -INF end
    return s.stop
  end
  return A
end

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
    local expired = {}
    for holder, lease in pairs(s.leases) do
      if lease[2] <= now then
        expired[#expired + 1] = holder
      else
        used = used + lease[1]
      end
    end
    for i = 1, #expired do s.leases[expired[i]] = nil end
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

-- -- loading and saving -----------------------------------------------------------------------

-- A library's upvalues outlive its calls: the limits its calls name, by field, and the numbers
-- of their arguments, by text, are kept from call to call (a call then parses nothing it has
-- seen before). Pure functions of their text; each table is emptied past MEMO_LIMIT entries.
local MEMO_LIMIT = 4096
local limit_memo, limit_count = {}, 0
local number_memo, number_count = {}, 0

-- tonumber(text) for an argument that recurs (a capacity, a window, an amount).
local function arg_number(text)
  local x = number_memo[text]
  if x == nil then
    x = tonumber(text)
    if x == nil then return nil end
    if number_count >= MEMO_LIMIT then number_memo, number_count = {}, 0 end
    number_memo[text] = x
    number_count = number_count + 1
  end
  return x
end

local function limit_at(i)
  -- field, algorithm, capacity, window: four ARGV entries from i
  local field, name, cap, window = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local L = limit_memo[field]
  if L ~= nil and L.algo == name and L.cap_text == cap and L.window_text == window then
    return L
  end
  local A = algo(name)
  if A == nil then error('aiolimits: unknown algorithm ' .. tostring(name)) end
  L = { field = field, algo = name, cap = arg_number(cap), window = arg_number(window),
        cap_text = cap, window_text = window, A = A }
  if limit_count >= MEMO_LIMIT then limit_memo, limit_count = {}, 0 end
  limit_memo[field] = L
  limit_count = limit_count + 1
  return L
end

-- The state of L from the text of its field (`raw`, false when absent): decoded, or read in the
-- form of an earlier version, or new.
local function load_state(L, raw, now)
  local A = L.A
  if raw then return A.load(raw) end
  if A.old_prefix ~= nil then
    local old = redis.call('HGET', key, A.old_prefix .. L.field)
    if old then
      local s = cmsgpack.unpack(old)
      s.old = true
      return s
    end
  end
  return A.new(L, now)
end

local function state_of(L, now)
  local s = cache[L.field]
  if s == nil then
    s = load_state(L, redis.call('HGET', key, L.A.prefix .. L.field), now)
    cache[L.field] = s
    limit_of[L.field] = L
  end
  return s
end

-- The field and text of the state of L, to write (a state read in an earlier form leaves it).
local function dump_state(L)
  local s = cache[L.field]
  if s.old then
    s.old = nil
    redis.call('HDEL', key, L.A.old_prefix .. L.field)
  end
  return L.A.prefix .. L.field, L.A.dump(s)
end

local function save(L)
  redis.call('HSET', key, dump_state(L))
end

local function encode_receipt(receipt)
  local out = {}
  for i = 1, #receipt do
    local part = {}
    for j = 1, #receipt[i] do part[j] = fmt(receipt[i][j]) end
    out[i] = part
  end
  return out
end

-- A receipt as text, the way acquire answers: parts separated by ';', numbers by ','.
local function receipt_text(receipt)
  if #receipt == 1 then
    local part = receipt[1]
    if #part == 2 then return fmt(part[1]) .. ',' .. fmt(part[2]) end
    if #part == 1 then return fmt(part[1]) end
  end
  local parts = {}
  for i = 1, #receipt do
    local part = {}
    for j = 1, #receipt[i] do part[j] = fmt(receipt[i][j]) end
    parts[i] = table.concat(part, ',')
  end
  return table.concat(parts, ';')
end

local function decode_receipt(text)
  local parts = {}
  for p in string.gmatch(text, '[^;]+') do
    local part = {}
    for x in string.gmatch(p, '[^,]+') do part[#part + 1] = tonumber(x) end
    parts[#parts + 1] = part
  end
  return parts
end

-- The time of a call, given the high-water mark stored in "!t" (`last`, as stored: false when
-- absent), and whether "!t" is to be set to it.
-- "!c" holds the highest server time seen and the grant count, as two little-endian doubles
-- (struct: no text to parse or print on the hot path). `clock_of` reads it (false when absent).
local function clock_of(raw)
  if not raw then return -INF, 0 end
  return struct.unpack('<dd', raw)
end

local function clock_text(now, grants)
  return struct.pack('<dd', now, grants)
end

-- The time of a call, given the high-water mark read from "!c" (`last`), and whether "!c" is to
-- be set to it.
local function clock(last)
  local given = ARGV[2]
  if given ~= '' then return tonumber(given), false end
  local t = redis.call('TIME')
  time_reply = t
  local now = t[1] + t[2] / 1000000
  if last > now then return last, false end
  return now, true
end

-- The time of a call and the grant count, "!c" brought up to date.
local function read_now()
  local raw = redis.call('HGET', key, '!c')
  local last, grants = clock_of(raw)
  local now, stamp = clock(last)
  -- A keyed hash is not made just to hold the time (asking about a key never seen leaves
  -- nothing behind); its first write makes it, and the time is kept from its next call.
  if stamp and (raw or not KEYED or redis.call('EXISTS', key) == 1) then
    redis.call('HSET', key, '!c', clock_text(now, grants))
  end
  if stamp then now_kept = now else now_kept = last end
  grants_seen = grants
  return now
end

-- The end of the pause ("!p", as text), read once per call.
local paused
local function paused_until()
  if paused == nil then paused = tonumber(redis.call('HGET', key, '!p') or '') or -INF end
  return paused
end

-- Items from ARGV[first]: n, then per item field, algorithm, capacity, window, amount.
local function read_items(first)
  local n = tonumber(ARGV[first])
  local items = {}
  for j = 0, n - 1 do
    local i = first + 1 + 5 * j
    local L = limit_at(i)
    local amount = arg_number(ARGV[i + 4])
    if amount > L.cap then
      error('aiolimits: amount ' .. ARGV[i + 4] .. ' exceeds the capacity of ' .. L.field)
    end
    items[#items + 1] = { L, amount, ARGV[i + 4] }
  end
  return items
end

-- Scheduler.admit_time: (rate_at, admit_at) for the items at now, and when a lease of a full
-- resource among them runs out (inf: none is full, or none has a lease). `p`: the end of a pause,
-- if already read.
local function admit_time(items, now, p)
  if p == nil then p = paused_until() end
  local at
  if p > now then at = p else at = now end
  local blocked = false
  local expiry = INF
  for j = 1, #items do
    local L, amount = items[j][1], items[j][2]
    local s = state_of(L, now)
    local t = L.A.earliest(s, L, amount, now)
    if t > at then
      if t == INF then
        blocked = true
        local e = L.A.next_expiry(s, now)
        if e < expiry then expiry = e end
      else
        at = t
      end
    end
  end
  if blocked then return at, INF, expiry end
  return at, at, expiry
end

-- -- operations -----------------------------------------------------------------------------

local ops = {}

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

-- acquire: holder, lease seconds, items. Takes every item at once when all admit now:
-- "1 now receipt..." (receipt_text per item, empty for a resource); otherwise takes nothing:
-- "0 now rate_at admit_at expiry". One line of text: the most frequent reply is the cheapest to
-- make and to read as one string (nested replies cost more than the decision on both sides).
-- The most frequent operation, so it reads every field it needs in one HMGET ("!c", "!p", the
-- declaration's digest "!h" when `digest` is given, the states) and writes in one HSET: three
-- redis.calls with TIME. Buckets in their common form are decided and taken on their text
-- (bucket_has, bucket_take); the rest, and every refusal, go the general way (admit_time).
-- Nil when the hash does not hold the digest.
local function acquire(digest)
  local holder = ARGV[3]
  local items = read_items(5)
  local n = #items
  local fields = { '!c', '!p' }
  local first = 2
  if digest ~= nil then
    fields[3] = '!h'
    first = 3
  end
  for j = 1, n do
    local L = items[j][1]
    fields[first + j] = L.A.prefix .. L.field
  end
  local got = redis.call('HMGET', key, unpack(fields))
  if digest ~= nil and got[3] ~= digest then return nil end
  local last, grants = clock_of(got[1])
  local now, stamp = clock(last)
  if stamp then now_kept = now else now_kept = last end
  paused = tonumber(got[2] or '') or -INF
  existed = (got[1] or got[2]) and true or false
  -- Whether every item admits now, the buckets asked on their text.
  local admits = paused <= now
  for j = 1, n do
    if not admits then break end
    local L, amount = items[j][1], items[j][2]
    local raw = got[first + j]
    if raw then existed = true end
    if L.A.bucket and bucket_fast(raw) then
      admits = bucket_has(raw, L, amount, now)
    else
      local s = load_state(L, raw, now)
      cache[L.field] = s
      limit_of[L.field] = L
      admits = L.A.earliest(s, L, amount, now) <= now
    end
  end
  if not admits then
    for j = 1, n do
      local L = items[j][1]
      local raw = got[first + j]
      if raw then existed = true end
      if cache[L.field] == nil then
        cache[L.field] = load_state(L, raw, now)
        limit_of[L.field] = L
      end
    end
    local rate_at, admit_at, expiry = admit_time(items, now)
    if admit_at > now then
      if stamp and (existed or not KEYED) then
        redis.call('HSET', key, '!c', clock_text(now, grants))
      end
      return '0 ' .. fmt(now) .. ' ' .. fmt(rate_at) .. ' ' .. fmt(admit_at) .. ' ' .. fmt(expiry),
        now
    end
  end
  local ttl = arg_number(ARGV[4])
  local out = '1 ' .. fmt(now)
  local writes = { '!c', clock_text(now_kept, grants + 1) }
  for j = 1, n do
    local L, amount = items[j][1], items[j][2]
    local field = fields[first + j]
    local text, seq, fresh
    if cache[L.field] == nil and L.A.bucket and bucket_fast(got[first + j]) then
      text, seq, fresh = bucket_take(got[first + j], L, amount, now)
      if text ~= nil and fresh > fresh_hint then fresh_hint = fresh end
      if text == nil then
        cache[L.field] = load_state(L, got[first + j], now)
        limit_of[L.field] = L
      end
    end
    if text ~= nil then
      out = out .. ' ' .. fmt(seq) .. ',' .. items[j][3]
    else
      if cache[L.field] == nil then
        cache[L.field] = load_state(L, got[first + j], now)
        limit_of[L.field] = L
      end
      local receipt = L.A.take(cache[L.field], L, amount, now, holder, ttl)
      field, text = dump_state(L)
      local part = receipt[1]
      if #receipt == 1 and #part == 2 and part[2] == amount then
        -- A bucket's or a window's receipt takes the amount: its text is the argument's.
        out = out .. ' ' .. fmt(part[1]) .. ',' .. items[j][3]
      else
        out = out .. ' ' .. receipt_text(receipt)
      end
    end
    writes[2 * j + 1] = field
    writes[2 * j + 2] = text
  end
  redis.call('HSET', key, unpack(writes))
  return out, now
end

-- batch: lease seconds, m, then per request holder and items (as for acquire). The queue of one
-- process, decided in its order: each request is taken when all its items admit now, up to the
-- first that does not (FIFO: nobody passes it). {now, k admitted, {receipts per item} per
-- admitted request, then for the one that stopped it {rate_at, admit_at, expiry} or nothing}.
ops.batch = function(now)
  local ttl, m = tonumber(ARGV[3]), tonumber(ARGV[4])
  local granted = {}
  local refused = {}
  local at = 5
  for _ = 1, m do
    local holder = ARGV[at]
    local n = tonumber(ARGV[at + 1])
    local items = read_items(at + 1)
    at = at + 2 + 5 * n
    local rate_at, admit_at, expiry = admit_time(items, now)
    if admit_at > now then
      refused = { fmt(rate_at), fmt(admit_at), fmt(expiry) }
      break
    end
    local receipts = {}
    for j = 1, #items do
      local L, amount = items[j][1], items[j][2]
      receipts[j] = encode_receipt(L.A.take(state_of(L, now), L, amount, now, holder, ttl))
    end
    granted[#granted + 1] = receipts
  end
  local writes = {}
  for field, _ in pairs(cache) do
    local name, text = dump_state(limit_of[field])
    writes[#writes + 1] = name
    writes[#writes + 1] = text
  end
  if #granted > 0 then
    writes[#writes + 1] = '!c'
    writes[#writes + 1] = clock_text(now_kept, grants_seen + #granted)
  end
  if #writes > 0 then redis.call('HSET', key, unpack(writes)) end
  return { fmt(now), #granted, granted, refused }
end

-- earliest: items. {now, rate_at, admit_at, expiry}, changing nothing.
ops.earliest = function(now)
  local items = read_items(3)
  local rate_at, admit_at, expiry = admit_time(items, now)
  return { fmt(now), fmt(rate_at), fmt(admit_at), fmt(expiry) }
end

-- settle: n, then per limit field, algorithm, capacity, window, held, usage, receipt.
-- Scheduler.settle for each: refund (usage < held) or charge (usage > held).
-- {now, refunded in all, then per limit {receipt, held now, given back}}.
ops.settle = function(now)
  local n = tonumber(ARGV[3])
  local out = {}
  local refunded = 0
  for j = 0, n - 1 do
    local i = 4 + 7 * j
    local L = limit_at(i)
    local held, usage = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
    local receipt = decode_receipt(ARGV[i + 6])
    local s = state_of(L, now)
    local given = 0
    if usage < held then
      given = L.A.refund(s, L, receipt, held - usage, now)
      held = held - given
      if given > 0 then
        redis.call('HINCRBYFLOAT', key, '!r:' .. L.field, fmt(given))
        refunded = refunded + given
      end
    elseif usage > held then
      receipt = L.A.charge(s, L, receipt, usage - held, now)
      held = usage
    end
    save(L)
    out[#out + 1] = { encode_receipt(receipt), fmt(held), fmt(given) }
  end
  -- Units given back may admit a waiter of another process: wake them.
  if refunded > 0 then redis.call('PUBLISH', key .. ':wake', '') end
  table.insert(out, 1, fmt(refunded))
  table.insert(out, 1, fmt(now))
  return out
end

-- renew: holder, lease seconds, then resource fields. Extends the holder's live leases to
-- now + seconds: {now, leases renewed} (fewer than asked: a lease had already expired).
ops.renew = function(now)
  local holder, ttl = ARGV[3], tonumber(ARGV[4])
  local renewed = 0
  for i = 5, #ARGV do
    local raw = redis.call('HGET', key, 's:' .. ARGV[i])
    if raw then
      local s = cmsgpack.unpack(raw)
      local lease = s.leases[holder]
      if lease ~= nil and lease[2] > now then
        lease[2] = now + ttl
        fresh_hint = now + ttl
        renewed = renewed + 1
        redis.call('HSET', key, 's:' .. ARGV[i], cmsgpack.pack(s))
      end
    end
  end
  return { fmt(now), renewed }
end

-- pause: seconds[, end]. Nobody is admitted before now + seconds (or the end given, in the
-- test clock's time: the exact end a keyed set's pause of every key set earlier); the later end
-- of two pauses wins.
ops.pause = function(now)
  local untill = now + tonumber(ARGV[3])
  if ARGV[4] ~= nil and ARGV[4] ~= '' then untill = tonumber(ARGV[4]) end
  if untill > paused_until() then
    redis.call('HSET', key, '!p', fmt(untill))
    paused = untill
  end
  return { fmt(now) }
end

-- stats: n, then per limit field, algorithm, capacity, window. {now, paused until, granted,
-- then per limit {available, in use (resources; else 0), refunded}}, changing nothing.
ops.stats = function(now)
  local n = tonumber(ARGV[3])
  local out = { fmt(now), fmt(paused_until()), fmt(grants_seen) }
  for j = 0, n - 1 do
    local L = limit_at(4 + 4 * j)
    local s = state_of(L, now)
    local used = 0
    if L.algo == 'resource' then used = L.A.in_use(s, now) end
    out[#out + 1] = {
      fmt(L.A.available(s, L, now)), fmt(used),
      redis.call('HGET', key, '!r:' .. L.field) or '0',
    }
  end
  return out
end

-- -- keyed hashes: expiry ------------------------------------------------------------------

-- Keep a keyed hash at least until every state this call read or changed is fresh again, and
-- the pause is over, plus the margin. The hash's TTL is only ever lengthened: the states this
-- call did not read have not changed since an earlier call covered them. (The TTL is in Redis
-- time; under the test clock, it is the test clock's seconds until fresh.)
local function keyed_expire(now)
  local fresh = paused_until()
  if fresh_hint > fresh then fresh = fresh_hint end
  for field, s in pairs(cache) do
    local L = limit_of[field]
    local at = L.A.fresh_at(s, L, now)
    if at > fresh then fresh = at end
  end
  local ms = FRESH_MARGIN_MS
  if fresh > now then ms = ms + math.ceil((fresh - now) * 1000) end
  -- A debt can put freshness centuries away (the number range bounds it, not to a TTL Redis
  -- takes): PEXPIRE needs a whole number of ms that Redis can add to its clock. A hash kept
  -- MAX_TTL_MS (about 285 years) is kept for good in practice.
  if not (ms < MAX_TTL_MS) then ms = MAX_TTL_MS end
  if EVAL or not existed then
    if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
  else
    -- The hash had its TTL before this call: lengthened in one call (GT, Redis 7, as are
    -- functions).
    redis.call('PEXPIRE', key, ms, 'GT')
  end
end

-- release: holder, then resource fields. Ends the holder's leases: {now, leases ended}. Every
-- resource acquisition ends with one, so it is lean too: it makes no decision, so it reads no
-- clock ('' for now) unless a keyed hash's expiry needs the time or the test clock gives it, and
-- it reads the declaration's digest (`digest`), the clock and the leases in one HMGET. Nil when
-- the hash does not hold the digest.
local function release(digest)
  local holder = ARGV[3]
  local fields = { '!c' }
  local first = 1
  if digest ~= nil then
    fields[2] = '!h'
    first = 2
  end
  for i = 4, #ARGV do fields[first + i - 3] = 's:' .. ARGV[i] end
  local got = redis.call('HMGET', key, unpack(fields))
  if digest ~= nil and got[2] ~= digest then return nil end
  local now
  if KEYED or ARGV[2] ~= '' then now = clock((clock_of(got[1]))) end
  local ended = 0
  local writes = {}
  for i = 4, #ARGV do
    local raw = got[first + i - 3]
    if raw then
      existed = true
      local s = cmsgpack.unpack(raw)
      if s.leases[holder] ~= nil then
        s.leases[holder] = nil
        ended = ended + 1
        writes[#writes + 1] = fields[first + i - 3]
        writes[#writes + 1] = cmsgpack.pack(s)
      end
    end
  end
  if ended > 0 then
    redis.call('HSET', key, unpack(writes))
    redis.call('PUBLISH', key .. ':wake', '')
  end
  if now == nil then return { '', ended }, now end
  return { fmt(now), ended }, now
end

local function run(keys, args)
  key, ARGV, cache = keys[1], args, {}
  limit_of, fresh_hint, id_base = {}, -INF, nil
  time_reply, now_kept, grants_seen, existed, paused = nil, -INF, 0, nil, nil
  KEYED = string.sub(key, 1, 1) ~= '{'
  local op = ARGV[1]
  local digest
  if string.sub(ARGV[2], 1, 1) == 'd' then
    -- Redis server time, on a plain set's hash that must hold the declaration this client
    -- checked when it attached: "d" and the digest of it, which the client keeps in "!h" next to
    -- the declaration "!d". Another digest there, or none, and Redis lost the set's data (and
    -- someone may have declared the name otherwise since): nothing is done, and the client
    -- declares it again, checking it as when it attached, before it sends the call once more.
    -- (acquire reads "!h" with its state.)
    digest = string.sub(ARGV[2], 2)
    ARGV[2] = ''
    if op ~= 'acquire' and op ~= 'release' and redis.call('HGET', key, '!h') ~= digest then
      return redis.error_reply('aiolimits-undeclared: ' .. key)
    end
  end
  local reply, now
  if op == 'acquire' then
    reply, now = acquire(digest) -- it reads the clock with its state
    if reply == nil then return redis.error_reply('aiolimits-undeclared: ' .. key) end
  elseif op == 'release' then
    reply, now = release(digest)
    if reply == nil then return redis.error_reply('aiolimits-undeclared: ' .. key) end
  else
    local run_op = ops[op]
    if run_op == nil then error('aiolimits: unknown operation ' .. tostring(op)) end
    now = read_now()
    reply = run_op(now)
  end
  if KEYED then keyed_expire(now) end
  return reply
end

if EVAL then return run(EVAL_KEYS, EVAL_ARGV) end
-- Writes (the state, and the high-water mark of the clock even when only asking): no flags.
redis.register_function({ function_name = FUNCTION_NAME, callback = run })
