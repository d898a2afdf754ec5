#!lua name=imrelay_inbox
-- Stored delivery in cluster mode (protocol.md, section 18.1): one user's inbox in Redis.
--
-- Keys of user U (each function takes its keys in this order):
--   imrelay:ib:U  a stream: one entry per stored message, ID <seq>-<bt before it>, fields
--                 f (the INBOX_DELIVER frame), o (8 bytes: the device a copy came from),
--                 t (when it was stored, Unix ms, Redis's clock). Expires ttl after its
--                 newest message, so an abandoned inbox leaves nothing behind.
--   imrelay:ih:U  a hash: last (last seq handed out), exp (expired up to), del (deleted
--                 by acknowledgements up to), n (messages held), b (bytes charged), due
--                 (when the oldest message expires), bt (bytes charged ever).
--   imrelay:iv:U  a hash: device tag (decimal) -> "<acked>:<seen ms>".
-- Shared: imrelay:epoch (the store's epoch), imrelay:ihigh (the highest seq handed out
-- by any inbox: an inbox whose hash expired numbers on after it, so no number is reused).
--
-- Every function runs atomically, so two nodes storing to one inbox, or acknowledging,
-- never interleave, and the notices one PUBLISHes leave Redis in sequence order.

local COST = 64 -- bookkeeping bytes charged per message, as the single relay does

-- Unrolled on purpose: a loop filling a table (then unpack) costs a table per message,
-- and measured slower (`stored --cluster 2`: 109-117 k msgs/s and 8.5-9.2 us of Redis CPU
-- per message with the loop, 159-160 k and 6.2 us unrolled).
local function u64(n)
  local b8 = n % 256
  n = math.floor(n / 256)
  local b7 = n % 256
  n = math.floor(n / 256)
  local b6 = n % 256
  n = math.floor(n / 256)
  local b5 = n % 256
  n = math.floor(n / 256)
  local b4 = n % 256
  n = math.floor(n / 256)
  local b3 = n % 256
  n = math.floor(n / 256)
  local b2 = n % 256
  n = math.floor(n / 256)
  return string.char(n % 256, b2, b3, b4, b5, b6, b7, b8)
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

-- The store's epoch and the highest sequence number any inbox handed out, in one read.
local function meta(epoch_key, high_key, candidate)
  local v = redis.call('MGET', epoch_key, high_key)
  local e = v[1]
  if not e then
    redis.call('SET', epoch_key, candidate)
    e = candidate
  end
  return e, tonumber(v[2]) or 0
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

-- An inbox's counters, read with one HMGET: last (last seq handed out), del (deleted by
-- acknowledgements up to), exp (expired up to), n (messages held), b (bytes charged),
-- due (when the oldest message expires; 0: empty), bt (bytes charged to every message
-- ever appended: each entry's ID is <seq>-<bt before it>, so what the messages held
-- cost is bt minus the head's, without reading them). A new inbox (or one whose hash
-- expired) numbers on after `high`, the highest number any inbox handed out.
local function load(hash, high)
  local v = redis.call('HMGET', hash, 'last', 'del', 'exp', 'n', 'b', 'due', 'bt')
  local s = {
    last = tonumber(v[1]),
    del = tonumber(v[2]) or 0,
    exp = tonumber(v[3]) or 0,
    n = tonumber(v[4]) or 0,
    b = tonumber(v[5]) or 0,
    due = tonumber(v[6]) or 0,
    bt = tonumber(v[7]) or 0,
  }
  if s.last == nil then
    s.fresh = true
    s.last = high or 0
    s.del = s.last
  end
  return s
end

local function save(hash, s)
  redis.call('HSET', hash, 'last', s.last, 'del', s.del, 'exp', s.exp, 'n', s.n, 'b', s.b,
    'due', s.due, 'bt', s.bt)
end

-- Drops the front of the inbox: messages up to `upto` (acknowledged by every tracked
-- device; no read) and, when `cutoff` is given, messages stored before it (expired),
-- keeping the counters `s` right from the head that is left; returns the first seq held.
-- Messages that vanished with the stream key's time to live count as expired.
local function trim(stream, s, upto, cutoff, ttl)
  if upto > s.last then upto = s.last end
  if upto > s.del then
    redis.call('XTRIM', stream, 'MINID', upto + 1)
    s.del = upto
  end
  local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if cutoff then
    -- Expired ones from the head, 64 at a time, while the head is older than `cutoff`.
    while #head > 0 and tonumber(head[1][2][6]) < cutoff do
      local batch = redis.call('XRANGE', stream, '-', '+', 'COUNT', 64)
      local last_old = 0
      for _, e in ipairs(batch) do
        if tonumber(e[2][6]) >= cutoff then break end
        last_old = seq_of(e[1])
      end
      redis.call('XTRIM', stream, 'MINID', last_old + 1)
      if last_old > s.exp then s.exp = last_old end
      head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
    end
  end
  local first = s.last + 1
  if #head > 0 then
    local seq, before = string.match(head[1][1], '^(%d+)-(%d+)$')
    first = tonumber(seq)
    s.n = s.last - first + 1
    s.b = s.bt - tonumber(before)
    s.due = tonumber(head[1][2][6]) + ttl
  else
    s.n, s.b, s.due = 0, 0, 0
  end
  if first - 1 > s.del and first - 1 > s.exp then s.exp = first - 1 end
  return first
end

-- Expires what is due (only when the oldest message is: most calls read nothing).
local function expire(stream, s, now, ttl)
  if s.due > 0 and now >= s.due then
    trim(stream, s, s.del, now - ttl, ttl)
    return true
  end
  return false
end

-- Appends a message to an inbox (its INBOX_DELIVER: the header, then seq and `stamp`, the
-- time `now` as 8 bytes, then the payload), keeping the counters `s` (saved by the
-- caller); returns seq and the frame.
local function append(stream, s, high, header, payload, origin, now, stamp, ttl)
  local seq = s.last + 1
  local frame = header .. u64(seq) .. stamp .. payload
  redis.call('XADD', stream, seq .. '-' .. s.bt, 'f', frame, 'o', origin, 't', now)
  s.last = seq
  s.n = s.n + 1
  s.b = s.b + #frame + COST
  s.bt = s.bt + #frame + COST
  if s.due == 0 then s.due = now + ttl end
  if seq > high.value then high.value = seq end
  return seq, frame
end

-- Saves an inbox that took messages, keeps its keys alive, and publishes their notice
-- (node id `marker`, the device a copy came from, the frames one after another); returns
-- the nodes that got it.
local function publish(stream, hash, s, channel, marker, origin, frames, ttl, keep)
  save(hash, s)
  redis.call('PEXPIRE', stream, ttl)
  redis.call('PEXPIRE', hash, keep)
  return redis.call('PUBLISH', channel, marker .. origin .. table.concat(frames))
end

local function room_for(s, len, max_messages, max_bytes, who)
  if s.n + 1 > max_messages then
    return who .. "'s inbox holds its limit of " .. max_messages .. ' messages'
  end
  if s.b + len + COST > max_bytes then
    return who .. "'s inbox holds " .. s.b .. ' of its ' .. max_bytes .. ' bytes'
  end
  return nil
end

-- Stored SENDs from one device of one sender to one recipient, in order (a loop turn's).
-- KEYS: 1-3 recipient stream, hash, devices; 4-6 sender stream, hash, devices; 7 epoch;
--       8 high; 9 recipient channel; 10 sender channel; 10 + i the DEDUP key of message
--       i (any name for one without DEDUP).
-- ARGV: 1 epoch candidate; 2 notice marker (8 bytes); 3 no origin (8 bytes); 4 sending
--       device (8 bytes); 5 its tag; 6 max messages; 7 max bytes; 8 ttl ms; 9 device
--       retention ms; 10 max devices; 11 DEDUP ttl ms; 12 recipient's name, 13 sender's
--       name (for reasons); 14 the DEDUP answer of a refusal (r<INBOX_FULL>); 15 '1' when
--       the sender's other devices may get copies (not to oneself); then per message i
--       (from 1): 13 + 3i its INBOX_DELIVER header (32 bytes), 14 + 3i its payload,
--       15 + 3i '1' for DEDUP.
-- Returns {epoch, nodes} and then per message its seq (stored; `nodes` got its notice),
-- {'dup', remembered} or {'full', reason}.
local function store(keys, args)
  local now = now_ms()
  local ttl, retention = tonumber(args[8]), tonumber(args[9])
  local keep = ttl + retention
  local dedup_ttl = tonumber(args[11])
  local e, top = meta(keys[7], keys[8], args[1])
  local high = { value = top }
  local max_messages, max_bytes = tonumber(args[6]), tonumber(args[7])
  local r = load(keys[2], top)
  local rchanged = expire(keys[1], r, now, ttl)
  local copy, sd, ss, schanged = false, nil, nil, false
  if args[15] == '1' then
    sd = devices(keys[6], now, retention)
    for tag, _ in pairs(sd) do
      if tag ~= args[5] then copy = true end
    end
    if copy then
      ss = load(keys[5], top)
      schanged = expire(keys[4], ss, now, ttl)
    end
  end
  local results, rframes, cframes, stored, batch = {}, {}, {}, {}, {}
  local last_copy = nil
  local count = (#args - 15) / 3
  local stamp = u64(now)
  for i = 1, count do
    local header, payload = args[13 + 3 * i], args[14 + 3 * i]
    local dedup = args[15 + 3 * i] == '1'
    local key = keys[10 + i]
    local seen = nil
    if dedup then
      seen = batch[key]
      if seen == nil then seen = redis.call('GET', key) end
    end
    if seen then
      results[i] = { 'dup', seen }
    else
      local len = #payload + 48
      local full = room_for(r, len, max_messages, max_bytes, args[12])
      if full == nil and copy then
        full = room_for(ss, len, max_messages, max_bytes, args[13])
      end
      if full then
        if dedup then
          redis.call('SET', key, args[14], 'PX', dedup_ttl)
          batch[key] = args[14]
        end
        results[i] = { 'full', full }
      else
        local seq, frame = append(keys[1], r, high, header, payload, args[3], now, stamp, ttl)
        rframes[#rframes + 1] = frame
        if copy then
          -- The sender's other devices get it as "sent from another device"; the device
          -- it came from skips it.
          local cseq, cframe = append(keys[4], ss, high, header, payload, args[4], now, stamp,
            ttl)
          cframes[#cframes + 1] = cframe
          last_copy = cseq
        end
        results[i] = seq
        stored[#stored + 1] = i
        -- A resend of it later in this batch is a duplicate (answered with the count).
        if dedup then batch[key] = true end
      end
    end
  end
  local nodes = 0
  if #rframes > 0 then
    nodes = publish(keys[1], keys[2], r, keys[9], args[2], args[3], rframes, ttl, keep)
  elseif rchanged then
    save(keys[2], r)
  end
  if #cframes > 0 then
    publish(keys[4], keys[5], ss, keys[10], args[2], args[4], cframes, ttl, keep)
    -- The sending device's cursor moves past its own copies when it had everything
    -- before them.
    local mine = sd[args[5]]
    if mine and mine[1] == last_copy - #cframes then
      redis.call('HSET', keys[6], args[5], last_copy .. ':' .. now)
    end
  elseif schanged then
    save(keys[5], ss)
  end
  if high.value > top then redis.call('SET', keys[8], high.value) end
  for _, i in ipairs(stored) do
    if args[15 + 3 * i] == '1' then
      redis.call('SET', keys[10 + i], nodes, 'PX', dedup_ttl)
    end
  end
  for i = 1, count do
    local r = results[i]
    if type(r) == 'table' and r[2] == true then r[2] = tostring(nodes) end
  end
  local answer = { e, nodes }
  for i = 1, count do answer[i + 2] = results[i] end
  return answer
end

-- INBOX_SYNC from one device.
-- KEYS: 1-3 stream, hash, devices; 4 epoch; 5 high.
-- ARGV: 1 epoch candidate; 2 the client's epoch (decimal); 3 its last_seq; 4 device
--       tag; 5 ttl ms; 6 retention ms; 7 max devices.
-- Returns {epoch, first_seq, last_seq, expired_upto, new_device (0/1), replay_after}.
local function sync(keys, args)
  local now = now_ms()
  local ttl, retention = tonumber(args[5]), tonumber(args[6])
  local e, top = meta(keys[4], keys[5], args[1])
  local client = 0
  if args[2] == e then client = tonumber(args[3]) end
  local d, n = devices(keys[3], now, retention)
  local tag = args[4]
  local mine = d[tag]
  local others = n
  if mine then others = n - 1 end
  local s = load(keys[2], top)
  local first = trim(keys[1], s, 0, now - ttl, ttl)
  local last = s.last
  local reported = s.exp
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
  if m and m > 0 then first = trim(keys[1], s, m, now - ttl, ttl) end
  save(keys[2], s)
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
  local s = load(keys[2], nil)
  local upto = tonumber(args[2])
  if upto > s.last then upto = s.last end
  local d, n = devices(keys[3], now, retention)
  local mine = d[args[1]]
  if mine and mine[1] > upto then upto = mine[1] end
  track(keys[3], d, n, args[1], upto, now, tonumber(args[5]))
  local m = min_acked(d)
  if not s.fresh then
    -- (An acknowledgement to an inbox that is gone makes none: it would number from 0.)
    trim(keys[1], s, m or 0, now - ttl, ttl)
    save(keys[2], s)
    redis.call('PEXPIRE', keys[2], ttl + retention)
  end
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
