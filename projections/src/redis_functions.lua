#!lua name=groupbuy_rm_@BUILD@

-- BUILD is a hash of this text, put in for its marker (in the line above too) when the library
-- is loaded (`projections::redis_store::Library`): the library and every function are named for
-- the text they run, so instances of two builds (a rolling upgrade) each call their own
-- functions in one Redis, and loading one never replaces what the other calls.
local BUILD = '@BUILD@'

local function named(name)
  return name .. '_' .. BUILD
end

-- The read models of groupbuy in Redis: every write and every query is one of these
-- functions, so each is atomic: an event's data and the record that it was applied change
-- together, and a query reads one version of a projection, never half of two.
--
-- Every function is called with B as its one declared key and again as its first argument.
-- The braces in B make <name> the hash tag of every key below, so in a Redis Cluster all of a
-- projection's keys share a slot and each call touches only that slot.
--
-- Keys, for projection base B = <prefix>:rm:{<name>} and version root R = B:v<N>:
--   B:tick      moves at every apply and switch (instances poll it for changes)
--   B:live      the version queries read        B:writing  versions live events reach
--   B:last      the last version number handed  B:versions versions that exist
--   B:lease     the version a rebuild is filling, expiring unless renewed
--   R:meta      {status, position, events}      R:sv       stream id -> last version applied
--   R:c:<id>    a campaign (hash)               R:c, R:cs:<store>  campaign ids (zsets)
--   R:o:<id>    an order (hash)                 R:pay:<id> a payment (hash)
--   R:op:<order> the payment an older log requested for an order in the payment's stream
--   R:u:<user>, R:os:<status>, R:cos:<campaign>:<status>   order ids (zsets, score 0: ULIDs
--               sort by time): a customer's, and all and a campaign's by status. A listing of
--               all or of a campaign's orders merges the status sets; of a customer's, it
--               filters theirs. (Builds before 2026-12-07 also kept R:o, R:co:<campaign> and
--               R:us:<user>:<status>; nothing reads them now.)
--   R:cf:<campaign> the campaign's orders counted by status (`rejected:<reason>`, ...)
-- Numbers travel as strings, so large ones are never rounded through Lua's doubles.

local function root(base, v)
  return base .. ':v' .. v
end

-- Whether the non-negative integer a (a string) is greater than b, exactly: nanosecond
-- timestamps do not fit Lua's doubles.
local function greater(a, b)
  if #a ~= #b then
    return #a > #b
  end
  return a > b
end

local function bump_updated(key, at)
  local updated = redis.call('HGET', key, 'updated')
  if not updated or greater(at, updated) then
    redis.call('HSET', key, 'updated', at)
  end
end

-- The sets an order is in while in status: each sorted set costs a write at placing and two
-- at each status change, so only those a listing cannot do without.
local function order_sets(r, campaign, status)
  return { r .. ':os:' .. status, r .. ':cos:' .. campaign .. ':' .. status }
end

-- What one call applied, gathered in a tally() and written by flush() as the call ends, one
-- command a key however many of the call's events touch it: the stream versions applied (read
-- once a call, kept in the tally after), the order index sets' members and the funnel's counts
-- (which nothing in an apply reads), and each version root's furthest position and count of
-- events. A sale's events all move the same few sets and counters and the one hash of stream
-- versions, and a command each of them per event was about half of the projections' time in
-- Redis: the cost of the calls, not of the work. The function is atomic, so nothing sees the
-- writes before they are all made; flush() writes them also when an op fails, so what the
-- call applied before the failure is applied whole.
-- Arguments a command takes at most from a call's gathered writes: unpack puts them all on
-- Lua's stack. Even, so that pairs (a score and its member, a field and its value) stay whole.
local WORDS_A_COMMAND = 500

local function tally()
  return {
    roots = {}, members = {}, member_keys = {}, counts = {}, count_keys = {},
    -- By version root: the stream versions read or applied in this call (numbers), and those
    -- applied, to write (as given).
    versions = {}, applied = {}, applied_roots = {},
  }
end

-- The table under key in tables, made the first time (and key then noted in order, if given).
local function table_at(tables, key, order)
  local found = tables[key]
  if not found then
    found = {}
    tables[key] = found
    if order then
      table.insert(order, key)
    end
  end
  return found
end

-- The order id member of the sorted set key (score 0), or not, once the call ends.
local function index(t, key, member, present)
  table_at(t.members, key, t.member_keys)[member] = present
end

-- Adds by to field of the hash key once the call ends.
local function count(t, key, field, by)
  local counts = t.counts[key]
  if not counts then
    counts = { fields = {}, by = {} }
    t.counts[key] = counts
    table.insert(t.count_keys, key)
  end
  if counts.by[field] == nil then
    counts.by[field] = 0
    table.insert(counts.fields, field)
  end
  counts.by[field] = counts.by[field] + by
end

-- The funnel counter of an order in status for reason (see Funnel::field).
local function funnel_field(status, reason)
  if reason == nil or reason == '' then
    return status
  end
  return status .. ':' .. reason
end

local function run_op(t, r, op)
  local kind = op.op
  if kind == 'campaign' then
    local id = op.campaign_id
    local key = r .. ':c:' .. id
    redis.call('HSET', key, 'store', op.store_id, 'sku', op.sku,
      'title', op.title, 'price', op.price_cents, 'quota', op.quota,
      'limit', op.per_user_limit, 'starts', op.starts_at, 'ends', op.ends_at,
      'timeout', op.payment_timeout_seconds)
    -- Added, not set: a bucket's moves may have come first (see 'stock').
    redis.call('HINCRBY', key, 'total', op.quota)
    redis.call('HINCRBY', key, 'available', op.quota)
    redis.call('HINCRBY', key, 'reserved', 0)
    redis.call('HINCRBY', key, 'sold', 0)
    redis.call('ZADD', r .. ':c', 0, id)
    redis.call('ZADD', r .. ':cs:' .. op.store_id, 0, id)
  elseif kind == 'stock' then
    -- Applied whatever the order: order is kept within a stream only, so a bucket's move may
    -- come before the campaign's creation (the counters then wait in a hash without terms,
    -- which queries take as no campaign) or before the move of another bucket it follows.
    local key = r .. ':c:' .. op.campaign_id
    for _, field in ipairs({ 'total', 'available', 'reserved', 'sold' }) do
      if op[field] ~= '0' then
        redis.call('HINCRBY', key, field, op[field])
      end
    end
  elseif kind == 'close' then
    local key = r .. ':c:' .. op.campaign_id
    if redis.call('EXISTS', key) == 1 then
      redis.call('HSET', key, 'closed', op.at)
    end
  elseif kind == 'order' then
    local id = op.order_id
    redis.call('HSET', r .. ':o:' .. id, 'user', op.user_id, 'campaign', op.campaign_id,
      'quantity', op.quantity, 'amount', op.amount_cents, 'status', 'pending',
      'reason', '', 'created', op.at, 'updated', op.at)
    index(t, r .. ':u:' .. op.user_id, id, true)
    for _, set in ipairs(order_sets(r, op.campaign_id, 'pending')) do
      index(t, set, id, true)
    end
    count(t, r .. ':cf:' .. op.campaign_id, 'pending', 1)
  elseif kind == 'order_status' then
    local id = op.order_id
    local key = r .. ':o:' .. id
    local found = redis.call('HMGET', key, 'status', 'campaign', 'reason', 'updated')
    local old, campaign, old_reason, updated = found[1], found[2], found[3], found[4]
    if old then
      -- One write for the status, the payment and the time (as bump_updated would set it).
      local fields = { 'status', op.status, 'reason', op.reason }
      if op.payment_id then
        table.insert(fields, 'pay')
        table.insert(fields, op.payment_id)
      end
      if not updated or greater(op.at, updated) then
        table.insert(fields, 'updated')
        table.insert(fields, op.at)
      end
      redis.call('HSET', key, unpack(fields))
      if old ~= op.status then
        for _, set in ipairs(order_sets(r, campaign, old)) do
          index(t, set, id, false)
        end
        for _, set in ipairs(order_sets(r, campaign, op.status)) do
          index(t, set, id, true)
        end
      end
      local was, now = funnel_field(old, old_reason), funnel_field(op.status, op.reason)
      if was ~= now then
        count(t, r .. ':cf:' .. campaign, was, -1)
        count(t, r .. ':cf:' .. campaign, now, 1)
      end
    end
  elseif kind == 'payment' then
    local key = r .. ':pay:' .. op.payment_id
    if op.requested then
      redis.call('HSET', key, 'amount', op.requested[2], 'status', op.status, 'updated', op.at)
      redis.call('SET', r .. ':op:' .. op.requested[1], op.payment_id)
    else
      -- The first answer starts the hash: the order's move to awaiting payment was the request.
      redis.call('HSET', key, 'status', op.status)
      bump_updated(key, op.at)
    end
  else
    error('unknown read-model op ' .. tostring(kind))
  end
end

-- The last version of stream that root r applied, as of this call.
local function done_version(t, r, stream)
  local versions = table_at(t.versions, r)
  local done = versions[stream]
  if done == nil then
    done = tonumber(redis.call('HGET', r .. ':sv', stream) or '0')
    versions[stream] = done
  end
  return done
end

-- Reads the versions of all of streams that root r applied, in one command.
local function read_versions(t, r, streams)
  if #streams == 0 then
    return
  end
  local versions = table_at(t.versions, r)
  for first = 1, #streams, WORDS_A_COMMAND do
    local last = math.min(first + WORDS_A_COMMAND - 1, #streams)
    local found = redis.call('HMGET', r .. ':sv', unpack(streams, first, last))
    for i = first, last do
      versions[streams[i]] = tonumber(found[i - first + 1] or '0')
    end
  end
end

local function count_applied(t, r, stream, version, position)
  t.versions[r][stream] = tonumber(version)
  table_at(t.applied, r, t.applied_roots)[stream] = version
  local seen = t.roots[r]
  if not seen then
    t.roots[r] = { position = position, events = 1 }
  else
    seen.events = seen.events + 1
    if greater(position, seen.position) then
      seen.position = position
    end
  end
end

-- Runs command on key with words, in as many commands as it takes.
local function in_parts(command, key, words)
  for first = 1, #words, WORDS_A_COMMAND do
    local last = math.min(first + WORDS_A_COMMAND - 1, #words)
    redis.call(command, key, unpack(words, first, last))
  end
end

-- Writes what the tally t gathered, and then raises failure (an error of an op) if any: what
-- the call applied before an op failed is applied whole, as each event's effects and its
-- stream version go together.
local function flush(t, failure)
  for _, key in ipairs(t.member_keys) do
    local added, removed = {}, {}
    for member, present in pairs(t.members[key]) do
      if present then
        table.insert(added, 0)
        table.insert(added, member)
      else
        table.insert(removed, member)
      end
    end
    in_parts('ZADD', key, added)
    in_parts('ZREM', key, removed)
  end
  for _, r in ipairs(t.applied_roots) do
    local pairs_of = {}
    for stream, version in pairs(t.applied[r]) do
      table.insert(pairs_of, stream)
      table.insert(pairs_of, version)
    end
    in_parts('HSET', r .. ':sv', pairs_of)
  end
  for _, key in ipairs(t.count_keys) do
    local counts = t.counts[key]
    for _, field in ipairs(counts.fields) do
      -- By 0 too: the field then exists, as it did when each event counted on its own.
      redis.call('HINCRBY', key, field, counts.by[field])
    end
  end
  for r, seen in pairs(t.roots) do
    local meta = r .. ':meta'
    local reached = redis.call('HGET', meta, 'position')
    if not reached or greater(seen.position, reached) then
      redis.call('HSET', meta, 'position', seen.position)
    end
    redis.call('HINCRBY', meta, 'events', seen.events)
  end
  if failure ~= nil then
    error(failure, 0)
  end
end

-- Runs apply(t) with a new tally and flushes it, also when apply fails.
local function applying(apply)
  local t = tally()
  local ok, failure = pcall(apply, t)
  flush(t, not ok and failure or nil)
end

-- Applies one change to the version root r when its stream version is new there (and, with
-- in_order, next), counting it in the tally t. Returns whether it did.
local function apply_change(t, r, stream, version, position, ops_json, in_order)
  local done = done_version(t, r, stream)
  local v = tonumber(version)
  if v <= done or (in_order and v ~= done + 1) then
    return false
  end
  for _, op in ipairs(cjson.decode(ops_json)) do
    run_op(t, r, op)
  end
  count_applied(t, r, stream, version, position)
  return true
end

-- The distinct streams of the events in args from first on (stream, version, position, ops).
local function streams_of(args, first)
  local streams, seen = {}, {}
  for i = first, #args, 4 do
    if not seen[args[i]] then
      seen[args[i]] = true
      table.insert(streams, args[i])
    end
  end
  return streams
end

-- A live event: to the live version unless done there, to building versions when next.
-- args: base, tick key, stream, version, position, ops. Returns {live version or '', applied}.
redis.register_function(named('groupbuy_apply'), function(_, args)
  local base = args[1]
  local live = redis.call('GET', base .. ':live')
  local applied = 0
  applying(function(t)
    for _, v in ipairs(redis.call('SMEMBERS', base .. ':writing')) do
      local is_live = (v == live)
      if apply_change(t, root(base, v), args[3], args[4], args[5], args[6], not is_live)
          and is_live then
        applied = 1
      end
    end
  end)
  redis.call('INCR', args[2])
  return { live or '', applied }
end)

-- Live events in order, as groupbuy_apply applies each, in one call.
-- args: base, tick key, then stream, version, position, ops for each event.
-- Returns {live version or '', applied 0|1 for each event}.
redis.register_function(named('groupbuy_apply_all'), function(_, args)
  local base = args[1]
  local live = redis.call('GET', base .. ':live')
  local writing = redis.call('SMEMBERS', base .. ':writing')
  local result = { live or '' }
  applying(function(t)
    local streams = streams_of(args, 3)
    for _, v in ipairs(writing) do
      read_versions(t, root(base, v), streams)
    end
    for i = 3, #args, 4 do
      local applied = 0
      for _, v in ipairs(writing) do
        local is_live = (v == live)
        if apply_change(t, root(base, v), args[i], args[i + 1], args[i + 2], args[i + 3],
            not is_live) and is_live then
          applied = 1
        end
      end
      table.insert(result, applied)
    end
  end)
  redis.call('INCR', args[2])
  return result
end)

-- A dead-lettered event: recorded as done in the live version, with no effect.
-- args: base, stream, version.
redis.register_function(named('groupbuy_skip'), function(_, args)
  local live = redis.call('GET', args[1] .. ':live')
  if live then
    local sv = root(args[1], live) .. ':sv'
    local done = tonumber(redis.call('HGET', sv, args[2]) or '0')
    if tonumber(args[3]) > done then
      redis.call('HSET', sv, args[2], args[3])
    end
  end
  return 1
end)

-- Starts a rebuild. args: base, lease ms. Returns {new version, abandoned versions...}.
redis.register_function(named('groupbuy_begin'), function(_, args)
  local base = args[1]
  if redis.call('EXISTS', base .. ':lease') == 1 then
    return redis.error_reply('BUSY a rebuild holds the lease')
  end
  local live = redis.call('GET', base .. ':live')
  local result = { 0 }
  for _, v in ipairs(redis.call('SMEMBERS', base .. ':writing')) do
    if v ~= live then
      redis.call('SREM', base .. ':writing', v)
      table.insert(result, v)
    end
  end
  local v = tostring(redis.call('INCR', base .. ':last'))
  result[1] = v
  redis.call('SET', base .. ':lease', v, 'PX', args[2])
  redis.call('SADD', base .. ':writing', v)
  redis.call('SADD', base .. ':versions', v)
  redis.call('HSET', root(base, v) .. ':meta', 'position', '0', 'events', '0')
  return result
end)

-- Events read from the log, into the version being built. args: base, version, lease ms,
-- then stream, version, position, ops for each event.
redis.register_function(named('groupbuy_rebuild'), function(_, args)
  local base, v = args[1], args[2]
  if redis.call('GET', base .. ':lease') ~= v then
    return redis.error_reply('LEASE_LOST the rebuild lease lapsed')
  end
  redis.call('PEXPIRE', base .. ':lease', args[3])
  local r = root(base, v)
  applying(function(t)
    read_versions(t, r, streams_of(args, 4))
    for i = 4, #args, 4 do
      apply_change(t, r, args[i], args[i + 1], args[i + 2], args[i + 3], false)
    end
  end)
  return 1
end)

-- Makes the built version live. args: base, version, tick key. Returns the replaced one or ''.
redis.register_function(named('groupbuy_finish'), function(_, args)
  local base, v = args[1], args[2]
  if redis.call('GET', base .. ':lease') ~= v then
    return redis.error_reply('LEASE_LOST the rebuild lease lapsed')
  end
  local old = redis.call('GET', base .. ':live')
  redis.call('SET', base .. ':live', v)
  if old then
    redis.call('SREM', base .. ':writing', old)
  end
  redis.call('DEL', base .. ':lease')
  redis.call('INCR', args[3])
  return old or ''
end)

-- Gives up a rebuild. args: base, version.
redis.register_function(named('groupbuy_abandon'), function(_, args)
  local base, v = args[1], args[2]
  if redis.call('GET', base .. ':lease') == v then
    redis.call('DEL', base .. ':lease')
  end
  if redis.call('GET', base .. ':live') ~= v then
    redis.call('SREM', base .. ':writing', v)
  end
  return 1
end)

-- Every version with its state. args: base. Returns {version, status, position, events}...
redis.register_function{
  function_name = named('groupbuy_versions'),
  flags = { 'no-writes' },
  callback = function(_, args)
    local base = args[1]
    local live = redis.call('GET', base .. ':live')
    local lease = redis.call('GET', base .. ':lease')
    local result = {}
    for _, v in ipairs(redis.call('SMEMBERS', base .. ':versions')) do
      local status = 'retired'
      if v == live then
        status = 'live'
      elseif v == lease or redis.call('SISMEMBER', base .. ':writing', v) == 1 then
        status = 'building'
      end
      local meta = redis.call('HMGET', root(base, v) .. ':meta', 'position', 'events')
      table.insert(result, { v, status, meta[1] or '0', meta[2] or '0' })
    end
    return result
  end,
}

local function live_root(base)
  local live = redis.call('GET', base .. ':live')
  if live then
    return root(base, live)
  end
  return nil
end

-- The live root for a query, or an error a client can tell apart: no version is live (a new
-- deployment, a flushed or restarted Redis), so there is nothing to answer from.
local function query_root(base)
  local r = live_root(base)
  if not r then
    error({ err = 'NOLIVE ' .. base .. ' has no live version' })
  end
  return r
end

-- The last version of each stream of args[2..] that version root r applied; 0 for each when r
-- is nil.
local function applied_in(r, args)
  local result = {}
  for i = 2, #args do
    local done = r and redis.call('HGET', r .. ':sv', args[i])
    result[i - 1] = tonumber(done or '0')
  end
  return result
end

-- args: base, stream ids. Returns the last version of each stream the live version applied,
-- 0 when none is live: consumers go on (live events reach a version being built), and the
-- rebuild's switch makes what they applied count.
redis.register_function{
  function_name = named('groupbuy_applied'),
  flags = { 'no-writes' },
  callback = function(_, args)
    return applied_in(live_root(args[1]), args)
  end,
}

-- groupbuy_applied for a reader waiting to see its writes: NOLIVE when no version is live,
-- since none will show them until a rebuild makes one live.
redis.register_function{
  function_name = named('groupbuy_shown'),
  flags = { 'no-writes' },
  callback = function(_, args)
    return applied_in(query_root(args[1]), args)
  end,
}

-- args: base, campaign id. Returns the campaign's fields, flat.
redis.register_function{
  function_name = named('groupbuy_campaign'),
  flags = { 'no-writes' },
  callback = function(_, args)
    local key = query_root(args[1]) .. ':c:' .. args[2]
    if redis.call('HEXISTS', key, 'sku') == 0 then
      return {}
    end
    return redis.call('HGETALL', key)
  end,
}

-- args: base, index ('c' or 'cs:<store>'), most to return. Returns {id, fields}..., oldest
-- first.
redis.register_function{
  function_name = named('groupbuy_campaigns'),
  flags = { 'no-writes' },
  callback = function(_, args)
    local r = query_root(args[1])
    local result = {}
    for _, id in ipairs(redis.call('ZRANGE', r .. ':' .. args[2], 0, tonumber(args[3]) - 1)) do
      table.insert(result, { id, redis.call('HGETALL', r .. ':c:' .. id) })
    end
    return result
  end,
}

local function order_of(r, id)
  local fields = redis.call('HGETALL', r .. ':o:' .. id)
  if #fields == 0 then
    return nil
  end
  local pay = redis.call('HGET', r .. ':o:' .. id, 'pay') or redis.call('GET', r .. ':op:' .. id)
  local payment = {}
  if pay then
    payment = redis.call('HGETALL', r .. ':pay:' .. pay)
  end
  return { id, fields, payment, pay or '' }
end

-- args: base, campaign id. Returns the campaign's funnel counters, flat.
redis.register_function{
  function_name = named('groupbuy_funnel'),
  flags = { 'no-writes' },
  callback = function(_, args)
    local r = query_root(args[1])
    return redis.call('HGETALL', r .. ':cf:' .. args[2])
  end,
}

-- args: base, order id. Returns {id, order fields, payment fields, payment id}, or nil.
redis.register_function{
  function_name = named('groupbuy_order'),
  flags = { 'no-writes' },
  callback = function(_, args)
    local r = query_root(args[1])
    return order_of(r, args[2]) or false
  end,
}

-- The newest n ids below max (a ZRANGEBYLEX bound) in any of the sorted sets named
-- indexes[first..], newest first.
local function newest_ids(r, indexes, first, max, n)
  if #indexes == first then
    return redis.call('ZREVRANGEBYLEX', r .. ':' .. indexes[first], max, '-', 'LIMIT', 0, n)
  end
  local ids = {}
  for i = first, #indexes do
    for _, id in ipairs(redis.call('ZREVRANGEBYLEX', r .. ':' .. indexes[i], max, '-',
        'LIMIT', 0, n)) do
      table.insert(ids, id)
    end
  end
  table.sort(ids, function(a, b) return a > b end)
  for i = #ids, n + 1, -1 do
    ids[i] = nil
  end
  return ids
end

-- A page of orders, newest first. args: base, the id to start after ('' for the newest), how
-- many, the campaign and the status the orders must have ('' for any), then the sorted sets
-- to walk (e.g. 'u:<user>'; several are merged). Returns {orders, more}, each order as
-- groupbuy_order returns it.
redis.register_function{
  function_name = named('groupbuy_orders'),
  flags = { 'no-writes' },
  callback = function(_, args)
    local r = query_root(args[1])
    local limit, campaign, status = tonumber(args[3]), args[4], args[5]
    local max = '+'
    if args[2] ~= '' then
      max = '(' .. args[2]
    end
    local items = {}
    while true do
      local ids = newest_ids(r, args, 6, max, limit + 1)
      for _, id in ipairs(ids) do
        local wanted = true
        if campaign ~= '' or status ~= '' then
          local found = redis.call('HMGET', r .. ':o:' .. id, 'campaign', 'status')
          wanted = (campaign == '' or found[1] == campaign)
            and (status == '' or found[2] == status)
        end
        local order = wanted and order_of(r, id)
        if order then
          if #items == limit then
            return { items, 1 }
          end
          table.insert(items, order)
        end
      end
      if #ids <= limit then
        return { items, 0 }
      end
      max = '(' .. ids[#ids]
    end
  end,
}
