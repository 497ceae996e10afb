-- Releases one in-flight slot of each key given; a count never goes below zero.
for i = 1, #KEYS do
  local c = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if c > 1 then
    redis.call('DECR', KEYS[i])
  elseif c == 1 then
    redis.call('DEL', KEYS[i])
  end
end
return 1
