-- Admission of one request, all or nothing, on the server's clock.
-- KEYS: 1 key tokens, 2 global tokens, 3 global requests, 4 key requests,
--       5 key in flight, 6 global in flight.
-- ARGV: for bucket i in 1..4: [3i-2] emission interval in ns (0: no such bucket),
--       [3i-1] burst, [3i] cells asked; [13] key in-flight cap (0: none),
--       [14] global in-flight cap (0: none), [15] in-flight TTL in ms.
-- A bucket's value is its theoretical arrival time (TAT) in microseconds since the epoch.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T, B, N, V = {}, {}, {}, {}
for i = 1, 4 do
  T[i] = tonumber(ARGV[3 * i - 2]) / 1000
  B[i] = tonumber(ARGV[3 * i - 1])
  N[i] = tonumber(ARGV[3 * i])
  if T[i] > 0 then
    local v = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
    if v < now then v = now end
    V[i] = v
  end
end
local code, wait = 0, 0
local ccap, gcap, cttl = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
if ccap > 0 and (tonumber(redis.call('GET', KEYS[5]) or '0') or 0) >= ccap then
  code = 1
elseif gcap > 0 and (tonumber(redis.call('GET', KEYS[6]) or '0') or 0) >= gcap then
  code = 2
end
if code == 0 then
  for i = 1, 2 do
    if T[i] > 0 and N[i] > B[i] then
      code = 10 + i
      break
    end
  end
end
if code == 0 then
  for i = 1, 4 do
    if T[i] > 0 and N[i] > 0 and V[i] + (N[i] - B[i]) * T[i] > now then
      code = 20 + i
      break
    end
  end
  if code ~= 0 then
    -- The wait until every bucket has room, so that a retry after it is admitted.
    for i = 1, 4 do
      if T[i] > 0 and N[i] <= B[i] then
        local w = V[i] + (N[i] - B[i]) * T[i] - now
        if w > wait then wait = w end
      end
    end
  end
end
if code == 0 then
  for i = 1, 4 do
    if T[i] > 0 and N[i] > 0 then
      V[i] = V[i] + N[i] * T[i]
      redis.call('SET', KEYS[i], string.format('%.3f', V[i]), 'PX', math.ceil((V[i] - now) / 1000) + 1)
    end
  end
  if ccap > 0 then
    redis.call('INCR', KEYS[5])
    redis.call('PEXPIRE', KEYS[5], cttl)
  end
  if gcap > 0 then
    redis.call('INCR', KEYS[6])
    redis.call('PEXPIRE', KEYS[6], cttl)
  end
end
local function status(i)
  if T[i] <= 0 then return {-1, 0, 0} end
  local ahead = V[i] - now
  if ahead <= 0 then return {B[i], B[i], 0} end
  local free = B[i] * T[i] - ahead
  local rem = 0
  if free > 0 then rem = math.floor(free / T[i] + 1e-9) end
  return {B[i], rem, math.ceil(ahead)}
end
local r = status(4)
if T[4] <= 0 then r = status(3) end
local k = status(1)
if T[1] <= 0 then k = status(2) end
return {code, math.ceil(wait), r[1], r[2], r[3], k[1], k[2], k[3]}
