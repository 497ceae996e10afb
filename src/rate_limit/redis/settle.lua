-- Corrects a token charge from the usage an answer reported, in both token buckets.
-- KEYS: 1 key tokens, 2 global tokens. ARGV: [1], [2] their emission intervals in ns
-- (0: no such bucket), [3] the usage minus the charge, in tokens (negative: a refund).
-- An overrun pushes the TAT later (the bucket may go below empty); a refund moves it
-- earlier, never before now (a bucket is never fuller than full).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local d = tonumber(ARGV[3])
for i = 1, 2 do
  local T = tonumber(ARGV[i]) / 1000
  if T > 0 then
    local cur = redis.call('GET', KEYS[i])
    local v = tonumber(cur or '0') or 0
    if d > 0 then
      if v < now then v = now end
      v = v + d * T
    elseif cur then
      v = v + d * T
    end
    if v > now then
      redis.call('SET', KEYS[i], string.format('%.3f', v), 'PX', math.ceil((v - now) / 1000) + 1)
    elseif cur then
      redis.call('DEL', KEYS[i])
    end
  end
end
return 1
