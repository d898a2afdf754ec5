#!lua name=imrelay_inbox
-- Stored delivery in cluster mode (protocol.md, section 18.1): one user's inbox in Redis.
--
-- Keys of user U (each function takes its keys in this order):
--   imrelay:ib:U  a stream: one entry per stored message, ID <seq>-0, fields
--                 f (the INBOX_DELIVER frame), o (8 bytes: the device a copy came from),
--                 t (when it was stored, Unix ms, Redis's clock). Expires ttl after its
--                 newest message, so an abandoned inbox leaves nothing behind.
--   imrelay:ih:U  a hash: last (last seq handed out), exp (expired up to), del (deleted
--                 by acknowledgements up to), n (messages held), b (bytes charged).
--   imrelay:iv:U  a hash: device tag (decimal) -> "<acked>:<seen ms>".
-- Shared: imrelay:epoch (the store's epoch), imrelay:ihigh (the highest seq handed out
-- by any inbox: an inbox whose hash expired numbers on after it, so no number is reused).
--
-- Every function runs atomically, so two nodes storing to one inbox, or acknowledging,
-- never interleave, and the notices one PUBLISHes leave Redis in sequence order.

local COST = 64 -- bookkeeping bytes charged per message, as the single relay does

local function u64(n)
  local b = {}
  for i = 8, 1, -1 do
    b[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(b)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function epoch(key, candidate)
  local e = redis.call('GET', key)
  if not e then
    redis.call('SET', key, candidate)
    e = candidate
  end
  return e
end

local function hnum(h, field)
  return tonumber(redis.call('HGET', h, field) or '0')
end

local function seq_of(id)
  return tonumber(string.match(id, '^(%d+)'))
end

-- The user's tracked devices heard of within `retention`: tag -> {acked, seen}; the
-- others are untracked (deleted) now.
local function devices(key, now, retention)
  local raw = redis.call('HGETALL', key)
  local d, n = {}, 0
  for i = 1, #raw, 2 do
    local a, s = string.match(raw[i + 1], '^(%d+):(%d+)$')
    a, s = tonumber(a), tonumber(s)
    if s == nil or s + retention < now then
      redis.call('HDEL', key, raw[i])
    else
      d[raw[i]] = { a, s }
      n = n + 1
    end
  end
  return d, n
end

-- Tracks `tag` as heard of now with `acked`; past `max` devices the one heard of least
-- recently is untracked.
local function track(key, d, n, tag, acked, now, max)
  if d[tag] == nil and n >= max then
    local oldest, when = nil, nil
    for t, v in pairs(d) do
      if when == nil or v[2] < when then
        oldest, when = t, v[2]
      end
    end
    if oldest then
      redis.call('HDEL', key, oldest)
      d[oldest] = nil
      n = n - 1
    end
  end
  if d[tag] == nil then n = n + 1 end
  d[tag] = { acked, now }
  redis.call('HSET', key, tag, acked .. ':' .. now)
  return n
end

-- The lowest cursor over tracked devices (nil with none: nothing is deleted by acks).
local function min_acked(d)
  local m = nil
  for _, v in pairs(d) do
    if m == nil or v[1] < m then m = v[1] end
  end
  return m
end

-- Drops the front of the inbox: messages up to `upto` (acknowledged by every tracked
-- device) and messages stored before `cutoff` (expired); keeps n, b, del and exp right.
-- Messages that vanished with the stream key's time to live count as expired.
local function trim(stream, hash, upto, cutoff)
  local last = hnum(hash, 'last')
  local del, exp = hnum(hash, 'del'), hnum(hash, 'exp')
  if upto > last then upto = last end
  local n, b = hnum(hash, 'n'), hnum(hash, 'b')
  -- The head alone first: most calls drop nothing, and a backlog is not read for that.
  local count = 1
  while true do
    local batch = redis.call('XRANGE', stream, '-', '+', 'COUNT', count)
    local cut, stop = 0, false
    for _, e in ipairs(batch) do
      local seq, f = seq_of(e[1]), e[2]
      if seq <= upto then
        if seq > del then del = seq end
      elseif tonumber(f[6]) < cutoff then
        if seq > exp then exp = seq end
      else
        stop = true
        break
      end
      cut = seq
      n = n - 1
      b = b - (#f[2] + COST)
    end
    if cut > 0 then redis.call('XTRIM', stream, 'MINID', cut + 1) end
    if stop or #batch < count then break end
    count = 64
  end
  if upto > del then del = upto end
  local first = last + 1
  local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #head > 0 then
    first = seq_of(head[1][1])
  else
    n, b = 0, 0
  end
  if first - 1 > del and first - 1 > exp then exp = first - 1 end
  if n < 0 then n = 0 end
  if b < 0 then b = 0 end
  redis.call('HSET', hash, 'del', del, 'exp', exp, 'n', n, 'b', b)
  return first, last, exp, n, b
end

-- The inbox's last number: its own, or (a new or forgotten inbox) the highest any had.
local function last_seq(hash, high)
  local last = redis.call('HGET', hash, 'last')
  if last then return tonumber(last) end
  last = tonumber(redis.call('GET', high) or '0')
  redis.call('HSET', hash, 'last', last, 'del', last, 'exp', 0, 'n', 0, 'b', 0)
  return last
end

-- Appends `frame` (its header, then seq and the time written here, then the payload)
-- and publishes it as a notice on `channel`; returns seq and the nodes that got it.
local function append(stream, hash, high, channel, header, payload, notice, origin, now,
                      ttl, keep)
  local seq = last_seq(hash, high) + 1
  local frame = header .. u64(seq) .. u64(now) .. payload
  redis.call('XADD', stream, seq .. '-0', 'f', frame, 'o', origin, 't', now)
  redis.call('HSET', hash, 'last', seq)
  redis.call('HINCRBY', hash, 'n', 1)
  redis.call('HINCRBY', hash, 'b', #frame + COST)
  if seq > tonumber(redis.call('GET', high) or '0') then redis.call('SET', high, seq) end
  redis.call('PEXPIRE', stream, ttl)
  redis.call('PEXPIRE', hash, keep)
  local nodes = redis.call('PUBLISH', channel, notice .. origin .. frame)
  return seq, nodes
end

local function room_for(hash, len, max_messages, max_bytes, who)
  local n, b = hnum(hash, 'n'), hnum(hash, 'b')
  if n + 1 > max_messages then
    return who .. "'s inbox holds its limit of " .. max_messages .. ' messages'
  end
  if b + len + COST > max_bytes then
    return who .. "'s inbox holds " .. b .. ' of its ' .. max_bytes .. ' bytes'
  end
  return nil
end

-- A stored SEND.
-- KEYS: 1-3 recipient stream, hash, devices; 4-6 sender stream, hash, devices; 7 epoch;
--       8 high; 9 DEDUP key; 10 recipient channel; 11 sender channel.
-- ARGV: 1 epoch candidate; 2 recipient's INBOX_DELIVER header (32 bytes); 3 the copy's
--       header (32 bytes; empty: the sender is the recipient); 4 payload; 5 notice
--       marker (8 bytes); 6 no origin (8 bytes); 7 sending device (8 bytes); 8 its tag;
--       9 max messages; 10 max bytes; 11 ttl ms; 12 device retention ms; 13 max
--       devices; 14 DEDUP ttl ms (0: not DEDUP); 15 recipient's name, 16 sender's name
--       (for reasons); 17 the DEDUP answer of a refusal (r<INBOX_FULL>).
-- Returns {'ok', epoch, seq, nodes} | {'dup', remembered} | {'full', reason}.
local function store(keys, args)
  local dedup = tonumber(args[14])
  if dedup > 0 then
    local v = redis.call('GET', keys[9])
    if v then return { 'dup', v } end
  end
  local now = now_ms()
  local ttl, retention = tonumber(args[11]), tonumber(args[12])
  local keep = ttl + retention
  local e = epoch(keys[7], args[1])
  local len = #args[4] + 48
  local max_messages, max_bytes = tonumber(args[9]), tonumber(args[10])
  trim(keys[1], keys[2], 0, now - ttl)
  local full = room_for(keys[2], len, max_messages, max_bytes, args[15])
  local copy = false
  local sd, sn
  if full == nil and args[3] ~= '' then
    sd, sn = devices(keys[6], now, retention)
    for tag, _ in pairs(sd) do
      if tag ~= args[8] then copy = true end
    end
    if copy then
      trim(keys[4], keys[5], 0, now - ttl)
      full = room_for(keys[5], len, max_messages, max_bytes, args[16])
    end
  end
  if full then
    if dedup > 0 then redis.call('SET', keys[9], args[17], 'PX', dedup) end
    return { 'full', full }
  end
  local seq, nodes = append(keys[1], keys[2], keys[8], keys[10], args[2], args[4], args[5],
    args[6], now, ttl, keep)
  redis.call('PEXPIRE', keys[3], keep)
  if copy then
    -- The sender's other devices get it as "sent from another device"; the device it
    -- came from skips it (its cursor moves past it when it has everything before).
    local cseq = append(keys[4], keys[5], keys[8], keys[11], args[3], args[4], args[5],
      args[7], now, ttl, keep)
    local mine = sd[args[8]]
    if mine and mine[1] == cseq - 1 then
      redis.call('HSET', keys[6], args[8], cseq .. ':' .. now)
    end
    redis.call('PEXPIRE', keys[6], keep)
  end
  if dedup > 0 then redis.call('SET', keys[9], nodes, 'PX', dedup) end
  return { 'ok', e, seq, nodes }
end

-- INBOX_SYNC from one device.
-- KEYS: 1-3 stream, hash, devices; 4 epoch; 5 high.
-- ARGV: 1 epoch candidate; 2 the client's epoch (decimal); 3 its last_seq; 4 device
--       tag; 5 ttl ms; 6 retention ms; 7 max devices.
-- Returns {epoch, first_seq, last_seq, expired_upto, new_device (0/1), replay_after}.
local function sync(keys, args)
  local now = now_ms()
  local ttl, retention = tonumber(args[5]), tonumber(args[6])
  local e = epoch(keys[4], args[1])
  local client = 0
  if args[2] == e then client = tonumber(args[3]) end
  local d, n = devices(keys[3], now, retention)
  local tag = args[4]
  local mine = d[tag]
  local others = n
  if mine then others = n - 1 end
  local last = last_seq(keys[2], keys[5])
  local first, _, exp = trim(keys[1], keys[2], 0, now - ttl)
  local reported = exp
  local new_device = 0
  if client > last then client = last end
  local after = client
  if mine == nil then
    if client == 0 then
      new_device = 1
      if others > 0 then reported = 0 end
      after = 0
    elseif client < first - 1 and first - 1 > reported then
      reported = first - 1
    end
  end
  local acked = client
  if mine and mine[1] > acked then acked = mine[1] end
  track(keys[3], d, n, tag, acked, now, tonumber(args[7]))
  local m = min_acked(d)
  if m and m > 0 then first = trim(keys[1], keys[2], m, now - ttl) end
  redis.call('PEXPIRE', keys[2], ttl + retention)
  redis.call('PEXPIRE', keys[3], ttl + retention)
  return { e, first, last, reported, new_device, after }
end

-- INBOX_ACK from one device.
-- KEYS: 1-3 stream, hash, devices. ARGV: 1 device tag; 2 upto; 3 ttl ms; 4 retention ms;
-- 5 max devices.
local function ack(keys, args)
  local now = now_ms()
  local ttl, retention = tonumber(args[3]), tonumber(args[4])
  local last = tonumber(redis.call('HGET', keys[2], 'last') or '0')
  local upto = tonumber(args[2])
  if upto > last then upto = last end
  local d, n = devices(keys[3], now, retention)
  local mine = d[args[1]]
  if mine and mine[1] > upto then upto = mine[1] end
  track(keys[3], d, n, args[1], upto, now, tonumber(args[5]))
  local m = min_acked(d)
  trim(keys[1], keys[2], m or 0, now - ttl)
  redis.call('PEXPIRE', keys[3], ttl + retention)
  return 1
end

-- The store's epoch (named by the first node to ask). ARGV: 1 candidate.
local function get_epoch(keys, args)
  return epoch(keys[1], args[1])
end

redis.register_function('imrelay_store', store)
redis.register_function('imrelay_sync', sync)
redis.register_function('imrelay_ack', ack)
redis.register_function('imrelay_epoch', get_epoch)
