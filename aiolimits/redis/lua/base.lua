-- aiolimits: the state of one LimitSet, decided atomically inside Redis.
--
-- One library in seven files, loaded together as one text in this order (aiolimits/redis/
-- _script.py): base.lua (the per-call state, float care, the peak log, the algorithm registry),
-- one file per algorithm (token_bucket, leaky_bucket, sliding_window, fixed_window, resource),
-- then run.lua (loading and saving, the operations, `run`). They share the locals of one chunk.
--
-- The same maths as aiolimits/_algorithms/*.py, step by step: Lua numbers are doubles like
-- Python floats, so every float operation is written in the same order as there, and the two
-- give bit-identical answers (tests/test_redis_parity.py runs the Python decision tables and a
-- property against both). Keep them in step: a change to one is a change to the other.
--
-- KEYS[1] is one hash per LimitSet (its name in a hash tag, so that a Cluster keeps it in one
-- slot). Fields: "b:<limit key>" holds a TokenBucket's or GCRA's state (little-endian doubles,
-- see token_bucket.lua), "s:<limit key>" another limit's (cmsgpack, which stores doubles
-- exactly), "!c" the highest server time seen (the clock never runs backwards, even across a
-- failover to a replica whose clock is behind) and the grant count (two doubles), "!p" the end
-- of a pause, "!w" whether a request was refused for a full resource since the last release
-- that woke the waiters ("1", see run.lua), "!r:<key>" the units refunded, "!d" the declaration and "!h" its digest (written
-- by the client; `run` checks the digest), "!n" the numbers of the limits changed at run time
-- (JSON, written by `change` with a new digest). Where the script's time goes (a profile on Redis
-- 7.0): the call and its arguments, its three redis.calls (HMGET, TIME, HSET), and then mostly
-- Lua function calls, tables, and numbers parsed from or printed as text (%.17g costs as much
-- as a redis.call): hence doubles in the fields, parsed arguments kept from call to call, and a
-- fast path for buckets that builds no tables.
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
-- a simulated clock that drives the script with its own time: alone, or after the digest,
-- "d<digest>@<seconds>" (the same checks, on that time). Numbers come in as Python's repr of a
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
