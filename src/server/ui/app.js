// The operator page of opsd: operations live in the browser.
//
// It talks to opsd's own REST surface only: the console API's operation
// infos (`GET /v1/{parent}/operations:info`, `GET /v1/{name}:info`), the
// standard cancel and delete, the polling report (`GET /v1/{name}:report`),
// and the live feed (`GET /v1/{parent}/operations:watch`, server-sent
// events, read with fetch so a bearer token can be sent). Operation data is
// always text: nothing from the server is ever parsed as HTML.
'use strict';

(() => {
  const PAGE_SIZE = 50;
  const $ = id => document.getElementById(id);
  const state = {
    parent: '-',
    filter: '',
    // Page tokens of the pages seen: [0] is the first page's ('').
    tokens: [''],
    page: 0,
    next: '',
    rows: new Map(), // name → { info, tr }
    selected: null,
    watch: null, // the AbortController of the live feed
  };

  const CODES = ['OK', 'CANCELLED', 'UNKNOWN', 'INVALID_ARGUMENT', 'DEADLINE_EXCEEDED', 'NOT_FOUND',
    'ALREADY_EXISTS', 'PERMISSION_DENIED', 'RESOURCE_EXHAUSTED', 'FAILED_PRECONDITION', 'ABORTED',
    'OUT_OF_RANGE', 'UNIMPLEMENTED', 'INTERNAL', 'UNAVAILABLE', 'DATA_LOSS', 'UNAUTHENTICATED'];

  // --- the server ---------------------------------------------------------

  const token = () => sessionStorage.getItem('opsd.token') || '';

  function headers(extra) {
    const h = Object.assign({}, extra);
    if (token()) h.Authorization = 'Bearer ' + token();
    return h;
  }

  /** A path of name segments, each percent-encoded. */
  const encodePath = path => path.split('/').map(encodeURIComponent).join('/');

  /** The REST path of a parent's collection: `-` (or nothing) is every
   * operation, `operations` the bare ones. */
  function collection(parent) {
    const p = parent.trim().replace(/^\/+|\/+$/g, '');
    if (p === 'operations') return '/v1/operations';
    const q = p.replace(/\/operations$/, '');
    return '/v1/' + encodePath(q === '' ? '-' : q) + '/operations';
  }

  class ApiError extends Error {
    constructor(http, body, text) {
      const e = (body && body.error) || {};
      super(`${e.status || http}: ${e.message || text || 'the server answered ' + http}`);
      this.http = http;
      this.status = e.status;
    }
  }

  async function api(method, path, body) {
    const init = { method, headers: headers(body === undefined ? {} : { 'Content-Type': 'application/json' }) };
    if (body !== undefined) init.body = body;
    const res = await fetch(path, init);
    const text = await res.text();
    let json = null;
    try { json = text ? JSON.parse(text) : {}; } catch (_) { json = null; }
    if (!res.ok) throw new ApiError(res.status, json, text);
    return json;
  }

  // --- what a row shows ----------------------------------------------------

  function stateOf(info) {
    const op = info.operation || {};
    if (!op.done) return info.cancelRequested ? ['cancelling', 'cancelling'] : ['running', 'running'];
    if (op.error) {
      if (op.error.code === 1) return ['cancelled', 'cancelled'];
      return ['failed', 'failed (' + (CODES[op.error.code] || op.error.code) + ')'];
    }
    return ['succeeded', 'succeeded'];
  }

  /** `progressPercent` (or `progress_percent`) of the metadata, or its string. */
  function progressOf(metadata) {
    if (!metadata || typeof metadata !== 'object') return null;
    for (const fields of [metadata, metadata.value]) {
      if (!fields || typeof fields !== 'object') continue;
      for (const key of ['progressPercent', 'progress_percent']) {
        const n = Number(fields[key]);
        if (fields[key] !== undefined && Number.isFinite(n)) return { percent: Math.max(0, Math.min(100, n)), text: n + '%' };
      }
    }
    if (metadata['@type'] === 'type.googleapis.com/google.protobuf.StringValue' && typeof metadata.value === 'string') {
      const m = /^(\d+(?:\.\d+)?)\s*%$/.exec(metadata.value.trim());
      return { percent: m ? Math.min(100, Number(m[1])) : null, text: metadata.value };
    }
    return null;
  }

  function age(createTime) {
    const t = Date.parse(createTime);
    if (!Number.isFinite(t)) return '-';
    const s = Math.max(0, Math.floor((Date.now() - t) / 1000));
    if (s < 120) return s + 's';
    if (s < 7200) return Math.floor(s / 60) + 'm';
    if (s < 172800) return Math.floor(s / 3600) + 'h';
    return Math.floor(s / 86400) + 'd';
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') node.className = v; else node.setAttribute(k, v);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function progressCell(metadata) {
    const p = progressOf(metadata);
    if (!p) return el('span', { class: 'muted' }, '-');
    if (p.percent === null) return el('span', {}, p.text);
    const fill = el('div', { class: 'fill' });
    fill.style.width = p.percent + '%';
    return el('div', { class: 'progress' }, el('div', { class: 'track' }, fill), el('span', {}, p.text));
  }

  function renderRow(info, flash) {
    const op = info.operation || {};
    let row = state.rows.get(op.name);
    const tr = row ? row.tr : el('tr');
    const [kind, label] = stateOf(info);
    tr.replaceChildren(
      el('td', { class: 'name' }, op.name),
      el('td', {}, el('span', { class: 'state ' + kind }, label)),
      el('td', { class: 'age' }, age(info.createTime)),
      el('td', {}, progressCell(op.metadata)),
    );
    tr.dataset.name = op.name;
    tr.dataset.state = kind;
    tr.classList.remove('gone');
    if (flash) {
      tr.classList.remove('flash');
      void tr.offsetWidth; // restarts the animation
      tr.classList.add('flash');
    }
    state.rows.set(op.name, { info, tr });
    return tr;
  }

  // --- the list ------------------------------------------------------------

  function showMessage(text) {
    const m = $('message');
    m.textContent = text || '';
    m.hidden = !text;
  }

  async function load() {
    const params = new URLSearchParams({ pageSize: String(PAGE_SIZE) });
    if (state.filter) params.set('filter', state.filter);
    const pageToken = state.tokens[state.page];
    if (pageToken) params.set('pageToken', pageToken);
    let page;
    try {
      page = await api('GET', collection(state.parent) + ':info?' + params);
    } catch (err) {
      showMessage(err.message + (err.status === 'UNAUTHENTICATED' ? ' — paste a token under “Token”.' : ''));
      state.rows.clear();
      $('rows').replaceChildren();
      $('summary').textContent = '';
      return false;
    }
    showMessage('');
    state.rows.clear();
    const infos = page.operations || [];
    $('rows').replaceChildren(...infos.map(info => renderRow(info, false)));
    state.next = page.nextPageToken || '';
    $('empty').hidden = infos.length > 0;
    $('prev').disabled = state.page === 0;
    $('next').disabled = !state.next;
    $('summary').textContent = `${infos.length} operation${infos.length === 1 ? '' : 's'}, page ${state.page + 1}`;
    return true;
  }

  /** Whether a new operation belongs on the page shown. */
  function belongsHere(name) {
    const names = [...state.rows.keys()];
    if (names.length === 0) return state.page === 0;
    const first = names[0];
    const last = names[names.length - 1];
    if (state.page > 0 && name < first) return false;
    return !state.next || name < last;
  }

  function insertSorted(tr, name) {
    const rows = $('rows');
    const after = [...rows.children].find(r => r.dataset.name > name);
    rows.insertBefore(tr, after || null);
    $('empty').hidden = true;
  }

  async function changed(name) {
    let info;
    try {
      info = await api('GET', '/v1/' + encodePath(name) + ':info');
    } catch (err) {
      if (err.http === 404) return gone(name);
      return;
    }
    const present = state.rows.has(name);
    if (!present && !belongsHere(name)) return;
    const tr = renderRow(info, true);
    if (!present) insertSorted(tr, name);
    if (state.selected === name) renderDetail(info);
  }

  function gone(name) {
    const row = state.rows.get(name);
    if (row) {
      row.tr.classList.add('gone');
      row.tr.dataset.state = 'deleted';
    }
  }

  // --- the live feed -------------------------------------------------------

  function setLive(on) {
    const live = $('live');
    live.className = 'live ' + (on ? 'on' : 'off');
    live.dataset.live = on ? 'on' : 'off';
  }

  async function follow() {
    if (state.watch) state.watch.abort();
    const controller = new AbortController();
    state.watch = controller;
    const params = new URLSearchParams();
    if (state.filter) params.set('filter', state.filter);
    let delay = 500;
    while (!controller.signal.aborted) {
      try {
        const res = await fetch(collection(state.parent) + ':watch?' + params, {
          headers: headers({ Accept: 'text/event-stream' }),
          signal: controller.signal,
        });
        if (!res.ok) throw new Error('the feed answered ' + res.status);
        setLive(true);
        delay = 500;
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            event(block);
          }
        }
      } catch (err) {
        if (controller.signal.aborted) return;
      }
      setLive(false);
      await new Promise(resolve => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 10000);
      // Catch up on what the feed missed while it was down.
      if (!controller.signal.aborted) await load();
    }
  }

  function event(block) {
    let kind = 'message';
    let data = '';
    for (const line of block.split('\n')) {
      if (line.startsWith('event: ')) kind = line.slice(7);
      else if (line.startsWith('data: ')) data += line.slice(6);
    }
    if (!data) return; // a keep-alive comment
    let value;
    try { value = JSON.parse(data); } catch (_) { return; }
    if (kind === 'deleted') gone(value.name);
    else if (kind === 'message' && value.name) changed(value.name);
  }

  // --- the detail ------------------------------------------------------------

  function renderDetail(info) {
    const op = info.operation || {};
    $('detail').hidden = false;
    $('detail-name').textContent = op.name;
    const facts = [
      ['State', stateOf(info)[1]],
      ['Created', info.createTime],
      ['Updated', info.updateTime],
      ['Done', info.doneTime],
      ['Deleted by retention', info.expireTime],
      ['Cancel policy', info.cancelPolicy],
      ['Lease until', info.leaseDeadline],
      ['Scripted', info.scripted ? 'yes' : 'no'],
    ].filter(([, v]) => v !== undefined && v !== '');
    $('facts').replaceChildren(...facts.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, String(v))]));
    $('metadata').textContent = op.metadata ? JSON.stringify(op.metadata, null, 2) : '(none)';
    $('result-title').textContent = op.error ? 'Error' : 'Response';
    $('result').textContent = op.error ? JSON.stringify(op.error, null, 2)
      : op.response ? JSON.stringify(op.response, null, 2) : '(still running)';
    $('cancel').disabled = !!op.done;
  }

  async function select(name) {
    state.selected = name;
    $('answer').hidden = true;
    try {
      renderDetail(await api('GET', '/v1/' + encodePath(name) + ':info'));
    } catch (err) {
      showMessage(err.message);
      return;
    }
    await loadReport(name);
  }

  async function loadReport(name) {
    const tbody = $('report').querySelector('tbody');
    let report;
    try {
      report = await api('GET', '/v1/' + encodePath(name) + ':report');
    } catch (err) {
      tbody.replaceChildren();
      $('report-summary').textContent = err.message;
      return;
    }
    const calls = report.calls || [];
    const counts = Object.entries(report.counts || {}).map(([m, n]) => `${m} ×${n}`).join(', ');
    $('report-summary').textContent = calls.length
      ? `${calls.length} call${calls.length === 1 ? '' : 's'} recorded: ${counts}`
      : 'No calls recorded (reports are kept for scripted operations, or all with --polling-reports all).';
    tbody.replaceChildren(...calls.slice(-100).reverse().map(c =>
      el('tr', {}, el('td', {}, c.time || ''), el('td', {}, c.method || ''), el('td', {}, c.transport || ''))));
  }

  function answer(text, ok) {
    const a = $('answer');
    a.textContent = text;
    a.className = ok ? 'ok' : '';
    a.hidden = false;
  }

  async function act(verb) {
    const name = state.selected;
    if (!name) return;
    const what = verb === 'cancel' ? 'Cancel' : 'Delete';
    if (!window.confirm(`${what} ${name}?`)) return;
    try {
      const body = verb === 'cancel'
        ? await api('POST', '/v1/' + encodePath(name) + ':cancel', '{}')
        : await api('DELETE', '/v1/' + encodePath(name));
      answer(`${what}: 200 ${JSON.stringify(body)}`, true);
    } catch (err) {
      answer(`${what}: ${err.message}`, false);
      return;
    }
    if (verb === 'delete') gone(name); else await changed(name);
  }

  // --- wiring ------------------------------------------------------------------

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    state.parent = params.get('parent') || '-';
    state.filter = params.get('filter') || '';
    $('parent').value = state.parent === '-' ? '' : state.parent;
    $('filter').value = state.filter;
  }

  async function restart() {
    state.tokens = [''];
    state.page = 0;
    if (await load()) follow(); else if (state.watch) { state.watch.abort(); setLive(false); }
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('token').value = token();
    $('token').addEventListener('change', () => {
      sessionStorage.setItem('opsd.token', $('token').value.trim());
      restart();
    });
    $('token-clear').addEventListener('click', () => {
      sessionStorage.removeItem('opsd.token');
      $('token').value = '';
      restart();
    });
    $('query').addEventListener('submit', e => {
      e.preventDefault();
      const params = new URLSearchParams();
      if ($('parent').value.trim()) params.set('parent', $('parent').value.trim());
      if ($('filter').value.trim()) params.set('filter', $('filter').value.trim());
      history.replaceState(null, '', '#' + params);
      readHash();
      restart();
    });
    $('next').addEventListener('click', () => {
      if (!state.next) return;
      state.tokens[state.page + 1] = state.next;
      state.page += 1;
      load();
    });
    $('prev').addEventListener('click', () => {
      if (state.page === 0) return;
      state.page -= 1;
      load();
    });
    $('rows').addEventListener('click', e => {
      const tr = e.target.closest('tr');
      if (tr && tr.dataset.name) select(tr.dataset.name);
    });
    $('cancel').addEventListener('click', () => act('cancel'));
    $('delete').addEventListener('click', () => act('delete'));
    $('close').addEventListener('click', () => { $('detail').hidden = true; state.selected = null; });
    setInterval(() => {
      for (const { info, tr } of state.rows.values()) {
        const cell = tr.querySelector('td.age');
        if (cell) cell.textContent = age(info.createTime);
      }
    }, 1000);
    readHash();
    restart();
  });
})();
