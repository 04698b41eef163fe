-- wrk script: POST one image as multipart/form-data and report p50/p95/p99 and errors as JSON.
-- usage: wrk -s benchmarks/multipart.lua URL -- IMAGE_PATH FIELD_NAME [raw]
local boundary = "----imageclfbenchmarkboundary"

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local data = f:read("*all")
  f:close()
  local field = args[2] or "image"
  local ext = string.lower(string.match(args[1], "%.(%w+)$") or "png")
  local types = { png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg" }
  local mime = types[ext] or "application/octet-stream"
  wrk.method = "POST"
  if args[3] == "raw" then
    wrk.body = data
    wrk.headers["Content-Type"] = mime
  else
    wrk.body = "--" .. boundary .. "\r\n"
      .. 'Content-Disposition: form-data; name="' .. field .. '"; filename="image.' .. ext .. '"\r\n'
      .. "Content-Type: " .. mime .. "\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
    wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
  end
end

function done(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    'JSON {"requests": %d, "seconds": %.3f, "errors": %d, "non_2xx": %d, '
    .. '"p50_ms": %.3f, "p95_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6, errors, summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
end
