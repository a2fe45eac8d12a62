-- wrk script of `make bench`: POST /v1/portal-sessions with requests drawn at
-- random from the run's request pool (written by dataset.py: one line per
-- request, "<bearer token>\t<JSON body>"), so flows, users and principals
-- (service token or end-user JWT) are mixed the same way for the service and
-- the floor.
--
--   wrk -t1 -c50 -d6s -s bench/mix.lua http://127.0.0.1:18080 -- requests.tsv SEED
--
-- done() prints one JSON line on stdout, prefixed "BENCH_JSON " for run.py.

local pool = {}
local threads = 0

function setup(thread)
   -- Runs in the main Lua state: number the threads so each gets its own seed.
   threads = threads + 1
   thread:set("thread_number", threads)
end

function init(args)
   local path = args[1]
   local seed = tonumber(args[2] or "1") * 1000 + (thread_number or 0)
   for line in io.lines(path) do
      local tab = string.find(line, "\t", 1, true)
      local token = string.sub(line, 1, tab - 1)
      local body = string.sub(line, tab + 1)
      -- Pre-formatted once: per request wrk only picks one.
      pool[#pool + 1] = wrk.format("POST", "/v1/portal-sessions", {
         ["Host"] = wrk.headers["Host"],
         ["Authorization"] = "Bearer " .. token,
         ["Content-Type"] = "application/json",
         ["User-Agent"] = "portal-gateway-bench/1",
      }, body)
   end
   math.randomseed(seed)
end

function request()
   return pool[math.random(#pool)]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p95":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(95), latency:percentile(99),
      latency.max, latency.mean))
end
