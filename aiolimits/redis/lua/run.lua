-- aiolimits library, run.lua: loading and saving states, the operations, a keyed hash's expiry,
-- and the entry point `run`. Loaded last (see base.lua).

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
        cap_text = cap, window_text = window, A = A, hfield = A.prefix .. field }
  if limit_count >= MEMO_LIMIT then limit_memo, limit_count = {}, 0 end
  limit_memo[field] = L
  limit_count = limit_count + 1
  return L
end

-- The state of L from the value of its field (`raw`, false when absent): decoded, or read in the
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
  if #receipt == 0 then return '' end
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

-- "!c" holds the highest server time seen and the grant count, as two little-endian doubles
-- (struct: no text to parse or print on the hot path). `clock_of` reads it (`raw` false: absent).
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

-- Items from ARGV[first]: n, then per item field, algorithm, capacity, window, amount. The
-- list and its tables are reused by the next call (a call reads its items again only once it
-- is done with the last: batch), so a call builds none.
local item_list = {}
local function read_items(first)
  local n = tonumber(ARGV[first])
  local items = item_list
  for j = 1, n do
    local i = first - 4 + 5 * j
    local L = limit_at(i)
    local text = ARGV[i + 4]
    local amount = arg_number(text)
    if amount > L.cap then
      error('aiolimits: amount ' .. text .. ' exceeds the capacity of ' .. L.field)
    end
    local item = items[j]
    if item == nil then
      items[j] = { L, amount, text }
    else
      item[1], item[2], item[3] = L, amount, text
    end
  end
  for j = #items, n + 1, -1 do items[j] = nil end
  return items
end

-- Whether this call refused a request for a full resource: it sets "!w", and the next release
-- that ends a lease then wakes the waiters (PUBLISH), and clears it. Only a release can admit
-- such a request (or its lease's expiry, which each waiter watches), and every such waiter, of
-- any process, was refused by a call that set "!w": a release nobody waits for publishes
-- nothing (a PUBLISH costs Redis a call and every subscribed process a wake-up).
local refused_for_resource

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
        refused_for_resource = true
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
  local first = 2
  local got
  -- (Most calls name one limit: its HMGET is made without a table of fields.)
  if n == 1 then
    local f1 = items[1][1].hfield
    if digest ~= nil then
      got = redis.call('HMGET', key, '!c', '!p', f1, '!h')
    else
      got = redis.call('HMGET', key, '!c', '!p', f1)
    end
  else
    local fields = { '!c', '!p' }
    for j = 1, n do fields[first + j] = items[j][1].hfield end
    if digest ~= nil then fields[n + 3] = '!h' end
    got = redis.call('HMGET', key, unpack(fields))
  end
  if digest ~= nil and (got[n + 3] or '') ~= digest then return nil end
  local last, grants = clock_of(got[1])
  local now, stamp = clock(last)
  -- The time as the reply gives it: Redis TIME's own two numbers when it is that (no number
  -- is printed: %.17g costs as much as a redis.call), else %.17g.
  local now_text
  if stamp then
    now_kept = now
    now_text = time_reply[1] .. ':' .. time_reply[2]
  else
    now_kept = last
    now_text = fmt(now)
  end
  paused = tonumber(got[2] or '') or -INF
  existed = (got[1] or got[2]) and true or false
  -- Whether every item admits now, the buckets asked on the bytes of their fields.
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
      return '0 ' .. now_text .. ' ' .. fmt(rate_at) .. ' ' .. fmt(admit_at) .. ' ' .. fmt(expiry),
        now
    end
  end
  local ttl = arg_number(ARGV[4])
  local out = '1 ' .. now_text
  local clock_now = clock_text(now_kept, grants + 1)
  local writes
  if n ~= 1 then writes = { '!c', clock_now } end
  for j = 1, n do
    local L, amount = items[j][1], items[j][2]
    local field = L.hfield
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
    if n == 1 then
      redis.call('HSET', key, '!c', clock_now, field, text)
      return out, now
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
ops.batch = function(now, keep_time)
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
  elseif keep_time then
    writes[#writes + 1] = '!c'
    writes[#writes + 1] = clock_text(now, grants_seen)
  end
  if #writes > 0 then redis.call('HSET', key, unpack(writes)) end
  return { fmt(now), #granted, granted, refused }
end

-- What read_now does for a batch, and more in the same HMGET: the pause, the declaration's
-- digest (`digest`, when given) and the states its first request names (most often every
-- request names the same limits), so that a batch of one key's waiters makes three redis.calls
-- (HMGET, TIME, HSET) as acquire does, rather than one per field. "!c" is written with the states
-- (ops.batch), or alone when nothing was granted. The time, or nil when the hash does not hold
-- the digest.
local function batch_read(digest)
  local items = read_items(6)
  local n = #items
  local fields = { '!c', '!p' }
  for j = 1, n do fields[2 + j] = items[j][1].hfield end
  if digest ~= nil then fields[n + 3] = '!h' end
  local got = redis.call('HMGET', key, unpack(fields))
  if digest ~= nil and (got[n + 3] or '') ~= digest then return nil end
  local last, grants = clock_of(got[1])
  local now, stamp = clock(last)
  if stamp then now_kept = now else now_kept = last end
  grants_seen = grants
  paused = tonumber(got[2] or '') or -INF
  existed = (got[1] or got[2]) and true or false
  for j = 1, n do
    local L = items[j][1]
    local raw = got[2 + j]
    if raw then existed = true end
    cache[L.field] = load_state(L, raw, now)
    limit_of[L.field] = L
  end
  -- As read_now: the time kept even when nothing is granted, in a hash that exists.
  local keep_time = stamp and (got[1] or not KEYED or existed or redis.call('EXISTS', key) == 1)
  return now, keep_time
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

-- change: the limit field, algorithm, capacity, window, then its new capacity and window, the
-- numbers of every limit now ("!n", JSON) and their digest ("!h"). The state is carried over
-- as semantics §4 says (each algorithm's `change`) and saved in its usual form; the client sent
-- the digest it knew, so a change made meanwhile by another client makes this one read the
-- numbers again first. The memo of limits by argument text is keyed on the numbers' text, so
-- the old numbers are never served for the new: the new limit replaces the old one in it.
ops.change = function(now)
  local L = limit_at(3)
  local N = { field = L.field, algo = L.algo, cap = arg_number(ARGV[7]),
              window = arg_number(ARGV[8]), cap_text = ARGV[7], window_text = ARGV[8], A = L.A,
              hfield = L.hfield }
  local s = state_of(L, now)
  L.A.change(s, L, N, now)
  limit_of[L.field] = N
  limit_memo[L.field] = N
  save(N)
  redis.call('HSET', key, '!n', ARGV[9], '!h', ARGV[10])
  -- Every client's head asks again (with the numbers it reads first): a limit that grew
  -- admits at once.
  redis.call('PUBLISH', key .. ':wake', '')
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
    if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, fmt(ms)) end
  else
    -- The hash had its TTL before this call: lengthened in one call (GT, Redis 7, as are
    -- functions). (fmt: a number given to redis.call is printed as %.14g, and most calls of
    -- one key give the TTL of the last.)
    redis.call('PEXPIRE', key, fmt(ms), 'GT')
  end
end

-- release: holder, then resource fields. Ends the holder's leases: {now, leases ended}. Every
-- resource acquisition ends with one, so it is lean too: it makes no decision, so it reads no
-- clock ('' for now) unless a keyed hash's expiry needs the time or the test clock gives it, and
-- it reads the declaration's digest (`digest`), the clock and the leases in one HMGET. Nil when
-- the hash does not hold the digest.
local function release(digest)
  local holder = ARGV[3]
  local fields = { '!c', '!w' }
  local first = 2
  if digest ~= nil then
    fields[3] = '!h'
    first = 3
  end
  for i = 4, #ARGV do fields[first + i - 3] = 's:' .. ARGV[i] end
  local got = redis.call('HMGET', key, unpack(fields))
  if digest ~= nil and (got[3] or '') ~= digest then return nil end
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
    local wake = got[2] == '1' -- (refused_for_resource)
    if wake then
      writes[#writes + 1] = '!w'
      writes[#writes + 1] = '0'
    end
    redis.call('HSET', key, unpack(writes))
    if wake then redis.call('PUBLISH', key .. ':wake', '') end
  end
  if now == nil then return { '', ended }, now end
  return { fmt(now), ended }, now
end

-- A keyed hash that does not exist yet takes the digest of the numbers its first call was sent
-- with (a keyed set's calls send "d" and the digest of the numbers they know, empty for the
-- numbers declared: semantics §4); any other hash refuses a digest it does not hold.
local function unmade()
  return KEYED and redis.call('EXISTS', key) == 0
end

-- The digest a keyed hash made by this call is to hold (nil: none to write).
local stamp

local function run(keys, args)
  key, ARGV = keys[1], args
  -- The tables of the states read: new only when the last call used them.
  if cache == nil or next(cache) ~= nil or next(limit_of) ~= nil then cache, limit_of = {}, {} end
  fresh_hint, id_base = -INF, nil
  time_reply, now_kept, grants_seen, existed, paused = nil, -INF, 0, nil, nil
  refused_for_resource = false
  stamp = nil
  KEYED = string.byte(key, 1) ~= 123 -- '{'
  local op = ARGV[1]
  local digest
  if string.byte(ARGV[2], 1) == 100 then -- 'd'
    -- Redis server time, on a plain set's hash that must hold the declaration this client
    -- checked when it attached: "d" and the digest of it, which the client keeps in "!h" next to
    -- the declaration "!d". Another digest there, or none, and Redis lost the set's data (and
    -- someone may have declared the name otherwise since): nothing is done, and the client
    -- declares it again, checking it as when it attached, before it sends the call once more.
    -- (acquire reads "!h" with its state.)
    -- A keyed hash holds the digest of the numbers its states follow ("!h", absent for the
    -- numbers declared), and refuses a call sent with other numbers: the client reads the
    -- set's numbers, and brings the key up to them with `change` if it is behind.
    -- Under a simulated clock the time comes after the digest, "d<digest>@<seconds>": the same
    -- checks then, on that time (a call under server time sends no "@": one scan of the word).
    local at = string.find(ARGV[2], '@', 2, true)
    if at == nil then
      digest = string.sub(ARGV[2], 2)
      ARGV[2] = ''
    else
      digest = string.sub(ARGV[2], 2, at - 1)
      ARGV[2] = string.sub(ARGV[2], at + 1)
    end
    if op ~= 'acquire' and op ~= 'release' and (op ~= 'batch' or ARGV[4] == '0')
        and (redis.call('HGET', key, '!h') or '') ~= digest then
      if op == 'change' or not unmade() then
        return redis.error_reply('aiolimits-undeclared: ' .. key)
      end
      stamp, digest = digest, nil
    end
  end
  local reply, now
  if op == 'acquire' then
    reply, now = acquire(digest) -- it reads the clock with its state
    if reply == nil then
      if not unmade() then return redis.error_reply('aiolimits-undeclared: ' .. key) end
      stamp = digest
      reply, now = acquire(nil)
    end
  elseif op == 'release' then
    reply, now = release(digest)
    if reply == nil then
      if not unmade() then return redis.error_reply('aiolimits-undeclared: ' .. key) end
      stamp = digest
      reply, now = release(nil)
    end
  elseif op == 'batch' and ARGV[4] ~= '0' then
    local keep_time
    now, keep_time = batch_read(digest) -- it reads the clock with the first request's states
    if now == nil then
      if not unmade() then return redis.error_reply('aiolimits-undeclared: ' .. key) end
      stamp = digest
      now, keep_time = batch_read(nil)
    end
    reply = ops.batch(now, keep_time)
  else
    local run_op = ops[op]
    if run_op == nil then error('aiolimits: unknown operation ' .. tostring(op)) end
    now = read_now()
    reply = run_op(now)
  end
  if refused_for_resource then redis.call('HSET', key, '!w', '1') end
  if stamp ~= nil and stamp ~= '' and redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, '!h', stamp)
  end
  if KEYED then keyed_expire(now) end
  return reply
end

if EVAL then return run(EVAL_KEYS, EVAL_ARGV) end
-- Writes (the state, and the high-water mark of the clock even when only asking): no flags.
redis.register_function({ function_name = FUNCTION_NAME, callback = run })
