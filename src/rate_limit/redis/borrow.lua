-- Borrows up to ARGV[3] cells of one request bucket for a replica to spend locally, after
-- giving back ARGV[4] unspent cells of its expired lease. Takes at least one cell or none.
-- KEYS: 1 the bucket. ARGV: [1] emission interval in ns, [2] burst, [3] cells wanted,
-- [4] cells given back. Returns {cells lent, wait in µs, burst, remaining, reset in µs}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1]) / 1000
local B = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local back = tonumber(ARGV[4])
local cur = redis.call('GET', KEYS[1])
local v = tonumber(cur or '0') or 0
if cur and back > 0 then v = v - back * T end
if v < now then v = now end
local avail = math.floor((now + B * T - v) / T + 1e-9)
local lent, wait = 0, 0
if avail < 1 then
  wait = math.ceil(v + (1 - B) * T - now)
else
  lent = math.min(want, avail)
  v = v + lent * T
end
if v > now then
  redis.call('SET', KEYS[1], string.format('%.3f', v), 'PX', math.ceil((v - now) / 1000) + 1)
elseif cur then
  redis.call('DEL', KEYS[1])
end
local ahead = v - now
local rem = B
if ahead > 0 then rem = math.max(0, math.floor((B * T - ahead) / T + 1e-9)) end
return {lent, wait, B, rem, math.ceil(math.max(ahead, 0))}
