// The tclseg live page: plain browser JavaScript, no framework and no build step, so the daemon can serve it
// from its binary and the page loads nothing from anywhere else (the Content-Security-Policy allows 'self'
// only). Every element is built with the DOM API and every text goes in through textContent: names, prompts
// and errors come from config files and are never parsed as HTML.
'use strict';

/** How often the pipelines' figures are read (/status), and their per-query history. */
const STATUS_EVERY_MS = 2000;
const HISTORY_EVERY_MS = 5000;
/** The span of the per-query area charts. */
const HISTORY_SECONDS = 300;
/** How long a live stream that ended (daemon restarted, pipeline replaced) waits before it is opened again. */
const STREAM_RETRY_MS = 2000;

const $ = (id) => document.getElementById(id);

/** An element with attributes (`text`: its textContent, `on<event>`: a listener) and children. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

/** An SVG element (the charts) with attributes. */
function svg(tag, attrs = {}) {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  setAttrs(node, attrs);
  return node;
}

function setAttrs(node, attrs) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
}

const pipelineUrl = (name, rest) => `/v1/pipelines/${encodeURIComponent(name)}${rest}`;

/** fetch on this origin, with the session cookie; `json` is sent as a JSON body. */
function api(method, path, { json, body, type, accept } = {}) {
  const init = { method, headers: {}, credentials: 'same-origin', cache: 'no-store' };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers['Content-Type'] = 'application/json';
  } else if (body !== undefined) {
    init.body = body;
    if (type) init.headers['Content-Type'] = type;
  }
  if (accept) init.headers.Accept = accept;
  return fetch(path, init);
}

/** The messages of an error reply: `{"errors": [...]}`, `{"error": "..."}` or its text. */
async function errorsOf(reply) {
  const text = await reply.text();
  try {
    const parsed = JSON.parse(text);
    if (Array.isArray(parsed.errors)) return parsed.errors.map(String);
    if (parsed.error) return [String(parsed.error)];
  } catch (_) {
    // Not JSON: the text itself is the message.
  }
  return [text.trim() || `${reply.status} ${reply.statusText}`];
}

// ---------------------------------------------------------------------------------------------------------------
// Session: the login form when the daemon needs its token and this browser has no session yet.

const session = { statusTimer: null, historyTimer: null };

async function route() {
  let answer;
  try {
    const reply = await api('GET', '/v1/session');
    if (!reply.ok) throw new Error((await errorsOf(reply)).join('; '));
    answer = await reply.json();
  } catch (e) {
    banner(`Cannot reach the daemon (${e.message}); trying again.`);
    setTimeout(route, STATUS_EVERY_MS);
    return;
  }
  banner(null);
  if (answer.token_required && !answer.authorized) showLogin();
  else showApp(Boolean(answer.token_required));
}

function showLogin() {
  stopPolling();
  $('app').hidden = true;
  $('nav').hidden = true;
  $('logout').hidden = true;
  $('login').hidden = false;
  $('login-token').focus();
}

async function login(event) {
  event.preventDefault();
  const token = $('login-token');
  $('login-error').textContent = '';
  let reply;
  try {
    reply = await api('POST', '/v1/session', { json: { token: token.value } });
  } catch (e) {
    $('login-error').textContent = `Cannot reach the daemon: ${e.message}`;
    return;
  }
  if (reply.ok) {
    token.value = '';
    route();
    return;
  }
  $('login-error').textContent = reply.status === 401
    ? 'Wrong token.'
    : `Sign-in refused: ${(await errorsOf(reply)).join('; ')}`;
  token.select();
}

async function logout() {
  try {
    await api('DELETE', '/v1/session');
  } catch (_) {
    // Unreachable: the session ends with the daemon anyway.
  }
  dropPipelines();
  route();
}

/** A viewing route answered 401/403: the session ended (the daemon restarted, say); ask again. */
function sessionLost() {
  dropPipelines();
  route();
}

function banner(text) {
  $('banner').hidden = !text;
  $('banner').textContent = text || '';
}

function showApp(withLogout) {
  $('login').hidden = true;
  $('app').hidden = false;
  $('nav').hidden = false;
  $('logout').hidden = !withLogout;
  stopPolling();
  loadPipelines().then(() => {
    // Unless reading them ended the session (the login form is back).
    if ($('app').hidden) return;
    pollStatus();
    pollHistory();
  });
}

function stopPolling() {
  clearTimeout(session.statusTimer);
  clearTimeout(session.historyTimer);
}

// ---------------------------------------------------------------------------------------------------------------
// Pipelines: one overview card and one query editor each, built from GET /v1/pipelines (the effective config).

/** name → { config, card, editor, previous: {frames, at} } */
const pipelines = new Map();

let loading = null;

/** Reads the pipelines again; calls made while a read is under way share it. */
function loadPipelines() {
  if (!loading) loading = readPipelines().finally(() => { loading = null; });
  return loading;
}

async function readPipelines() {
  let list;
  try {
    const reply = await api('GET', '/v1/pipelines');
    if (reply.status === 401 || reply.status === 403) return sessionLost();
    if (!reply.ok) throw new Error((await errorsOf(reply)).join('; '));
    list = (await reply.json()).pipelines || [];
  } catch (e) {
    banner(`Cannot read the pipelines: ${e.message}`);
    return;
  }
  banner(null);
  list.sort((a, b) => a.name.localeCompare(b.name));
  const names = new Set(list.map((p) => p.name));
  for (const [name, entry] of pipelines) {
    if (!names.has(name)) {
      forget(entry);
      pipelines.delete(name);
    }
  }
  for (const config of list) {
    let entry = pipelines.get(config.name);
    if (!entry) {
      entry = { config, previous: null, history: null };
      entry.card = card(config);
      entry.editor = editor(config);
      pipelines.set(config.name, entry);
      watchStream(entry);
    }
    entry.config = config;
    $('pipelines').append(entry.card);
    $('editors').append(entry.editor.form);
    entry.card.querySelector('.source').textContent = config.source;
    queryRows(entry);
    if (!entry.editor.dirty) fillEditor(entry.editor, config);
  }
  $('overview-empty').hidden = list.length > 0;
  tryPipelines(list);
}

function dropPipelines() {
  for (const entry of pipelines.values()) forget(entry);
  pipelines.clear();
}

const idFor = (prefix, name) => `${prefix}-${name}`;

function card(config) {
  const name = config.name;
  const image = el('img', {
    id: idFor('live', name),
    class: 'live',
    alt: `Live overlay of pipeline ${name}`,
    width: 640,
    height: 360,
  });
  const figure = (label, key) => [
    el('dt', { text: label }),
    el('dd', { id: idFor(key, name), text: '…' }),
  ];
  return el('article', { class: 'card', id: idFor('pipeline', name), 'aria-labelledby': idFor('title', name) },
    el('h3', { id: idFor('title', name), text: name }),
    el('p', { class: 'source' }),
    el('div', { class: 'livebox' },
      image,
      el('p', { class: 'nolive', id: idFor('nolive', name), text: 'Waiting for the next frame…' })),
    el('dl', { class: 'figures' },
      ...figure('Source', 'state'),
      ...figure('Processed', 'fps'),
      ...figure('Latency p50 / p95', 'latency'),
      ...figure('Dropped', 'drops')),
    el('table', { class: 'queries', id: idFor('queries', name) },
      el('caption', { text: 'Queries (area over the last 5 minutes)' }),
      el('thead', {}, el('tr', {},
        el('th', { scope: 'col', text: 'Query' }),
        el('th', { scope: 'col', text: 'Now' }),
        el('th', { scope: 'col', text: 'Area' }))),
      el('tbody')));
}

/** The query rows of a card, in the config's order, each with its state cell and chart. */
function queryRows(entry) {
  const body = entry.card.querySelector('table.queries tbody');
  const wanted = entry.config.queries.filter((q) => !q.background).map((q) => q.name);
  const have = [...body.rows].map((row) => row.dataset.query);
  if (wanted.join('\n') !== have.join('\n')) {
    body.replaceChildren(...entry.config.queries.filter((q) => !q.background).map((q) => el('tr',
      { 'data-query': q.name },
      el('th', { scope: 'row' }, el('span', { class: 'swatch', 'aria-hidden': 'true' }), q.name),
      el('td', { class: 'presence', text: 'no data' }),
      el('td', { class: 'chart' }))));
  }
  for (const q of entry.config.queries) {
    const row = [...body.rows].find((r) => r.dataset.query === q.name);
    if (row) row.querySelector('.swatch').style.background = q.colour;
  }
  drawHistory(entry);
}

// Live overlays: an MJPEG stream per card, opened only while the card is on screen and the tab is visible, so
// the daemon encodes overlays only for someone watching. Each stream holds one of the few connections a browser
// opens to one server (six over HTTP/1.1), and the page's own requests need the rest: past MAX_STREAMS cards on
// screen, a card shows the latest overlay (live.jpg) at each /status poll instead.

const MAX_STREAMS = 4;
const visibleCards = new Set();
const onScreen = new IntersectionObserver((seen) => {
  for (const item of seen) {
    const name = item.target.dataset.pipeline;
    if (item.isIntersecting) visibleCards.add(name);
    else visibleCards.delete(name);
    const entry = pipelines.get(name);
    if (entry) syncStream(entry);
  }
});

function watchStream(entry) {
  const image = entry.card.querySelector('img.live');
  entry.card.dataset.pipeline = entry.config.name;
  // A frame arrived (for a stream, the first one): the "waiting" note goes (the /status poll checks it too).
  image.addEventListener('load', () => {
    $(idFor('nolive', entry.config.name)).hidden = true;
  });
  image.addEventListener('error', () => {
    // The stream ended or could not open (no frame yet): try again a little later, while the card is shown.
    if (entry.mode !== 'stream') return;
    entry.mode = null;
    clearTimeout(entry.retry);
    entry.retry = setTimeout(() => syncStream(entry), STREAM_RETRY_MS);
  });
  onScreen.observe(entry.card);
}

/** Opens or closes the card's overlay as it comes into or out of view: `entry.mode` is null, 'stream' (MJPEG)
 * or 'snapshot' (live.jpg, refreshed by `refreshSnapshots`). */
function syncStream(entry) {
  const wanted = visibleCards.has(entry.config.name) && document.visibilityState === 'visible'
    && pipelines.get(entry.config.name) === entry;
  if (!wanted) {
    if (entry.mode) closeStream(entry);
    return;
  }
  if (entry.mode === 'stream') return;
  const streams = [...pipelines.values()].filter((e) => e.mode === 'stream').length;
  if (streams < MAX_STREAMS) {
    entry.mode = 'stream';
    // A fresh URL each time, so an ended stream is really opened again.
    entry.card.querySelector('img.live').src = `${pipelineUrl(entry.config.name, '/live.mjpeg')}?open=${Date.now()}`;
  } else if (entry.mode !== 'snapshot') {
    entry.mode = 'snapshot';
    refreshSnapshot(entry);
  }
}

function refreshSnapshot(entry) {
  entry.card.querySelector('img.live').src = `${pipelineUrl(entry.config.name, '/live.jpg')}?at=${Date.now()}`;
}

function refreshSnapshots() {
  for (const entry of pipelines.values()) {
    if (entry.mode === 'snapshot') refreshSnapshot(entry);
  }
}

function closeStream(entry) {
  const freed = entry.mode === 'stream';
  entry.mode = null;
  clearTimeout(entry.retry);
  // Removing the source closes the connection.
  entry.card.querySelector('img.live').removeAttribute('src');
  if (freed) {
    // A connection is free: a card showing snapshots may stream now.
    for (const other of pipelines.values()) {
      if (other.mode === 'snapshot') {
        other.mode = null;
        syncStream(other);
        break;
      }
    }
  }
}

/** Opens every stream again: the daemon restarted, so the streams it served have ended. */
function reopenStreams() {
  for (const entry of pipelines.values()) closeStream(entry);
  for (const entry of pipelines.values()) syncStream(entry);
}

function forget(entry) {
  closeStream(entry);
  onScreen.unobserve(entry.card);
  visibleCards.delete(entry.config.name);
  entry.card.remove();
  entry.editor.form.remove();
}

document.addEventListener('visibilitychange', () => {
  for (const entry of pipelines.values()) syncStream(entry);
});

// ---------------------------------------------------------------------------------------------------------------
// Live figures from /status, every 2 s.

async function pollStatus() {
  clearTimeout(session.statusTimer);
  try {
    const reply = await api('GET', '/status');
    if (!reply.ok) throw new Error(`${reply.status}`);
    showStatus(await reply.json());
  } catch (e) {
    $('daemon-state').textContent = `daemon unreachable (${e.message})`;
    $('daemon-state').className = 'bad';
  }
  session.statusTimer = setTimeout(pollStatus, STATUS_EVERY_MS);
}

function showStatus(status) {
  const ready = $('daemon-state');
  ready.textContent = status.ready ? 'ready' : `not ready: ${status.not_ready || 'starting'}`;
  ready.className = status.ready ? 'ok' : 'warn';
  if (session.uptime !== undefined && status.uptime_s < session.uptime) reopenStreams();
  session.uptime = status.uptime_s;
  // A reload (SIGHUP, another editor) changed the set of pipelines or their queries: read the config again.
  const running = status.daemon && status.daemon.pipelines;
  if (running && differs(running)) loadPipelines();
  refreshSnapshots();
  const now = performance.now();
  for (const [name, entry] of pipelines) {
    // Until its first frame arrives the stream shows nothing (an idle folder sends none): say so.
    $(idFor('nolive', name)).hidden = entry.card.querySelector('img.live').naturalWidth > 0;
    const figures = (status.pipelines || {})[name];
    if (!figures) continue;
    const state = sourceState(figures);
    const cell = $(idFor('state', name));
    cell.textContent = state.text;
    cell.className = state.level;
    const previous = entry.previous;
    entry.previous = { frames: figures.frames_out, at: now };
    if (previous && now > previous.at) {
      const fps = ((figures.frames_out - previous.frames) * 1000) / (now - previous.at);
      $(idFor('fps', name)).textContent = `${Math.max(0, fps).toFixed(1)} fps`;
    }
    $(idFor('latency', name)).textContent = figures.latency_p50_s === null || figures.latency_p50_s === undefined
      ? 'no frame yet'
      : `≤ ${millis(figures.latency_p50_s)} / ≤ ${millis(figures.latency_p95_s)}`;
    const drops = Object.entries(figures.drops || {}).filter(([, n]) => n > 0);
    $(idFor('drops', name)).textContent = drops.length
      ? drops.map(([reason, n]) => `${reason.replace(/_/g, ' ')}: ${n}`).join(', ')
      : 'none';
  }
}

/** Whether the running pipelines (/status's `daemon.pipelines`) are not the ones shown. */
function differs(running) {
  const names = (keys) => [...keys].sort().join('\n');
  if (names(Object.keys(running)) !== names(pipelines.keys())) return true;
  return Object.entries(running).some(([name, p]) => {
    const entry = pipelines.get(name);
    return entry && Array.isArray(p.queries)
      && p.queries.join('\n') !== entry.config.queries.map((q) => q.name).join('\n');
  });
}

/** connected / reconnecting (with the last error) / stalled / not running, and how worrying it is. */
function sourceState(figures) {
  if (figures.running === false) {
    return { text: `not running: ${figures.error || 'unknown error'}`, level: 'bad' };
  }
  const state = figures.source_state || (figures.connected ? 'connected' : 'reconnecting');
  const error = figures.source_error || '';
  if (state === 'connected') return { text: 'connected', level: 'ok' };
  return { text: error ? `${state}: ${error}` : state, level: 'warn' };
}

const millis = (seconds) => (seconds === null || seconds === undefined ? '?' : `${Math.round(seconds * 1000)} ms`);

// ---------------------------------------------------------------------------------------------------------------
// Per-query presence and area over the last minutes, from /history, every 5 s.

async function pollHistory() {
  clearTimeout(session.historyTimer);
  await Promise.all([...pipelines.values()].map(async (entry) => {
    try {
      const reply = await api('GET', pipelineUrl(entry.config.name, `/history?seconds=${HISTORY_SECONDS}`));
      if (reply.status === 401 || reply.status === 403) return sessionLost();
      if (!reply.ok) return null;
      entry.history = await reply.json();
      drawHistory(entry);
    } catch (_) {
      // The daemon is restarting: /status says so; the next round tries again.
    }
    return null;
  }));
  session.historyTimer = setTimeout(pollHistory, HISTORY_EVERY_MS);
}

function drawHistory(entry) {
  const history = entry.history;
  if (!history) return;
  const body = entry.card.querySelector('table.queries tbody');
  for (const row of body.rows) {
    const series = (history.queries || {})[row.dataset.query];
    const presence = row.querySelector('.presence');
    const chart = row.querySelector('.chart');
    if (!series || !series.t_ms || series.t_ms.length === 0) {
      presence.textContent = 'no data';
      presence.className = 'presence';
      chart.replaceChildren();
      continue;
    }
    const last = series.t_ms.length - 1;
    const present = Boolean(series.present[last]);
    presence.textContent = present ? `present ${percent(series.area[last])}` : 'absent';
    presence.className = `presence ${present ? 'present' : 'absent'}`;
    const query = entry.config.queries.find((q) => q.name === row.dataset.query);
    chart.replaceChildren(areaChart(series, query ? query.colour : '#888888', row.dataset.query));
  }
}

const percent = (fraction) => `${(100 * (fraction || 0)).toFixed(fraction < 0.1 ? 1 : 0)}%`;

/** A small area chart (inline SVG) of one query's area over the last HISTORY_SECONDS, scaled to its peak. */
function areaChart(series, colour, name) {
  const width = 160;
  const height = 32;
  const end = Date.now();
  const start = end - HISTORY_SECONDS * 1000;
  const peak = Math.max(0.01, ...series.area);
  const x = (t) => (((t - start) / (end - start)) * width).toFixed(1);
  const y = (a) => (height - (a / peak) * (height - 2)).toFixed(1);
  const points = series.t_ms.map((t, i) => [t, series.area[i]]).filter(([t]) => t >= start);
  const chart = svg('svg', {
    class: 'spark',
    viewBox: `0 0 ${width} ${height}`,
    role: 'img',
    'aria-label': `${name}: area over the last ${HISTORY_SECONDS / 60} minutes, peak ${percent(peak)}`,
  });
  if (points.length > 0) {
    const line = points.map(([t, a]) => `${x(t)},${y(a)}`).join(' ');
    const first = x(points[0][0]);
    const lastX = x(points[points.length - 1][0]);
    chart.append(svg('polygon', {
      points: `${first},${height} ${line} ${lastX},${height}`,
      fill: colour,
      'fill-opacity': '0.35',
    }));
    chart.append(svg('polyline', { points: line, fill: 'none', stroke: colour, 'stroke-width': '1.5' }));
  }
  const title = svg('title');
  title.textContent = `peak ${percent(peak)}`;
  chart.append(title);
  return chart;
}

// ---------------------------------------------------------------------------------------------------------------
// The query editor: the rows are the new query list; Save sends all of it (PUT /v1/pipelines/{name}/queries).
// Validation is the daemon's alone (the form is novalidate): its messages are the ones `config check` gives.

let rowCounter = 0;

function editor(config) {
  const name = config.name;
  const state = { name, dirty: false };
  const rows = el('div', { class: 'rows', id: idFor('editor-rows', name) });
  const errors = el('ul', { class: 'errors', id: idFor('editor-errors', name), role: 'alert' });
  const status = el('p', { class: 'saved', id: idFor('editor-status', name), role: 'status' });
  const add = el('button', {
    type: 'button',
    id: idFor('editor-add', name),
    text: 'Add query',
    onclick: () => {
      const row = queryRow(state, { name: '', colour: nextColour(rows), prompts: null, threshold: null });
      rows.append(row);
      changed(state);
      row.querySelector('input.qname').focus();
    },
  });
  const discard = el('button', {
    type: 'button',
    id: idFor('editor-discard', name),
    text: 'Discard changes',
    onclick: () => {
      state.dirty = false;
      const entry = pipelines.get(name);
      if (entry) fillEditor(state, entry.config);
      loadPipelines();
    },
  });
  const save = el('button', { type: 'submit', id: idFor('editor-save', name), text: 'Save' });
  const form = el('form', {
    class: 'editor',
    id: idFor('editor', name),
    novalidate: true,
    'aria-labelledby': idFor('editor-title', name),
    onsubmit: (event) => {
      event.preventDefault();
      saveQueries(state);
    },
  },
  el('h3', { id: idFor('editor-title', name), text: name }),
  rows,
  el('div', { class: 'actions' }, add, save, discard),
  errors,
  status);
  Object.assign(state, { form, rows, errors, status, save });
  return state;
}

function fillEditor(state, config) {
  state.rows.replaceChildren(...config.queries.map((q) => queryRow(state, q)));
  state.errors.replaceChildren();
}

function changed(state) {
  state.dirty = true;
  state.status.textContent = 'Unsaved changes';
}

/** One query's fields. The original entry rides along so fields this editor does not show (background) stay. */
function queryRow(state, query) {
  rowCounter += 1;
  const id = (field) => `q${rowCounter}-${field}`;
  const onchange = () => changed(state);
  const field = (label, input) => el('div', { class: 'field' }, el('label', { for: input.id, text: label }), input);
  const row = el('fieldset', { class: 'qrow' },
    el('legend', { class: 'visually-hidden', text: query.name ? `Query ${query.name}` : 'New query' }),
    field('Name', el('input', {
      id: id('name'), class: 'qname', type: 'text', value: query.name, autocomplete: 'off', oninput: onchange,
    })),
    field('Colour', el('input', {
      id: id('colour'), class: 'qcolour', type: 'color', value: query.colour || '#888888', oninput: onchange,
    })),
    field('Prompts (one a line; empty: the model\'s templates)', el('textarea', {
      id: id('prompts'), class: 'qprompts', rows: 2, oninput: onchange, text: (query.prompts || []).join('\n'),
    })),
    field('Threshold (0–1; empty: the pipeline\'s)', el('input', {
      id: id('threshold'),
      class: 'qthreshold',
      type: 'text',
      inputmode: 'decimal',
      value: query.threshold === null || query.threshold === undefined ? '' : query.threshold,
      oninput: onchange,
    })),
    el('button', {
      type: 'button',
      class: 'remove',
      text: 'Remove',
      'aria-label': `Remove query ${query.name || '(new)'}`,
      onclick: () => {
        row.remove();
        changed(state);
      },
    }));
  row.dataset.background = query.background ? 'true' : '';
  return row;
}

/** The colour the daemon would give a query at palette label `label` when it names none (PASCAL VOC map). */
function defaultColour(label) {
  let [r, g, b] = [0, 0, 0];
  let c = label;
  for (let j = 0; j < 8; j += 1) {
    r |= (c & 1) << (7 - j);
    g |= ((c >> 1) & 1) << (7 - j);
    b |= ((c >> 2) & 1) << (7 - j);
    c >>= 3;
  }
  return `#${[r, g, b].map((v) => v.toString(16).padStart(2, '0')).join('')}`;
}

/** The default colour of a row added at the end. */
function nextColour(rows) {
  const labels = [...rows.children].filter((r) => !r.dataset.background).length;
  return defaultColour(labels + 1);
}

/** The rows as the PUT body's queries. A colour is sent only where it differs from the one the daemon would
 * pick at that place anyway, so a plain list of names stays a plain list in the operator's file. Everything
 * else is the daemon's to check; only a threshold that is not a number at all cannot be sent (JSON has no place
 * for it), so it is reported here, in the daemon's words. */
function readRows(state) {
  let label = 0;
  const notNumbers = [];
  const queries = [...state.rows.children].map((row) => {
    const query = { name: row.querySelector('.qname').value.trim() };
    const prompts = row.querySelector('.qprompts').value.split('\n').map((p) => p.trim()).filter(Boolean);
    if (prompts.length) query.prompts = prompts;
    const threshold = row.querySelector('.qthreshold').value.trim();
    if (threshold !== '') {
      query.threshold = Number(threshold);
      if (!Number.isFinite(query.threshold)) {
        notNumbers.push(`query '${query.name}': threshold '${threshold}' is not a number (give one in 0..1, or leave it empty)`);
      }
    }
    if (row.dataset.background) {
      query.background = true;
    } else {
      label += 1;
      const colour = row.querySelector('.qcolour').value.toLowerCase();
      if (colour !== defaultColour(label)) query.colour = colour;
    }
    return query;
  });
  return { queries, notNumbers };
}

async function saveQueries(state) {
  state.errors.replaceChildren();
  state.status.textContent = 'Saving…';
  const { queries, notNumbers } = readRows(state);
  if (notNumbers.length) {
    state.errors.replaceChildren(...notNumbers.map((m) => el('li', { text: m })));
    state.status.textContent = 'Not saved: nothing was changed.';
    return;
  }
  state.save.disabled = true;
  try {
    const reply = await api('PUT', pipelineUrl(state.name, '/queries'), { json: { queries } });
    if (reply.status === 401) {
      sessionLost();
      return;
    }
    if (!reply.ok) {
      const messages = await errorsOf(reply);
      state.errors.replaceChildren(...messages.map((m) => el('li', { text: m })));
      state.status.textContent = reply.status === 409
        ? 'Not saved: the file changed or the queries are not the file\'s (see above).'
        : 'Not saved: nothing was changed.';
      return;
    }
    const outcome = await reply.json().catch(() => ({}));
    const failed = (outcome.failed || []).filter(Boolean);
    state.dirty = false;
    state.status.textContent = failed.length ? `Saved, but: ${failed.join('; ')}` : 'Saved and applied.';
    await loadPipelines();
  } catch (e) {
    state.errors.replaceChildren(el('li', { text: `Cannot reach the daemon: ${e.message}` }));
    state.status.textContent = 'Not saved.';
  } finally {
    state.save.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Try an image: POST /v1/segment twice, once for the overlay (Accept: image/jpeg), once for the areas (JSON).

let tryImage = null;

function tryPipelines(list) {
  const select = $('try-pipeline');
  const chosen = select.value;
  select.replaceChildren(el('option', { value: '', text: '(none)' }),
    ...list.map((p) => el('option', { value: p.name, text: p.name })));
  select.value = list.some((p) => p.name === chosen) ? chosen : '';
  tryChecks();
}

/** One checkbox per query of the chosen pipeline, all checked. */
function tryChecks() {
  const fieldset = $('try-checks');
  const entry = pipelines.get($('try-pipeline').value);
  const queries = entry ? entry.config.queries.filter((q) => !q.background) : [];
  const previous = new Map([...fieldset.querySelectorAll('input')].map((box) => [box.value, box.checked]));
  fieldset.replaceChildren(el('legend', { text: 'Pipeline queries' }), ...queries.map((q, i) => {
    const box = el('input', { type: 'checkbox', id: `try-q${i}`, value: q.name, checked: previous.get(q.name) ?? true });
    return el('div', { class: 'check' }, box, el('label', { for: box.id, text: q.name }));
  }));
  fieldset.hidden = queries.length === 0;
}

function takeImage(file) {
  if (!file) return;
  tryImage = file;
  $('try-file-name').textContent = `${file.name} (${Math.round(file.size / 1024)} KiB)`;
  $('try-error').textContent = '';
}

/** The query string: the pipeline's own queries (prompts, colours, thresholds) when all of them are ticked and
 * nothing else is asked; otherwise each query by name. */
function tryQuery() {
  const pipeline = $('try-pipeline').value;
  const boxes = [...$('try-checks').querySelectorAll('input')];
  const ticked = boxes.filter((b) => b.checked).map((b) => b.value);
  const typed = $('try-text').value.split(',').map((q) => q.trim()).filter(Boolean);
  if (pipeline && typed.length === 0 && boxes.length > 0 && ticked.length === boxes.length) {
    return `pipeline=${encodeURIComponent(pipeline)}`;
  }
  return [...ticked, ...typed].map((q) => `query=${encodeURIComponent(q)}`).join('&');
}

async function tryIt(event) {
  event.preventDefault();
  const error = $('try-error');
  error.textContent = '';
  if (!tryImage) {
    error.textContent = 'Choose or drop an image first.';
    return;
  }
  const query = tryQuery();
  if (!query) {
    error.textContent = 'Pick at least one query or type one.';
    return;
  }
  const path = `/v1/segment?${query}`;
  const type = tryImage.type || 'application/octet-stream';
  $('try-submit').disabled = true;
  try {
    const [overlay, areas] = await Promise.all([
      api('POST', path, { body: tryImage, type, accept: 'image/jpeg' }),
      api('POST', path, { body: tryImage, type, accept: 'application/json' }),
    ]);
    for (const reply of [overlay, areas]) {
      if (!reply.ok) {
        if (reply.status === 401) sessionLost();
        error.textContent = `Not segmented (${reply.status}): ${(await errorsOf(reply)).join('; ')}`;
        return;
      }
    }
    const picture = $('try-overlay');
    if (picture.src.startsWith('blob:')) URL.revokeObjectURL(picture.src);
    picture.src = URL.createObjectURL(await overlay.blob());
    const sidecar = await areas.json();
    $('try-areas').tBodies[0].replaceChildren(...(sidecar.classes || []).map((c) => el('tr',
      { 'data-query': c.name },
      el('th', { scope: 'row', text: c.label === 0 ? `${c.name} (background)` : c.name }),
      el('td', { class: 'area', text: percent(c.pixel_fraction) }),
      el('td', { text: c.mean_score === null || c.mean_score === undefined ? '–' : c.mean_score.toFixed(2) }))));
    $('try-result').hidden = false;
  } catch (e) {
    error.textContent = `Cannot reach the daemon: ${e.message}`;
  } finally {
    $('try-submit').disabled = false;
  }
}

function wireTry() {
  $('try-form').addEventListener('submit', tryIt);
  $('try-file').addEventListener('change', () => takeImage($('try-file').files[0]));
  $('try-pipeline').addEventListener('change', tryChecks);
  const drop = $('try-drop');
  drop.addEventListener('dragover', (event) => {
    event.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    drop.classList.remove('over');
    takeImage(event.dataTransfer.files[0]);
  });
}

// ---------------------------------------------------------------------------------------------------------------

document.addEventListener('DOMContentLoaded', () => {
  $('login-form').addEventListener('submit', login);
  $('logout').addEventListener('click', logout);
  wireTry();
  route();
});
