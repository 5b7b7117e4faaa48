-- Seeds the Redis side of loadtest/compare with the gateway run's cards:
-- card:<12 digits> hashes (the key form redis-benchmark's __rand_int__ makes)
-- holding card 500118B<8 digits>, active, every function, the default daily
-- cap; every hundredth card number (…07, …107, …) in the deny-list set.
-- Usage: EVAL <this> 0 <cards>
local cards = tonumber(ARGV[1])
for i = 0, cards - 1 do
  redis.call('HSET', string.format('card:%012d', i),
    'card_no', string.format('500118B%08d', i),
    'status', 'active',
    'functions', 7,              -- bitmask: transit 1, medical 2, financial 4
    'spent_day', 0,              -- local day (+08:00) spent_fen counts for
    'spent_fen', 0,
    'daily_cap_fen', 100000)
end
for i = 7, cards - 1, 100 do
  redis.call('SADD', 'denylist', string.format('500118B%08d', i))
end
return cards
