// groupbuy console: a small single-page app over the operator API. No framework and no build
// step: the gateway serves this file as it is. Every value from the server is put in the page
// as text (never as HTML), and the operator token stays in this tab's sessionStorage.
'use strict';

const TOKEN_KEY = 'groupbuy.operator-token';
const view = document.getElementById('view');
let leave = []; // what the current page must stop when another is shown

// --- talking to the API ---------------------------------------------------------------------

class Problem extends Error {
  constructor(status, body) {
    super((body && (body.detail || body.title)) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
  }
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${token()}`, Accept: 'application/json', ...(options.headers || {}) },
  });
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (response.status === 401 || response.status === 403) { signOut('That token is not the operator token.'); }
  if (!response.ok) { throw new Problem(response.status, body); }
  return body;
}

// Follows a Server-Sent Events endpoint with the token in a header (EventSource cannot send
// one), calling `onEvent(name, data)` per event, and reconnects after a failure until `signal`
// aborts. `onState(true|false)` says whether the stream is connected.
async function follow(path, onEvent, onState, signal) {
  while (!signal.aborted) {
    try {
      const response = await fetch(path, {
        headers: { Authorization: `Bearer ${token()}`, Accept: 'text/event-stream' }, signal,
      });
      if (!response.ok) { throw new Problem(response.status, await response.json().catch(() => null)); }
      onState(true);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffered = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) { break; }
        buffered += value.replace(/\r\n/g, '\n');
        let end;
        while ((end = buffered.indexOf('\n\n')) >= 0) {
          const frame = buffered.slice(0, end);
          buffered = buffered.slice(end + 2);
          let name = 'message'; const data = [];
          for (const line of frame.split('\n')) {
            if (line.startsWith('event:')) { name = line.slice(6).trim(); }
            else if (line.startsWith('data:')) { data.push(line.slice(5).replace(/^ /, '')); }
          }
          if (data.length) { onEvent(name, data.join('\n')); }
        }
      }
    } catch (error) {
      if (signal.aborted) { return; }
      if (error instanceof Problem && error.status === 404) { onState(false, error); return; }
    }
    onState(false);
    await sleep(2000);
  }
}

// Runs `refresh` now and then `ms` after each run ends, until the page is left: a slow answer
// (a lag counted over a long log) delays the next request instead of piling requests up.
async function every(ms, refresh) {
  let timer = null;
  let left = false;
  const again = async () => {
    await refresh();
    if (!left) { timer = setTimeout(again, ms); }
  };
  leave.push(() => { left = true; clearTimeout(timer); });
  await again();
}

function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

// --- building the page ------------------------------------------------------------------------

// h('div.card', {onclick}, child, ...): an element with classes, attributes and children
// (strings become text nodes, arrays are flattened, null and false are skipped).
function h(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split('.');
  const element = document.createElement(tag || 'div');
  if (classes.length) { element.className = classes.join(' '); }
  if (attrs && (typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs); attrs = null;
  }
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) { continue; }
    if (key.startsWith('on')) { element.addEventListener(key.slice(2), value); }
    else if (key === 'style') { Object.assign(element.style, value); }
    else { element.setAttribute(key, value === true ? '' : value); }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) { continue; }
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

// DOM methods would print a null child as the text "null": leave such children out.
function present(children) { return children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false); }
function show(...children) { view.replaceChildren(...present(children)); }

const number = new Intl.NumberFormat('en');
function n(value) { return value === null || value === undefined ? '–' : number.format(value); }
function plural(count, noun) { return `${n(count)} ${noun}${count === 1 ? '' : 's'}`; }
function words(snake) { return String(snake).replace(/_/g, ' '); }
function when(iso) {
  if (!iso) { return '–'; }
  const at = new Date(iso);
  return at.toLocaleString('en-GB', { dateStyle: 'medium', timeStyle: 'medium' })
    + '.' + String(at.getMilliseconds()).padStart(3, '0');
}
function day(iso) {
  return new Date(iso).toLocaleString('en-GB', { dateStyle: 'medium', timeStyle: 'short' });
}
function badge(value, kind) { return h('span.badge.' + (kind || value), words(value)); }
function category(streamId) { return String(streamId).split('-')[0]; }
function streamLink(streamId) {
  return h('a.mono', { href: `#/streams/${encodeURIComponent(streamId)}` }, streamId);
}
function json(value) { return h('pre.json', JSON.stringify(value, null, 2)); }
function failure(error) { return h('div.notice.bad', error.message || String(error)); }
function pageHead(title, sub, ...aside) {
  return h('div.page-head', h('div', h('h1', title), sub ? h('div.sub', sub) : null), h('div', aside));
}

function stockBar(stock) {
  const total = Math.max(stock.total, 1);
  const pct = (units) => `${(100 * units) / total}%`;
  return h('div.stockbar', { title: `${stock.sold} sold, ${stock.reserved} reserved, ${stock.available} available` },
    h('span.sold', { style: { width: pct(stock.sold) } }),
    h('span.reserved', { style: { width: pct(stock.reserved) } }));
}
function legend() {
  return h('div.legend',
    h('span', h('i', { style: { background: 'var(--sold)' } }), 'sold'),
    h('span', h('i', { style: { background: 'var(--reserved)' } }), 'reserved'),
    h('span', h('i', { style: { background: 'var(--available)' } }), 'available'));
}

// --- pages ------------------------------------------------------------------------------------

// Every campaign as a card, newest first, its stock refreshed every two seconds in place (a
// card keeps its element, so a click is never lost to a refresh). A campaign's own page
// follows its sale live.
async function campaignsPage() {
  show(pageHead('Campaigns', 'Every group-buy deal with its stock, refreshed every two seconds. Open one to watch its sale live.'));
  const grid = h('div.grid.cards');
  const notice = h('div');
  view.append(notice, grid);
  const cards = new Map();
  const card = (c) => {
    const parts = { badge: h('span'), bar: h('div'), numbers: h('div.numbers') };
    parts.element = h('a.card.campaign-card', { href: `#/campaigns/${c.campaign_id}` },
      h('div', { style: { display: 'flex', justifyContent: 'space-between', gap: '8px' } },
        h('span.title', c.title), parts.badge),
      h('div.meta', `${c.sku} · ${money(c.price_cents)} · limit ${c.per_user_limit} per customer`),
      parts.bar, parts.numbers);
    return parts;
  };
  const refresh = async () => {
    let list;
    try { list = await api('/v1/campaigns'); } catch (error) { notice.replaceChildren(failure(error)); return; }
    notice.replaceChildren(...present([list.items.length ? null : h('div.card.empty', 'No campaigns yet.')]));
    for (const c of [...list.items].reverse()) {
      let parts = cards.get(c.campaign_id);
      if (!parts) { parts = card(c); cards.set(c.campaign_id, parts); }
      parts.badge.replaceChildren(badge(c.status));
      parts.bar.replaceChildren(stockBar(c.stock));
      parts.numbers.replaceChildren(
        h('span', h('b', n(c.stock.sold)), ' sold'),
        h('span', h('b', n(c.stock.reserved)), ' reserved'),
        h('span', h('b', n(c.stock.available)), ' of ', n(c.stock.total), ' left'));
      grid.append(parts.element); // newest first, as listed
    }
  };
  await every(2000, refresh);
}

function money(cents) { return (cents / 100).toLocaleString('en', { style: 'currency', currency: 'USD' }); }

async function campaignPage(id) {
  const stats = h('div.grid.stats');
  const bar = h('div');
  const window_ = h('dl.kv.sellthrough');
  const funnel = h('div.funnel');
  const canvas = h('canvas.chart', { width: 800, height: 200, 'aria-label': 'orders per second' });
  const state = h('span.muted', 'connecting…');
  const dot = h('span.live-dot.off');
  const head = h('div');
  const rates = h('span.muted');
  const series = []; // {t, placed, decided}
  let last = null;

  show(head,
    h('div.grid.two',
      h('section.card', h('h2', 'Stock'), stats, bar, legend(), window_),
      h('section.card', h('h2', 'Orders', h('span', dot, state)), funnel)),
    h('section.card', h('h2', 'Orders per second', rates), canvas,
      h('div.legend',
        h('span', h('i', { style: { background: 'var(--accent)' } }), 'placed'),
        h('span', h('i', { style: { background: 'var(--sold)' } }), 'decided (stock reserved or refused)'))),
    timeTravel(id));

  const render = (sale) => {
    const c = sale.campaign;
    head.replaceChildren(pageHead(c.title,
      h('span', `${c.sku} · ${money(c.price_cents)} · limit ${c.per_user_limit} per customer · `,
        streamLink(`campaign-${c.campaign_id}`)),
      badge(c.status)));
    stats.replaceChildren(...['total', 'available', 'reserved', 'sold'].map((k) =>
      h('div.stat.' + k, h('div.label', k), h('div.value', n(c.stock[k])))));
    bar.replaceChildren(stockBar(c.stock));
    const share = (units) => `${c.stock.total ? Math.round((100 * units) / c.stock.total) : 0} %`;
    window_.replaceChildren(
      h('dt', 'Sold through'), h('dd', `${share(c.stock.sold)} sold, ${share(c.stock.reserved)} held for payment`),
      h('dt', 'Sales window'), h('dd', `${day(c.starts_at)} to ${day(c.ends_at)}`),
      h('dt', 'Payment window'), h('dd', `${n(c.payment_timeout_seconds)} s`));
    const o = sale.orders;
    const of = (count) => `${o.placed ? (100 * count) / o.placed : 0}%`;
    const row = (name, count, kind, sub) => [
      h('div.name' + (sub ? '.sub' : ''), name),
      h('div.track', h('span' + (kind ? '.' + kind : ''), { style: { width: of(count) } })),
      h('div.count', n(count))];
    const rejected = Object.values(o.rejected).reduce((a, b) => a + b, 0);
    const cancelled = Object.values(o.cancelled).reduce((a, b) => a + b, 0);
    funnel.replaceChildren(...[
      row('Placed', o.placed),
      row('Pending', o.pending, 'warn'),
      row('Awaiting payment', o.awaiting_payment, 'warn'),
      row('Confirmed', o.confirmed, 'ok'),
      row('Rejected', rejected, 'bad'),
      Object.entries(o.rejected).map(([why, count]) => row(words(why), count, 'bad', true)),
      row('Cancelled', cancelled, 'bad'),
      Object.entries(o.cancelled).map(([why, count]) => row(words(why), count, 'bad', true)),
    ].flat(2));
    const t = Date.parse(sale.at) / 1000;
    const decided = o.placed - o.pending;
    if (last && t > last.t) {
      const dt = t - last.t;
      series.push({ t, placed: (o.placed - last.placed) / dt, decided: (decided - last.decided) / dt });
      if (series.length > 120) { series.shift(); }
      const now = series[series.length - 1];
      rates.textContent = `now ${n(Math.round(now.placed))} placed/s, ${n(Math.round(now.decided))} decided/s`;
    }
    last = { t, placed: o.placed, decided };
    drawChart(canvas, series);
  };

  const stop = new AbortController();
  leave.push(() => stop.abort());
  drawChart(canvas, series);
  follow(`/v1/admin/campaigns/${encodeURIComponent(id)}/sale/live?interval_ms=1000`,
    (name, data) => { if (name === 'sale') { render(JSON.parse(data)); } },
    (up, error) => {
      dot.className = up ? 'live-dot' : 'live-dot off';
      state.textContent = up ? 'live' : (error ? error.message : 'reconnecting…');
    },
    stop.signal);
}

// The last two minutes of rates, as two lines on a canvas sized for the screen's pixels.
function drawChart(canvas, series) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 800; const height = canvas.clientHeight || 200;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const g = canvas.getContext('2d');
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const left = 52; const bottom = height - 22; const top = 10; const right = width - 8;
  const max = Math.max(10, ...series.map((p) => Math.max(p.placed, p.decided)));
  const step = niceStep(max / 4);
  const ceiling = Math.ceil(max / step) * step;
  g.font = '11px system-ui, sans-serif'; g.fillStyle = '#667085'; g.strokeStyle = '#e4e7ec';
  g.textAlign = 'right'; g.textBaseline = 'middle';
  for (let v = 0; v <= ceiling; v += step) {
    const y = bottom - ((bottom - top) * v) / ceiling;
    g.beginPath(); g.moveTo(left, y); g.lineTo(right, y); g.stroke();
    g.fillText(number.format(v), left - 8, y);
  }
  g.textAlign = 'center'; g.textBaseline = 'top';
  g.fillText('2 min ago', left + 24, bottom + 6); g.fillText('now', right - 12, bottom + 6);
  if (!series.length) {
    g.fillText('waiting for the sale…', (left + right) / 2, (top + bottom) / 2);
    return;
  }
  const x = (i) => right - ((series.length - 1 - i) * (right - left)) / 119;
  // Decided under placed, which is dashed: at a steady rate the two lines coincide.
  for (const [key, colour, dash] of [['decided', '#18a36b', []], ['placed', '#3457d5', [6, 4]]]) {
    g.beginPath(); g.lineWidth = 2; g.strokeStyle = colour; g.setLineDash(dash);
    series.forEach((p, i) => {
      const y = bottom - ((bottom - top) * p[key]) / ceiling;
      if (i) { g.lineTo(x(i), y); } else { g.moveTo(x(i), y); }
    });
    g.stroke();
  }
}

function niceStep(raw) {
  const power = 10 ** Math.floor(Math.log10(Math.max(raw, 1)));
  return [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || power * 10;
}

// The campaign folded from the log as it stood at a position or a time.
function timeTravel(id) {
  const input = h('input', { type: 'text', placeholder: 'global position, or a time such as 2026-11-30T18:00:00Z' });
  const out = h('div');
  const form = h('form.inline', {
    onsubmit: async (event) => {
      event.preventDefault();
      out.replaceChildren(h('p.muted', 'folding the log…'));
      try {
        const then = await api(`/v1/admin/campaigns/${encodeURIComponent(id)}?as_of=${encodeURIComponent(input.value.trim())}`);
        const s = then.campaign.stock;
        out.replaceChildren(h('p', `At position ${n(then.global_position)} (${when(then.recorded_at)}): `,
          `${n(s.sold)} sold, ${n(s.reserved)} reserved, ${n(s.available)} available of ${n(s.total)}; `,
          badge(then.campaign.status)), stockBar(s));
      } catch (error) { out.replaceChildren(failure(error)); }
    },
  }, input, h('button', { type: 'submit' }, 'Show'));
  return h('section.card', h('h2', 'Time travel'),
    h('p.muted', 'The campaign as it stood at a global log position or an instant, folded from the log.'), form, out);
}

function searchForm(placeholder, value, go) {
  const input = h('input', { type: 'text', placeholder, value: value || '', required: true });
  return h('form.inline', {
    onsubmit: (event) => { event.preventDefault(); go(input.value.trim()); },
  }, input, h('button.primary', { type: 'submit' }, 'Open'));
}

async function orderPage(id) {
  show(pageHead('Order timeline', 'Every event of an order, its reservation, payment and saga steps, in log order.'),
    h('div.card', searchForm('order id (ULID)', id, (v) => { location.hash = `#/orders/${encodeURIComponent(v)}`; })));
  if (!id) { return; }
  let history; let order = null;
  try {
    [history, order] = await Promise.all([
      api(`/v1/admin/orders/${encodeURIComponent(id)}/history`),
      api(`/v1/orders/${encodeURIComponent(id)}`).catch(() => null),
    ]);
  } catch (error) { view.append(failure(error)); return; }
  const summary = order ? h('div.card', h('h2', 'Now', badge(order.status)), h('dl.kv',
    h('dt', 'Campaign'), h('dd', h('a.mono', { href: `#/campaigns/${order.campaign_id}` }, order.campaign_id)),
    h('dt', 'Customer'), h('dd.mono', order.user_id),
    h('dt', 'Quantity'), h('dd', n(order.quantity)),
    h('dt', 'Amount'), h('dd', money(order.amount_cents)),
    order.reason ? [h('dt', 'Why'), h('dd', words(order.reason))] : null,
    order.payment ? [h('dt', 'Payment'), h('dd', badge(order.payment.status), ' ', h('span.mono', order.payment.payment_id))] : null)) : null;
  view.append(...present([summary, h('div.card', h('h2', plural(history.events.length, 'event')), timeline(history.events))]));
}

function timeline(events) {
  if (!events.length) { return h('div.empty', 'No events.'); }
  return h('ol.timeline', events.map((e) => {
    const m = e.metadata || {};
    return h('li',
      h('div.when', when(e.recorded_at), ' · position ', n(e.global_position)),
      h('div', h('span.what', e.event_type), badge(category(e.stream_id), 'cat-' + category(e.stream_id)), ' ',
        streamLink(e.stream_id), h('span.muted', ` v${e.stream_version}`)),
      h('div.facts',
        m.actor ? h('span', 'by ', h('b', m.actor)) : null,
        m.trace_id ? h('span', 'trace ', h('code', m.trace_id)) : null,
        m.causation_id ? h('span', 'caused by ', h('code', m.causation_id)) : null,
        m.idempotency_key ? h('span', 'key ', h('code', m.idempotency_key)) : null),
      h('details', h('summary', 'payload and envelope'), json(e)));
  }));
}

async function streamPage(streamId, from) {
  show(pageHead('Stream browser', 'Any stream of the log by id, a page at a time: order-…, campaign-…, payment-…, stock-…'),
    h('div.card', searchForm('stream id, e.g. campaign-01J…', streamId, (v) => { location.hash = `#/streams/${encodeURIComponent(v)}`; })));
  if (!streamId) { return; }
  const fromVersion = Number(from) || 1;
  let page;
  try {
    page = await api(`/v1/admin/streams/${encodeURIComponent(streamId)}/events?from_version=${fromVersion}&limit=50`);
  } catch (error) { view.append(failure(error)); return; }
  const rows = page.events.map((e) => h('tr',
    h('td.num', n(e.stream_version)),
    h('td', h('b', e.event_type), h('span.muted', ` schema v${e.schema_version}`),
      h('details', h('summary', 'envelope and payload'), json(e))),
    h('td.num', n(e.global_position)),
    h('td', when(e.recorded_at)),
    h('td', (e.metadata && e.metadata.actor) || '–')));
  const more = page.next_from_version
    ? h('a', { href: `#/streams/${encodeURIComponent(streamId)}/${page.next_from_version}` }, `Next page (from v${page.next_from_version}) →`)
    : h('span.muted', 'End of stream.');
  const back = fromVersion > 1
    ? h('a', { href: `#/streams/${encodeURIComponent(streamId)}/${Math.max(1, fromVersion - 50)}` }, '← Previous page') : null;
  view.append(h('div.card',
    h('h2', h('span.mono', page.stream_id), h('span.muted', `versions ${fromVersion}–${fromVersion + page.events.length - 1}`)),
    page.events.length ? h('table', h('thead', h('tr', h('th.num', 'Version'), h('th', 'Event'), h('th.num', 'Position'), h('th', 'Recorded'), h('th', 'Actor'))),
      h('tbody', rows)) : h('div.empty', 'No events from this version.'),
    h('p', { style: { display: 'flex', justifyContent: 'space-between' } }, back || h('span'), more)));
}

async function operationsPage() {
  const projections = h('div'); const relay = h('div'); const letters = h('div'); const audit = h('div');
  show(pageHead('Operations', 'Read models, the outbox relay, dead letters and the reconciliation audit.'),
    h('div.grid.two',
      h('section.card', h('h2', 'Read models'), projections),
      h('section.card', h('h2', 'Outbox relay'), relay)),
    h('section.card', h('h2', 'Dead letters', h('button.small', { onclick: () => loadLetters(letters) }, 'Refresh')), letters),
    h('section.card', h('h2', 'Reconciliation audit'), auditPanel(audit)));
  let head = 0;
  let table = null;
  const refresh = async () => {
    try {
      const r = await api('/v1/admin/relay');
      head = r.head;
      relay.replaceChildren(h('dl.kv',
        h('dt', 'This process'), h('dd', badge(r.role)),
        h('dt', 'Log head'), h('dd', n(r.head)),
        h('dt', 'Published to'), h('dd', n(r.position)),
        h('dt', 'Lag'), h('dd', r.lag === null ? h('span.muted', 'known to the leader') : plural(r.lag, 'event')),
        h('dt', 'Published'), h('dd', `${n(r.published)} since start`)));
    } catch (error) { relay.replaceChildren(failure(error)); }
    try {
      const list = await api('/v1/admin/projections');
      if (!table) { table = projectionTable(refresh); projections.replaceChildren(table); }
      table.update(list.items, head);
    } catch (error) { table = null; projections.replaceChildren(failure(error)); }
  };
  await every(1000, refresh);
  loadLetters(letters);
}

// The read models' table, refreshed in place: a row per version keeps its elements (and its
// Rebuild button) from one refresh to the next, so a click never lands on a replaced button.
function projectionTable(refresh) {
  const body = h('tbody');
  const rows = new Map();
  const table = h('table', h('thead', h('tr', h('th', 'Read model'), h('th.num', 'Version'), h('th', 'Status'),
    h('th.num', 'Position'), h('th.num', 'Lag'), h('th.num', 'Events'), h('th', ''))), body);
  const rebuildButton = (name) => h('button.small', {
    onclick: async (event) => {
      event.target.disabled = true;
      try { await api(`/v1/admin/projections/${name}/rebuild`, { method: 'POST' }); } catch (error) { alert(error.message); }
      refresh();
    },
  }, 'Rebuild');
  table.update = (items, head) => {
    const seen = new Set();
    for (const p of items) {
      const key = `${p.name} ${p.version}`;
      seen.add(key);
      let row = rows.get(key);
      if (!row) {
        row = { cells: [h('td', h('b', p.name)), h('td.num', p.version), h('td'), h('td.num'), h('td.num'), h('td.num'), h('td')] };
        row.element = h('tr', row.cells);
        rows.set(key, row);
      }
      if (row.status !== p.status) {
        row.status = p.status;
        row.cells[2].replaceChildren(badge(p.status));
        row.cells[6].replaceChildren(p.status === 'building'
          ? h('div.progress', h('span')) : rebuildButton(p.name));
      }
      row.cells[3].textContent = n(p.position);
      row.cells[4].textContent = n(p.lag);
      row.cells[5].textContent = n(p.events);
      const bar = row.cells[6].querySelector('.progress');
      if (bar) {
        bar.title = `${n(p.position)} of ${n(head)}`;
        bar.firstChild.style.width = `${head ? Math.min(100, (100 * p.position) / head) : 0}%`;
      }
      body.append(row.element); // in the order the API lists them
    }
    for (const [key, row] of rows) {
      if (!seen.has(key)) { row.element.remove(); rows.delete(key); }
    }
  };
  return table;
}

async function loadLetters(box) {
  let page;
  try { page = await api('/v1/admin/dead-letters?limit=100'); } catch (error) { box.replaceChildren(failure(error)); return; }
  if (!page.dead_letters.length) { box.replaceChildren(h('div.empty', 'No dead letters: every consumer handled every message.')); return; }
  const act = (letter, how) => async (event) => {
    if (how === 'discard' && !confirm(`Discard dead letter ${letter.id} for good?`)) { return; }
    event.target.disabled = true;
    try {
      if (how === 'replay') { await api(`/v1/admin/dead-letters/${letter.id}/replay`, { method: 'POST' }); }
      else { await api(`/v1/admin/dead-letters/${letter.id}`, { method: 'DELETE' }); }
    } catch (error) { alert(error.message); }
    loadLetters(box);
  };
  box.replaceChildren(...present([h('table', h('thead', h('tr', h('th.num', '#'), h('th', 'Consumer'), h('th', 'Why'), h('th', 'Stored'), h('th', ''))),
    h('tbody', page.dead_letters.map((l) => h('tr',
      h('td.num', l.id), h('td', h('b', l.consumer), h('div.muted.mono', l.subject)),
      h('td', l.reason, h('details', h('summary', 'show'), json(l.events || l.body))),
      h('td', when(l.stored_at)),
      h('td', { style: { whiteSpace: 'nowrap' } }, h('button.small', { onclick: act(l, 'replay') }, 'Replay'), ' ',
        h('button.small.danger', { onclick: act(l, 'discard') }, 'Discard')))))),
  page.next_after ? h('p.muted', 'More letters follow; handle these first.') : null]));
}

function auditPanel(out) {
  const run = h('button.primary', {
    onclick: async () => {
      run.disabled = true;
      out.replaceChildren(h('p.muted', 'Replaying the whole log…'));
      try {
        const report = await api('/v1/admin/audit');
        out.replaceChildren(...present([
          h('div.notice.' + (report.ok ? 'ok' : 'bad'), report.ok ? 'Passed: ' : `${plural(report.violations.length + report.violations_omitted, 'violation')}: `,
            `${n(report.events_read)} events of ${n(report.streams_read)} streams replayed, checked ${when(report.checked_at)}.`),
          report.violations.length ? h('table', h('thead', h('tr', h('th', 'Kind'), h('th', 'Stream'), h('th', 'What'))),
            h('tbody', report.violations.map((v) => h('tr', h('td', badge(v.kind, 'bad')), h('td', streamLink(v.stream_id)), h('td', v.detail))))) : null,
        ]));
      } catch (error) { out.replaceChildren(failure(error)); }
      run.disabled = false;
    },
  }, 'Run audit');
  return h('div', h('p.muted', 'Replays the whole log, checks every invariant and compares the read models with a fresh fold.'), run, out);
}

// --- routing and sign-in ------------------------------------------------------------------------

function signIn(message) {
  const dialog = document.getElementById('sign-in');
  const error = document.getElementById('sign-in-error');
  error.hidden = !message; error.textContent = message || '';
  if (!dialog.open) { dialog.showModal(); }
}

// A token is kept only once an operator endpoint took it: the catalog answers customers too,
// so a customer's token must not get as far as an empty console.
async function signInWith(candidate) {
  const response = await fetch('/v1/admin/relay', { headers: { Authorization: `Bearer ${candidate}` } });
  if (!response.ok) {
    signOut(response.status === 401 || response.status === 403
      ? 'That token is not the operator token.' : `The gateway answered ${response.status}.`);
    return false;
  }
  sessionStorage.setItem(TOKEN_KEY, candidate);
  return true;
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  for (const stop of leave) { stop(); }
  leave = [];
  document.getElementById('sign-out').hidden = true;
  show(h('div.empty', 'Sign in with the operator token.'));
  signIn(message);
}

document.getElementById('sign-in-form').addEventListener('submit', async () => {
  if (await signInWith(document.getElementById('token').value.trim())) { route(); }
});
document.getElementById('sign-out').addEventListener('click', () => {
  location.hash = '#/campaigns';
  signOut();
});

function route() {
  for (const stop of leave) { stop(); }
  leave = [];
  let hash = location.hash.replace(/^#/, '');
  // `serve` prints a link carrying the token in the fragment, which never reaches a server:
  // keep it for this tab and take it out of the address bar and the history.
  const given = hash.match(/(?:^|[&?])token=([^&]+)/);
  if (given) {
    hash = hash.replace(/[&?]?token=[^&]+/, '') || '/campaigns';
    history.replaceState(null, '', '#' + hash);
    signInWith(decodeURIComponent(given[1])).then((ok) => { if (ok) { route(); } });
    return;
  }
  const [, page = 'campaigns', id = '', extra = ''] = hash.split('/').map(decodeURIComponent);
  for (const link of document.querySelectorAll('[data-nav]')) {
    link.classList.toggle('active', link.dataset.nav === page);
  }
  if (!token()) { signOut(); return; }
  document.getElementById('sign-out').hidden = false;
  if (page === 'campaigns' && id) { campaignPage(id); }
  else if (page === 'orders') { orderPage(id); }
  else if (page === 'streams') { streamPage(id, extra); }
  else if (page === 'operations') { operationsPage(); }
  else { campaignsPage(); }
}

window.addEventListener('hashchange', route);
fetch('/readyz').then((r) => r.json()).then((ready) => {
  document.getElementById('instance').textContent = `${ready.status === 'ready' ? 'ready' : 'not ready'} · roles ${ready.roles.join(', ')}`;
}).catch(() => {});
route();
