// The reliability-lab console: follows /admin/events and drives the admin API.
//
// The event stream is read with fetch() and a streamed body rather than
// EventSource, because EventSource cannot send an Authorization header. The
// admin token, when the service has one, lives in this tab's sessionStorage
// only and travels as a bearer header, never in a URL.
'use strict';

const WINDOW_SECONDS = 120;
const TOKEN_KEY = 'reliability-lab-admin-token';
const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || '',
  samples: [],          // the last WINDOW_SECONDS of samples, oldest first
  lastSeq: 0,
  hello: null,
  breakerDeadline: null, // performance.now() when the breaker may half-open
  abort: null,
};

// ---------------------------------------------------------------- messages

let messageTimer = null;
function say(text, kind) {
  const el = $('message');
  el.textContent = text;
  el.className = kind || '';
  clearTimeout(messageTimer);
  if (kind !== 'error') messageTimer = setTimeout(() => { el.textContent = ''; }, 4000);
}

function setConnection(text, st) {
  const el = $('connection');
  el.textContent = text;
  el.dataset.state = st;
}

// --------------------------------------------------------------- admin API

function authHeaders() {
  return state.token ? { Authorization: 'Bearer ' + state.token } : {};
}

// Calls the admin API; on refusal shows the API's own message and returns null.
async function api(method, path, body, quiet) {
  const headers = authHeaders();
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    say(`${method} ${path}: the service cannot be reached`, 'error');
    return null;
  }
  let json = null;
  try { json = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const message = json && json.error ? json.error.message : `${response.status} ${response.statusText}`;
    say(`Refused: ${message}`, 'error');
    if (response.status === 401) askForToken('The admin token was refused: check ADMIN_TOKEN and enter it again.');
    return null;
  }
  if (!quiet) say(`${method} ${path}: done`, 'ok');
  return json;
}

// ------------------------------------------------------------------- token

function askForToken(reason) {
  if (state.abort) state.abort.abort();
  setConnection('needs token', 'refused');
  $('token-form').hidden = false;
  $('console').hidden = true;
  const error = $('token-error');
  if (reason) {
    error.textContent = reason;
    error.hidden = false;
  } else {
    error.hidden = true;
  }
  $('token-input').focus();
}

$('token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  state.token = $('token-input').value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $('token-error').hidden = true;
  connect();
});

// ------------------------------------------------------------ event stream

async function connect() {
  if (state.abort) state.abort.abort();
  const abort = new AbortController();
  state.abort = abort;
  setConnection('connecting…', 'connecting');
  let response;
  try {
    response = await fetch('/admin/events', { headers: authHeaders(), cache: 'no-store', signal: abort.signal });
  } catch (err) {
    if (abort.signal.aborted) return;
    return retryLater();
  }
  if (response.status === 401) {
    askForToken(state.token
      ? 'That token was refused (401): it does not match the service\'s ADMIN_TOKEN.'
      : null);
    return;
  }
  if (!response.ok || !response.body) {
    say(`The event stream answered ${response.status}`, 'error');
    return retryLater();
  }
  $('token-form').hidden = true;
  $('console').hidden = false;
  setConnection('live', 'live');
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        dispatch(block);
      }
    }
  } catch (err) {
    if (abort.signal.aborted) return;
  }
  if (!abort.signal.aborted) retryLater();
}

function retryLater() {
  setConnection('disconnected; retrying', 'disconnected');
  setTimeout(connect, 2000);
}

// One Server-Sent Events block: "event:" and "data:" lines; ":" is a comment.
function dispatch(block) {
  let name = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') name = value;
    else if (field === 'data') data.push(value);
  }
  if (data.length === 0) return;
  let payload;
  try { payload = JSON.parse(data.join('\n')); } catch (_) { return; }
  if (name === 'hello') onHello(payload);
  else if (name === 'sample') onSample(payload);
  else if (name === 'change') onChange(payload, true);
  else if (name === 'lagged') say(`Fell behind; skipped ${payload.skipped} events`, 'ok');
}

function onHello(hello) {
  state.hello = hello;
  state.samples = [];
  state.lastSeq = 0;
  $('queue-capacity').textContent = hello.queue_capacity;
  $('worker-count').textContent = hello.workers;
  showBreakerPolicy({
    policy: hello.breaker_policy,
    threshold: hello.breaker_threshold,
    openSeconds: hello.breaker_open_seconds,
    rate: hello.breaker_failure_rate,
    minCalls: hello.breaker_min_calls,
    windowSeconds: hello.breaker_window_seconds,
  });
  // A provider with a capacity (PAYMENT_CAPACITY) shows its load.
  $('provider-line').hidden = hello.payment_capacity == null;
  $('provider-capacity').textContent = hello.payment_capacity ?? '';
  showPayment(hello.payment);
  showSwitches(hello.reliability);
  showLoad(hello.load);
  pollProvider();
  showBreaker(hello.breaker.state, hello.breaker.consecutive_failures, hello.breaker.until_half_open);
  $('changes').replaceChildren();
  for (const change of hello.changes) onChange(change, false);
  for (const sample of hello.samples) addSample(sample);
  if (state.samples.length) showSample(state.samples[state.samples.length - 1]);
  drawAll();
}

function addSample(sample) {
  if (sample.seq <= state.lastSeq) return false;
  state.lastSeq = sample.seq;
  state.samples.push(sample);
  const oldest = sample.t - WINDOW_SECONDS;
  while (state.samples.length && state.samples[0].t < oldest) state.samples.shift();
  return true;
}

function onSample(sample) {
  if (!addSample(sample)) return;
  showSample(sample);
  scheduleDraw();
}

function onChange(change, live) {
  const li = document.createElement('li');
  const time = document.createElement('span');
  time.className = 'time';
  time.textContent = new Date(change.at).toLocaleTimeString();
  li.append(time, change.summary);
  li.dataset.kind = change.kind;
  const list = $('changes');
  list.prepend(li);
  while (list.children.length > 50) list.lastChild.remove();
  if (!live) return;
  if (change.kind === 'payment') showPayment(change.detail);
  else if (change.kind === 'reliability') showSwitches(change.detail);
  else if (change.kind === 'load') showLoad(change.detail);
  else if (change.kind === 'breaker_settings') showBreakerSettings(change.detail);
  else if (change.kind === 'breaker') {
    const failures = change.detail.to === 'closed' ? 0 : Number($('breaker-failures').textContent);
    const until = change.detail.to === 'open' && state.hello ? state.hello.breaker_open_seconds : null;
    showBreaker(change.detail.to, failures, until);
  }
}

// ----------------------------------------------------------------- display

// What opens the breaker: the failure-rate policy shows its window instead
// of a consecutive count. Kept in state.hello for the countdown.
function showBreakerPolicy(p) {
  if (state.hello) {
    Object.assign(state.hello, {
      breaker_policy: p.policy,
      breaker_threshold: p.threshold,
      breaker_open_seconds: p.openSeconds,
      breaker_failure_rate: p.rate,
      breaker_min_calls: p.minCalls,
      breaker_window_seconds: p.windowSeconds,
    });
  }
  const byRate = p.policy === 'failure_rate';
  $('breaker-policy').value = p.policy;
  $('breaker-threshold').textContent = p.threshold;
  $('breaker-consecutive-line').hidden = byRate;
  $('breaker-rate-line').hidden = !byRate;
  if (byRate) {
    $('breaker-window').textContent = p.windowSeconds;
    $('breaker-rate-limit').textContent = `${Math.round(p.rate * 100)}%`;
    $('breaker-min-calls').textContent = p.minCalls;
    // Figures gathered under the other policy do not carry over.
    $('breaker-calls').textContent = 0;
    $('breaker-rate').textContent = '–';
  }
}

// A duration as the API writes it ("30s", "1500ms", "2m") in seconds.
function seconds(text) {
  const m = /^(\d+)(ms|s|m|h|d)$/.exec(text || '');
  if (!m) return null;
  return Number(m[1]) * { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400 }[m[2]];
}

// The breaker's settings as GET/PUT /admin/breaker and the change feed give them.
function showBreakerSettings(s) {
  const byRate = s.policy === 'failure_rate';
  showBreakerPolicy({
    policy: s.policy,
    threshold: s.failure_threshold,
    openSeconds: seconds(s.open_duration),
    rate: byRate ? s.failure_rate : null,
    minCalls: byRate ? s.min_calls : null,
    windowSeconds: byRate ? seconds(s.window) : null,
  });
}

const fmt = new Intl.NumberFormat('en', { maximumFractionDigits: 1 });

function showSample(s) {
  showBreaker(s.breaker, s.consecutive_failures, s.until_half_open);
  $('queue-depth').textContent = s.queue_depth;
  const capacity = state.hello ? state.hello.queue_capacity : 1;
  $('queue-bar').style.width = `${Math.min(100, (100 * s.queue_depth) / capacity)}%`;
  $('busy-workers').textContent = s.busy_workers;
  $('payment-mode').textContent = s.payment_mode;
  if (s.breaker_window_calls != null) {
    $('breaker-calls').textContent = s.breaker_window_calls;
    $('breaker-rate').textContent = s.breaker_window_failure_rate == null
      ? '–' : `${Math.round(s.breaker_window_failure_rate * 100)}%`;
  }
  $('provider-in-flight').textContent = s.provider_in_flight;
  $('provider-queued').textContent = s.provider_queued;
  $('provider-wasted').textContent = fmt.format(s.provider_wasted_per_s);
  markMode(s.payment_mode);
  $('total-accepted').textContent = s.accepted_total;
  $('total-rejected').textContent = s.rejected_total;
  $('total-completed').textContent = s.completed_total;
  $('total-failed').textContent = s.failed_total;
  $('total-in-progress').textContent = Math.max(0, s.accepted_total - s.completed_total - s.failed_total);
  $('total-calls').textContent = s.payment_calls_total;
  const finished = s.completed_total + s.failed_total;
  $('total-amplification').textContent = finished ? fmt.format(s.payment_calls_total / finished) : '–';
  $('total-charges').textContent = s.charges;
  $('total-duplicates').textContent = s.duplicate_charges;
  $('total-deferred').textContent = s.deferred ?? 0;
  $('limit-now').textContent = s.concurrency_limit != null
    ? `${s.limit_in_flight ?? 0} of ${s.concurrency_limit} in flight` : '';
  $('throttle-now').textContent = s.throttle_probability > 0 || s.throttled_per_s > 0
    ? `sheds ${Math.round((s.throttle_probability ?? 0) * 100)}% · ${fmt.format(s.throttled_per_s ?? 0)}/s` : '';
  const orders = s.completed_per_s + s.failed_per_s;
  $('amplification-now').textContent = orders > 0 ? `×${fmt.format(s.payment_calls_per_s / orders)} now` : '';
}

function showBreaker(st, failures, untilHalfOpen) {
  $('breaker-card').dataset.state = st;
  $('breaker-state').textContent = st.replace('_', '-');
  $('breaker-failures').textContent = failures;
  state.breakerDeadline = st === 'open' && untilHalfOpen != null ? performance.now() + untilHalfOpen * 1000 : null;
  tickCountdown();
}

function tickCountdown() {
  const el = $('breaker-countdown');
  if (state.breakerDeadline == null) {
    el.textContent = '–';
    return;
  }
  const left = Math.max(0, (state.breakerDeadline - performance.now()) / 1000);
  el.textContent = left > 0 ? `${left.toFixed(1)} s` : 'now (next call probes)';
}
setInterval(tickCountdown, 100);

function markMode(mode) {
  for (const button of document.querySelectorAll('button.mode')) {
    button.classList.toggle('active', button.dataset.mode === mode);
  }
}

// Milliseconds from the API's durations ("250ms", "1s", "1m 30s").
function millis(text) {
  let total = 0;
  for (const [, n, unit] of String(text).matchAll(/([\d.]+)\s*(ns|us|µs|ms|s|m|h)/g)) {
    const scale = { ns: 1e-6, us: 1e-3, 'µs': 1e-3, ms: 1, s: 1000, m: 60000, h: 3600000 }[unit];
    total += Number(n) * scale;
  }
  return total;
}

function showPayment(p) {
  $('payment-mode').textContent = p.mode;
  markMode(p.mode);
  setSlider('failure-rate', p.failure_rate, (v) => v.toFixed(2));
  setSlider('latency-min', millis(p.latency_min), (v) => `${v} ms`);
  setSlider('latency-max', millis(p.latency_max), (v) => `${v} ms`);
  setSlider('ambiguous-rate', p.ambiguous_rate, (v) => v.toFixed(2));
  $('idempotency').checked = p.idempotency;
}

function setSlider(id, value, label) {
  const input = $(id);
  if (document.activeElement !== input) input.value = value;
  $(`${id}-value`).textContent = label(Number(input.value));
}

function showSwitches(s) {
  $('retry-enabled').checked = s.retry_enabled;
  $('breaker-enabled').checked = s.breaker_enabled;
  $('rejection-permanent').checked = s.rejection_permanent;
  $('retry-budget-enabled').checked = s.retry_budget_enabled;
  $('throttle-enabled').checked = s.throttle_enabled;
  $('hedge-enabled').checked = s.hedge_enabled;
  if (document.activeElement !== $('retry-jitter')) $('retry-jitter').value = s.retry_jitter;
  if (document.activeElement !== $('concurrency-limit')) $('concurrency-limit').value = s.concurrency_limit;
}

function showLoad(load) {
  const el = $('load-status');
  if (!load.rate) {
    el.textContent = 'off';
    return;
  }
  const o = load.outcomes;
  el.textContent = `${load.running ? 'running' : 'stopped'} at ${load.rate}/s · sent ${load.sent}` +
    ` · accepted ${o.accepted} · rejected ${o.rejected}` +
    (o.transport_error + o.server_error + o.client_error + o.skipped ? ` · other ${o.transport_error + o.server_error + o.client_error + o.skipped}` : '');
  el.dataset.running = load.running;
}

setInterval(async () => {
  if ($('console').hidden || !state.hello) return;
  const response = await fetch('/admin/load', { headers: authHeaders() }).catch(() => null);
  if (response && response.ok) showLoad(await response.json());
}, 1000);

// Where charges go. With PAYMENT_URL the provider is a process of its own:
// its URL, the client's pool and the provider's network faults are shown,
// and the in-process simulator's controls (which would charge nothing) are
// hidden.
function showProvider(p) {
  $('remote-provider').hidden = !p.remote;
  $('local-provider').hidden = p.remote;
  $('payment-mode-line').hidden = p.remote;
  $('provider-where').textContent = p.remote ? `remote: ${p.url}` : 'in process';
  if (!p.remote) return;
  $('pool-busy').textContent = p.busy;
  $('pool-open').textContent = p.open;
  $('pool-max').textContent = p.max_connections;
  $('pool-waits').textContent = p.waits;
  $('pool-bar').style.width = `${Math.min(100, (100 * p.busy) / Math.max(1, p.max_connections))}%`;
  if (p.faults) {
    const f = p.faults;
    $('fault-now').textContent = `now: ${f.fault}${f.fault === 'none' ? '' : ` at ${f.rate}`}` +
      (f.rate_limit ? ` · at most ${f.rate_limit} charges/s` : '');
    if (!state.faultsShown) {
      $('fault-kind').value = f.fault;
      $('fault-rate').value = f.rate;
      $('fault-rate-limit').value = f.rate_limit;
      state.faultsShown = true;
    }
  } else {
    $('fault-now').textContent = p.faults_error || '';
  }
}

async function pollProvider() {
  if ($('console').hidden || !state.hello) return;
  const response = await fetch('/admin/provider', { headers: authHeaders() }).catch(() => null);
  if (response && response.ok) showProvider(await response.json());
}
setInterval(pollProvider, 2000);

// ------------------------------------------------------------------ charts

const COLORS = {
  accepted: '#2563eb', completed: '#1f9d55', failed: '#dc2626', rejected: '#7c3aed',
  calls: '#ea580c', orders: '#2563eb', retries: '#0891b2', open: '#dc2626', half_open: '#d97706',
  p50: '#2563eb', p99: '#dc2626',
};

const CHARTS = [
  { id: 'orders', series: [
    ['accepted', (s) => s.accepted_per_s], ['completed', (s) => s.completed_per_s],
    ['failed', (s) => s.failed_per_s], ['rejected', (s) => s.rejected_per_s]] },
  { id: 'amplification', series: [
    ['calls', (s) => s.payment_calls_per_s, 'payment calls/s'],
    ['orders', (s) => s.completed_per_s + s.failed_per_s, 'orders finished/s']] },
  { id: 'retries', series: [
    ['retries', (s) => s.retries_per_s], ['open', (s) => s.rejections_open_per_s, 'rejected: open'],
    ['half_open', (s) => s.rejections_half_open_per_s, 'rejected: half-open']] },
  { id: 'latency', raw: true, series: [
    ['p50', (s) => s.latency_p50_ms], ['p99', (s) => s.latency_p99_ms]] },
];

for (const chart of CHARTS) {
  const legend = document.querySelector(`.legend[data-chart="${chart.id}"]`);
  for (const [key, , label] of chart.series) {
    const swatch = document.createElement('i');
    swatch.style.background = COLORS[key];
    legend.append(swatch, label || key);
  }
}

let drawPending = false;
function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => { drawPending = false; drawAll(); });
}

function drawAll() {
  for (const chart of CHARTS) draw(chart);
}

const BAND = 6;
const STATE_COLORS = { closed: '#1f9d55', half_open: '#d97706', open: '#dc2626' };

function draw(chart) {
  const canvas = $(`chart-${chart.id}`);
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;
  if (canvas.width !== width * ratio) canvas.width = width * ratio;
  if (canvas.height !== height * ratio) canvas.height = height * ratio;
  const ctx = canvas.getContext('2d');
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);

  const samples = state.samples;
  const left = 44, right = 8, top = 6, bottom = 20 + BAND;
  const plotW = width - left - right, plotH = height - top - bottom;
  const tEnd = samples.length ? samples[samples.length - 1].t : WINDOW_SECONDS;
  const tStart = tEnd - WINDOW_SECONDS;
  // Rates are averaged over the last second of samples: a quarter-second
  // count of a few dozen orders jumps by a few either way.
  const span = chart.raw || !samples.length ? 1 : Math.max(1, Math.round(1 / samples[samples.length - 1].interval));
  const lines = chart.series.map(([key, value]) => {
    const points = [];
    let sum = 0;
    const window = [];
    for (const s of samples) {
      const v = value(s);
      if (span === 1 || v == null) {
        points.push([s.t, v]);
        continue;
      }
      window.push(v);
      sum += v;
      if (window.length > span) sum -= window.shift();
      points.push([s.t, sum / window.length]);
    }
    return [key, points];
  });
  let max = 0;
  for (const [, points] of lines) for (const [, v] of points) max = Math.max(max, v || 0);
  canvas.dataset.max = max;
  canvas.dataset.points = samples.length;
  const yMax = niceCeiling(max);
  const x = (t) => left + ((t - tStart) / WINDOW_SECONDS) * plotW;
  const y = (v) => top + plotH - (v / yMax) * plotH;

  // Grid and labels.
  ctx.strokeStyle = '#e5e7eb';
  ctx.fillStyle = '#6b7280';
  ctx.font = '11px system-ui, sans-serif';
  ctx.lineWidth = 1;
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4;
    ctx.beginPath();
    ctx.moveTo(left, y(v) + 0.5);
    ctx.lineTo(left + plotW, y(v) + 0.5);
    ctx.stroke();
    ctx.fillText(fmt.format(v), left - 4, y(v));
  }
  ctx.textAlign = 'center';
  ctx.textBaseline = 'top';
  for (let ago = WINDOW_SECONDS; ago >= 0; ago -= 30) {
    ctx.textAlign = ago === 0 ? 'right' : 'center';
    ctx.fillText(ago ? `-${ago}s` : 'now', x(tEnd - ago), top + plotH + BAND + 4);
  }

  // The breaker's state as a band under the plot.
  for (let i = 0; i < samples.length; i++) {
    const s = samples[i];
    const from = i ? samples[i - 1].t : s.t - s.interval;
    ctx.fillStyle = STATE_COLORS[s.breaker];
    ctx.fillRect(x(Math.max(from, tStart)), top + plotH + 1, Math.max(1, x(s.t) - x(Math.max(from, tStart))), BAND - 1);
  }

  // The lines; a null value (no order finished) breaks a line.
  ctx.lineWidth = 1.8;
  ctx.lineJoin = 'round';
  for (const [key, points] of lines) {
    ctx.strokeStyle = COLORS[key];
    ctx.beginPath();
    let pen = false;
    for (const [t, v] of points) {
      if (v == null) { pen = false; continue; }
      if (pen) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
      pen = true;
    }
    ctx.stroke();
  }
}

// 1, 2 or 5 times a power of ten, at or above v (at least 1).
function niceCeiling(v) {
  if (v <= 1) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(v)));
  for (const step of [1, 2, 5, 10]) if (step * power >= v) return step * power;
  return 10 * power;
}

window.addEventListener('resize', scheduleDraw);

// ---------------------------------------------------------------- controls

$('load-start').addEventListener('click', async () => {
  const raw = $('load-rate').value.trim();
  const rate = Number(raw);
  // Sent as the user typed it (a number when it is one): the API names what is wrong.
  const load = await api('PUT', '/admin/load', { rate: raw !== '' && Number.isFinite(rate) ? rate : raw });
  if (load) showLoad(load);
});

$('load-stop').addEventListener('click', async () => {
  const load = await api('DELETE', '/admin/load');
  if (load) showLoad(load);
});

$('breaker-reset').addEventListener('click', async () => {
  const snapshot = await api('POST', '/admin/breaker/reset');
  if (snapshot) showBreaker(snapshot.state, snapshot.consecutive_failures, snapshot.until_half_open);
});

async function putPayment(update) {
  const view = await api('PUT', '/admin/payment', update);
  if (view) showPayment(view);
  return view;
}

for (const button of document.querySelectorAll('button.mode')) {
  button.addEventListener('click', () => {
    const mode = button.dataset.mode;
    if (mode !== 'brownout') return putPayment({ mode });
    const rate = Number($('brownout-failure-rate').value);
    return putPayment({
      mode,
      brownout: {
        failure_rate: Number.isFinite(rate) ? rate : $('brownout-failure-rate').value,
        latency_min: $('brownout-latency-min').value.trim(),
        latency_max: $('brownout-latency-max').value.trim(),
        duration: $('brownout-duration').value.trim(),
      },
    });
  });
}

function slider(id, field, toApi, label) {
  const input = $(id);
  input.addEventListener('input', () => { $(`${id}-value`).textContent = label(Number(input.value)); });
  input.addEventListener('change', async () => {
    const view = await putPayment({ [field]: toApi(Number(input.value)) });
    // Refused: put the slider back where the service is.
    if (!view) {
      const current = await api('GET', '/admin/payment', undefined, true);
      if (current) showPayment(current);
    }
  });
}
slider('failure-rate', 'failure_rate', (v) => v, (v) => v.toFixed(2));
slider('latency-min', 'latency_min', (v) => `${v}ms`, (v) => `${v} ms`);
slider('latency-max', 'latency_max', (v) => `${v}ms`, (v) => `${v} ms`);
slider('ambiguous-rate', 'ambiguous_rate', (v) => v, (v) => v.toFixed(2));

$('idempotency').addEventListener('change', (event) => putPayment({ idempotency: event.target.checked }));

for (const [id, field] of [
  ['retry-enabled', 'retry_enabled'], ['breaker-enabled', 'breaker_enabled'],
  ['rejection-permanent', 'rejection_permanent'], ['retry-budget-enabled', 'retry_budget_enabled'],
  ['throttle-enabled', 'throttle_enabled'], ['hedge-enabled', 'hedge_enabled'],
]) {
  $(id).addEventListener('change', async (event) => {
    const switches = await api('PUT', '/admin/reliability', { [field]: event.target.checked });
    if (switches) showSwitches(switches);
    else event.target.checked = !event.target.checked;
  });
}

$('fault-apply').addEventListener('click', async () => {
  const body = {
    fault: $('fault-kind').value,
    rate: Number($('fault-rate').value),
    rate_limit: Number($('fault-rate-limit').value),
  };
  const answer = await api('PUT', '/admin/provider/faults', body);
  if (answer) {
    say(`provider faults: ${answer.fault} at ${answer.rate}`, 'ok');
    pollProvider();
  }
});

$('concurrency-limit').addEventListener('change', async (event) => {
  const switches = await api('PUT', '/admin/reliability', { concurrency_limit: event.target.value });
  if (switches) showSwitches(switches);
});

$('retry-jitter').addEventListener('change', async (event) => {
  const switches = await api('PUT', '/admin/reliability', { retry_jitter: event.target.value });
  if (switches) showSwitches(switches);
});

$('breaker-policy').addEventListener('change', async (event) => {
  const view = await api('PUT', '/admin/breaker', { policy: event.target.value });
  if (view) showBreakerSettings(view.settings);
  else event.target.value = state.hello ? state.hello.breaker_policy : 'consecutive';
});

connect();
