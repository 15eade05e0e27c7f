// The sandwarden web console: a plain single-page app over the public API (docs/api.md).
//
// No framework and no build step: the page is built with DOM calls (text always goes in as
// text, never as HTML, so nothing a session holds can run as script), routes live in the URL's
// hash (#/sessions, #/session/ID, #/admin), and every request carries the API key the person
// signed in with. The key lives in this tab's sessionStorage only: never in a URL, never logged.
'use strict';

const KEY_SLOT = 'sandwarden.key';
const STATUSES = ['creating', 'ready', 'running', 'input_required', 'failed', 'dead', 'deleted'];
/** Statuses in which a session's agent is working on a turn (Cancel makes sense). */
const BUSY = new Set(['running', 'input_required']);
const HISTORY_PAGE = 100;

const state = {
  key: null,
  admin: false,
  templates: [],
  /** Aborts the app-wide sessions watch (GET /v1/events). */
  watchAbort: null,
  /** Functions told about each watch event: (type, session or null). */
  watchers: new Set(),
  /** Undo work of the page being left: streams, sockets, listeners. */
  leaving: [],
};

// ---------------------------------------------------------------------------------------------
// DOM helpers

const $ = (selector, root = document) => root.querySelector(selector);

/**
 * An element: `props` sets `text`, `class`, properties that are event handlers (`onclick` and
 * the like, added as listeners: inline handlers are barred by the CSP) and attributes.
 */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'text') node.textContent = value;
    else if (name === 'class') node.className = value;
    else if (name.startsWith('on') && typeof value === 'function') {
      node.addEventListener(name.slice(2), value);
    } else if (name === 'value') node.value = value;
    else node.setAttribute(name, value === true ? '' : value);
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : '—';
}

function fmtNum(n) {
  return typeof n === 'number' ? n.toLocaleString() : '—';
}

function fmtSeconds(s) {
  return typeof s === 'number' ? `${s.toFixed(s < 10 ? 2 : 0)} s` : '—';
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Shows `message` in `node` (a `p.error`), or hides it when `message` is empty. */
function showError(node, message) {
  node.textContent = message || '';
  node.hidden = !message;
}

/** A problem's `detail` (what to fix), else whatever the error says. */
function errorText(e) {
  return e instanceof ApiError ? e.message : `request failed: ${e.message || e}`;
}

// ---------------------------------------------------------------------------------------------
// The API

/** A non-2xx answer, carrying the problem document (`detail` is its message). */
class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.type = problem.type;
    this.problem = problem;
  }
}

/** Sends a request with the key; the Response when it is 2xx, else throws an ApiError. */
async function request(method, path, body, { signal } = {}) {
  const headers = { Authorization: `Bearer ${state.key}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: 'no-store',
  });
  if (response.ok) return response;
  let problem = {};
  try {
    problem = await response.json();
  } catch {
    // Not a problem document (a proxy's page, say): the status says enough.
  }
  const error = new ApiError(response.status, problem);
  // The key was revoked while signed in: nothing else will work, so say so at the sign-in form.
  if (response.status === 401 && state.key) {
    signOut('The server refused this key (it may have been revoked); sign in again.');
  }
  throw error;
}

/** A JSON request: the parsed answer. */
async function api(method, path, body, options) {
  const response = await request(method, path, body, options);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

const sessionPath = (id, rest = '') => `/v1/sessions/${encodeURIComponent(id)}${rest}`;

/**
 * Reads a text/event-stream body, calling `onEvent(type, data)` for each event. The browser's
 * EventSource cannot send the Authorization header, hence this reader over fetch(). Event ids
 * are not tracked: every event's data carries its `seq`, which is what a resume needs.
 * Resolves when the stream ends; rejects (AbortError) when its request is aborted.
 */
async function readSse(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let type = '';
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, '');
      buffer = buffer.slice(end + 1);
      if (line === '') {
        if (data.length) onEvent(type || 'message', data.join('\n'));
        type = '';
        data = [];
      } else if (!line.startsWith(':')) { // a ':' line is a comment (the heartbeat)
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'event') type = text;
        else if (field === 'data') data.push(text);
      }
    }
  }
}

/**
 * Keeps an event stream open while `signal` is not aborted: `open()` makes the request, each
 * event goes to `onEvent`, and a stream that ends or fails is opened again after a pause that
 * grows while it keeps failing. `onState` hears 'live' or 'retrying'.
 */
async function followStream(open, onEvent, signal, onState = () => {}) {
  let pause = 1000;
  while (!signal.aborted) {
    try {
      const response = await open();
      onState('live');
      pause = 1000;
      await readSse(response, onEvent);
    } catch (e) {
      if (signal.aborted || (e instanceof ApiError && e.status === 401)) return;
    }
    onState('retrying');
    await sleep(pause);
    pause = Math.min(pause * 2, 30000);
  }
}

// ---------------------------------------------------------------------------------------------
// Signing in and out

/** Checks `key` (GET /v1/templates) and, when it is taken, enters the console with it. */
async function signIn(key) {
  const response = await fetch('/v1/templates', {
    headers: { Authorization: `Bearer ${key}` },
    cache: 'no-store',
  });
  if (response.status === 401) throw new Error('That key was refused.');
  if (!response.ok) throw new Error(`The server answered ${response.status}; try again.`);
  state.templates = (await response.json()).templates;
  // Only the admin key may list keys: a 200 here is how the console knows it has one.
  const keys = await fetch('/v1/api-keys', { headers: { Authorization: `Bearer ${key}` } });
  state.key = key;
  state.admin = keys.ok;
  sessionStorage.setItem(KEY_SLOT, key);
  $('#signin').hidden = true;
  $('#topbar').hidden = false;
  $('#nav-admin').hidden = !state.admin;
  $('#whoami').textContent = state.admin ? 'admin key' : 'tenant key';
  startWatch();
  if (!location.hash || location.hash === '#') location.hash = '#/sessions';
  else route();
}

function signOut(message) {
  leavePage();
  state.watchAbort?.abort();
  state.watchAbort = null;
  state.key = null;
  state.admin = false;
  sessionStorage.removeItem(KEY_SLOT);
  $('#topbar').hidden = true;
  $('#view').replaceChildren();
  showError($('#notice'), '');
  $('#signin').hidden = false;
  const input = $('#key-input');
  input.value = '';
  showError($('#signin-error'), message);
  input.focus();
}

function setUpSignIn() {
  const form = $('#signin-form');
  const button = $('#signin-submit');
  form.addEventListener('submit', async (event) => {
    event.preventDefault(); // the CSP forbids form posts anyway: the key never goes in a URL
    const key = $('#key-input').value.trim();
    if (!key) return;
    button.disabled = true;
    showError($('#signin-error'), '');
    try {
      await signIn(key);
      $('#key-input').value = '';
    } catch (e) {
      showError($('#signin-error'), e.message);
    } finally {
      button.disabled = false;
    }
  });
  $('#signout').addEventListener('click', () => signOut(''));
  button.disabled = false;
}

// ---------------------------------------------------------------------------------------------
// The sessions watch: one stream for the whole console (GET /v1/events), told to the pages that
// listen (the session list and the session page), so statuses change as they happen.

function startWatch() {
  const abort = new AbortController();
  state.watchAbort = abort;
  const badge = $('#live');
  followStream(
    () => request('GET', '/v1/events', undefined, { signal: abort.signal }),
    (type, data) => {
      const session = type === 'session' ? JSON.parse(data) : null;
      for (const listener of state.watchers) listener(type, session);
    },
    abort.signal,
    (s) => { badge.dataset.state = s; },
  );
}

/** Listens to the watch while the current page is shown. */
function watchWhileHere(listener) {
  state.watchers.add(listener);
  state.leaving.push(() => state.watchers.delete(listener));
}

/** Whether `fresh` is at least as new as `old` (a watch event may arrive after a newer list). */
const isNewer = (fresh, old) => !old || fresh.updated_at >= old.updated_at;

// ---------------------------------------------------------------------------------------------
// Routing

function leavePage() {
  for (const undo of state.leaving.splice(0)) undo();
}

function route() {
  leavePage();
  showError($('#notice'), '');
  if (!state.key) return;
  const hash = location.hash;
  const view = $('#view');
  let match;
  let page;
  // A session's id or name is letters, digits, `-`, `_` and `.` (never a dot segment, which
  // the browser would resolve into another route of the API).
  if ((match = hash.match(/^#\/session\/([A-Za-z0-9_.-]+)$/)) && !/^\.+$/.test(match[1])) {
    page = sessionPage(match[1]);
  }
  else if (hash === '#/admin' && state.admin) page = adminPage();
  else if ((match = hash.match(/^#\/sessions(?:\?(.*))?$/))) page = sessionsPage(new URLSearchParams(match[1] || ''));
  else {
    location.hash = '#/sessions';
    return;
  }
  for (const link of document.querySelectorAll('#topbar nav a')) {
    link.classList.toggle('current', hash.startsWith(link.getAttribute('href')));
  }
  // Each page builds its own root and updates only nodes under it, so an answer that comes
  // back after the page was left changes nothing on screen.
  view.replaceChildren(page);
}

// ---------------------------------------------------------------------------------------------
// The session list

function statusBadge(status) {
  return el('span', { class: `status status-${status}`, 'data-test': 'status', text: status });
}

function templateOptions(selected, { any } = {}) {
  return [
    any ? el('option', { value: '', text: any }) : null,
    state.templates.map((t) =>
      el('option', { value: t.name, text: `${t.name} (${t.kind})`, selected: t.name === selected })),
  ];
}

function sessionsPage(params) {
  const filter = { status: params.get('status') || '', harness: params.get('template') || '' };
  const rows = new Map(); // id → { row, session }
  const tbody = el('tbody');
  const more = el('button', { id: 'sessions-more', type: 'button', text: 'Load more', hidden: true });
  const error = el('p', { id: 'sessions-error', class: 'error', hidden: true });
  const empty = el('p', { class: 'muted', text: 'No sessions here yet.', hidden: true });
  let nextCursor = null;

  function row(session) {
    const del = el('button', {
      type: 'button', class: 'danger', 'data-test': 'delete', text: 'Delete',
      hidden: session.status === 'deleted',
      onclick: () => deleteSession(session.id, (s) => upsert(s)),
    });
    return el('tr', { 'data-session-id': session.id },
      el('td', {}, el('a', { href: `#/session/${encodeURIComponent(session.id)}`, 'data-test': 'open' },
        session.title || session.name || session.id)),
      el('td', { 'data-test': 'template', text: session.harness }),
      el('td', { text: session.kind }),
      el('td', {}, statusBadge(session.status)),
      el('td', { text: fmtTime(session.created_at) }),
      el('td', {}, del));
  }

  const matches = (s) => (!filter.status || s.status === filter.status)
    && (!filter.harness || s.harness === filter.harness);

  /** A session's new state: its row redrawn, or a new row when the list is read to its end. */
  function upsert(session) {
    const known = rows.get(session.id);
    if (known) {
      if (!isNewer(session, known.session)) return;
      const fresh = row(session);
      known.row.replaceWith(fresh);
      rows.set(session.id, { row: fresh, session });
    } else if (matches(session)) {
      // The list is newest first: a session not listed yet is a new one, at the top.
      const fresh = row(session);
      tbody.prepend(fresh);
      rows.set(session.id, { row: fresh, session });
      empty.hidden = true;
    }
  }

  async function load(cursor) {
    const query = new URLSearchParams({ limit: '50', order: 'newest' });
    if (filter.status) query.set('status', filter.status);
    if (filter.harness) query.set('harness', filter.harness);
    if (cursor) query.set('cursor', cursor);
    try {
      const page = await api('GET', `/v1/sessions?${query}`);
      if (!cursor) {
        tbody.replaceChildren();
        rows.clear();
      }
      nextCursor = page.next_cursor;
      for (const s of page.sessions) {
        const r = row(s);
        tbody.append(r);
        rows.set(s.id, { row: r, session: s });
      }
      more.hidden = !nextCursor;
      empty.hidden = rows.size > 0;
      showError(error, '');
    } catch (e) {
      showError(error, errorText(e));
    }
  }
  more.addEventListener('click', async () => {
    more.disabled = true; // one page at a time: a second click would read the same page again
    await load(nextCursor);
    more.disabled = false;
  });

  watchWhileHere((type, session) => {
    if (type === 'session') upsert(session);
    else load(null); // `watching` (re)connected or `resync`: changes may have been missed
  });

  const setFilter = (name, value) => {
    if (value) params.set(name, value);
    else params.delete(name);
    location.hash = `#/sessions${params.toString() ? `?${params}` : ''}`;
  };

  load(null);
  return el('section', { id: 'sessions-page' },
    el('h1', { text: 'Sessions' }),
    createForm(),
    el('div', { class: 'filters' },
      el('span', { class: 'muted', text: 'Show' }),
      el('label', { text: 'status ' },
        el('select', { id: 'filter-status', onchange: (e) => setFilter('status', e.target.value) },
          el('option', { value: '', text: 'any' }),
          STATUSES.map((s) => el('option', { value: s, text: s, selected: s === filter.status })))),
      el('label', { text: 'template ' },
        el('select', { id: 'filter-template', onchange: (e) => setFilter('template', e.target.value) },
          templateOptions(filter.harness, { any: 'any' })))),
    error,
    el('table', { id: 'sessions-table' },
      el('thead', {}, el('tr', {}, ['Session', 'Template', 'Kind', 'Status', 'Created', ''].map((h) => el('th', { text: h })))),
      tbody),
    empty,
    more);
}

/** The "new session" form: a template picker and an optional title. */
function createForm() {
  const picker = el('select', { id: 'create-template', required: true }, templateOptions('echo'));
  const title = el('input', { id: 'create-title', placeholder: 'title (optional)', maxlength: '200' });
  const button = el('button', { id: 'create-submit', type: 'submit', text: 'Create session' });
  const error = el('p', { id: 'create-error', class: 'error', hidden: true });
  const form = el('form', { id: 'create-form', class: 'row' },
    el('label', { text: 'New session from ' }, picker), title, button, error);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    button.disabled = true;
    const body = { harness: picker.value };
    if (title.value.trim()) body.title = title.value.trim();
    try {
      const session = await api('POST', '/v1/sessions', body);
      location.hash = `#/session/${encodeURIComponent(session.id)}`;
    } catch (e) {
      showError(error, errorText(e));
      button.disabled = false;
    }
  });
  return form;
}

/** Asks, then deletes a session; `done(session)` gets it as deleted. */
async function deleteSession(id, done, tenant) {
  if (!window.confirm(`Delete session ${id}? Its sandbox is stopped; its history stays readable.`)) return;
  const query = tenant ? `?tenant=${encodeURIComponent(tenant)}` : '';
  try {
    done(await api('DELETE', sessionPath(id, query)));
  } catch (e) {
    showError($('#notice'), errorText(e));
  }
}

// ---------------------------------------------------------------------------------------------
// A session's page: metadata, usage, then its chat (api) or its terminal (tui)

function sessionPage(id) {
  const root = el('section', { id: 'session-page', 'data-session-id': id },
    el('p', {}, el('a', { href: '#/sessions', text: '← Sessions' })),
    el('p', { class: 'muted', text: 'Loading…' }));
  api('GET', sessionPath(id))
    .then((session) => root.replaceChildren(...sessionParts(session)))
    .catch((e) => root.replaceChildren(el('p', { class: 'error', text: errorText(e) })));
  return root;
}

function sessionParts(session) {
  const fields = [
    ['id', 'Id'], ['harness', 'Template'], ['kind', 'Kind'], ['status', 'Status'],
    ['isolation', 'Isolation'], ['created_at', 'Created'], ['failure_reason', 'Failure'],
  ];
  const meta = el('dl', { id: 'session-meta' });
  // Usage is counted per turn: a terminal session has none.
  const usage = session.kind === 'api' ? usageBox(session.id) : null;
  const del = el('button', { id: 'session-delete', type: 'button', class: 'danger', text: 'Delete session' });
  const body = session.kind === 'tui' ? terminalPanel(session) : chatPanel(session);

  function show(s) {
    meta.replaceChildren();
    for (const [field, label] of fields) {
      const value = s[field];
      if (field === 'failure_reason' && !value) continue;
      const shown = field === 'status' ? statusBadge(value)
        : field === 'created_at' ? fmtTime(value) : (value ?? '—');
      meta.append(el('dt', { text: label }), el('dd', { 'data-field': field }, shown));
    }
    del.hidden = s.status === 'deleted';
    body.sessionChanged(s);
  }

  let current = session;
  watchWhileHere((type, s) => {
    if (type === 'session' && s.id === session.id && isNewer(s, current)) show((current = s));
    // After a reconnect, read it again: a change may have been missed.
    else if (type !== 'session') api('GET', sessionPath(session.id)).then((s) => show((current = s))).catch(() => {});
  });
  del.addEventListener('click', () => deleteSession(session.id, (s) => show((current = s))));
  body.onTurnEnd = () => usage?.refresh();
  show(session);

  return [
    el('p', {}, el('a', { href: '#/sessions', text: '← Sessions' })),
    el('h1', { text: session.title || session.name || session.id }),
    el('div', { class: 'session-head' }, meta, el('div', {}, usage?.node, del)),
    body.node,
  ];
}

/** The session's usage, summed over its turns (GET /v1/sessions/{id}/turns, every page). */
function usageBox(id) {
  const node = el('dl', { id: 'session-usage' });
  async function refresh() {
    const sum = { turns: 0, input: 0, output: 0, seconds: 0 };
    let cursor = null;
    try {
      do {
        const query = new URLSearchParams({ limit: '500' });
        if (cursor) query.set('cursor', cursor);
        const page = await api('GET', sessionPath(id, `/turns?${query}`));
        for (const t of page.turns) {
          sum.turns += 1;
          sum.input += t.usage?.input_tokens || 0;
          sum.output += t.usage?.output_tokens || 0;
          if (t.finished_at) sum.seconds += (Date.parse(t.finished_at) - Date.parse(t.created_at)) / 1000;
        }
        cursor = page.next_cursor;
      } while (cursor);
    } catch (e) {
      node.replaceChildren(el('dt', { text: 'Usage' }), el('dd', { class: 'error', text: errorText(e) }));
      return;
    }
    node.replaceChildren(
      el('dt', { text: 'Turns' }), el('dd', { 'data-field': 'turns', text: fmtNum(sum.turns) }),
      el('dt', { text: 'Input tokens' }), el('dd', { 'data-field': 'input_tokens', text: fmtNum(sum.input) }),
      el('dt', { text: 'Output tokens' }), el('dd', { 'data-field': 'output_tokens', text: fmtNum(sum.output) }),
      el('dt', { text: 'Turn time' }), el('dd', { 'data-field': 'turn_seconds', text: fmtSeconds(sum.seconds) }));
  }
  refresh();
  return { node, refresh };
}

// ---------------------------------------------------------------------------------------------
// Chat with an API session

/** A message part of the history or of a message being sent, drawn. */
function partView(part) {
  switch (part.type) {
    case 'text':
      return el('div', { class: 'text-seg', text: part.text });
    case 'reasoning':
      return el('details', { class: 'reasoning' }, el('summary', { text: 'Reasoning' }), el('pre', { text: part.text }));
    case 'image':
      return part.data
        ? el('img', { class: 'thumb', alt: 'image', src: `data:${part.mime_type || 'image/png'};base64,${part.data}` })
        : el('span', { class: 'chip', text: `image ${part.url || ''}` });
    case 'file':
      return el('span', { class: 'chip', text: `file ${part.name || part.url || ''}` });
    case 'tool_use':
      return toolCard({ title: part.name, input: part.input, status: part.status });
    case 'tool_result':
      return el('div', { class: 'card tool-result' },
        el('div', { class: 'card-head', text: `result · ${part.status || ''}` }),
        el('pre', { text: stringify(part.output) }));
    default:
      return el('pre', { class: 'card', text: stringify(part) });
  }
}

function stringify(value) {
  if (value === undefined || value === null) return '';
  return typeof value === 'string' ? value : JSON.stringify(value, null, 2);
}

function toolCard({ id, title, kind, status, input }) {
  return el('div', { class: 'card tool', 'data-tool-id': id },
    el('div', { class: 'card-head' },
      el('strong', { text: title || 'tool call' }),
      kind ? ` · ${kind}` : '',
      el('span', { class: 'tool-status', 'data-test': 'tool-status', text: status ? ` · ${status}` : '' })),
    input === undefined || input === null ? null
      : el('details', {}, el('summary', { text: 'input' }), el('pre', { text: stringify(input) })),
    el('pre', { class: 'tool-output', hidden: true }));
}

function messageView(message) {
  const parts = message.parts?.length ? message.parts : [{ type: 'text', text: message.text }];
  return el('div', { class: `msg ${message.role}`, 'data-message-id': message.id, 'data-turn-id': message.turn_id },
    el('div', { class: 'who', text: message.role }),
    parts.map(partView));
}

function chatPanel(session) {
  const id = session.id;
  const history = el('div', { id: 'history' });
  const older = el('button', { id: 'history-older', type: 'button', text: 'Load older', hidden: true });
  const turns = new Map(); // turn id → the turn's view (see turnView)
  const panel = { node: null, sessionChanged: () => {}, onTurnEnd: () => {} };
  let status = session.status;
  let sending = false; // our own message's stream is open

  // The composer.
  const input = el('textarea', { id: 'message-input', rows: '3', placeholder: 'Message (Ctrl+Enter sends)' });
  const files = el('input', { id: 'attach-input', type: 'file', multiple: true });
  const attached = el('ul', { id: 'attachments' });
  const unattach = el('button', { id: 'attach-clear', type: 'button', class: 'danger', text: 'Remove attachments', hidden: true });
  const send = el('button', { id: 'send', type: 'submit', text: 'Send' });
  const cancel = el('button', { id: 'cancel', type: 'button', class: 'danger', text: 'Cancel turn', hidden: true });
  const error = el('p', { id: 'chat-error', class: 'error', role: 'alert', hidden: true });
  const options = el('span', { id: 'chat-options', class: 'row' });
  const choices = choiceFields(id, options);
  const form = el('form', { id: 'composer' }, input,
    el('div', { class: 'row' }, options, el('label', { text: 'Attach ' }, files), send, cancel),
    el('div', { class: 'row' }, attached, unattach), error);

  let pending = []; // parts read from the chosen files
  files.addEventListener('change', async () => {
    const chosen = [...files.files];
    pending = await Promise.all(chosen.map(filePart));
    attached.replaceChildren(...chosen.map((f, i) => el('li', { text: `${pending[i].type}: ${f.name} (${pending[i].mime_type})` })));
    unattach.hidden = !pending.length;
  });
  const clearAttachments = () => {
    files.value = '';
    pending = [];
    attached.replaceChildren();
    unattach.hidden = true;
  };
  unattach.addEventListener('click', clearAttachments);
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) form.requestSubmit();
  });

  function busy() {
    send.disabled = sending;
    cancel.hidden = !(sending || BUSY.has(status));
  }

  panel.sessionChanged = (s) => {
    // The agent's options are known once its sandbox is ready.
    if (status === 'creating' && s.status !== 'creating') choices.refresh();
    status = s.status;
    const usable = !['failed', 'dead', 'deleted'].includes(status);
    input.disabled = !usable;
    if (!usable) showError(error, `This session is ${status}${s.failure_reason ? `: ${s.failure_reason}` : ''}.`);
    busy();
  };

  // ---- Turns as they happen: every event, from our own message's stream or the session's
  // tail stream, goes through `applyEvent`. Each stream is gap-free and in order, so an event at
  // or below the turn's last seq is one the other stream already delivered.

  /** The view of one turn: its user message (ours), then the agent's answer as it streams. */
  function turnView(turnId) {
    let view = turns.get(turnId);
    if (view) return view;
    const assistant = el('div', { class: 'msg assistant' }, el('div', { class: 'who', text: 'assistant' }));
    const statusLine = el('div', { class: 'turn-status', 'data-test': 'turn-status', 'data-status': 'running', text: 'running…' });
    const node = el('div', { class: 'turn', 'data-turn-id': turnId }, assistant, statusLine);
    view = { node, assistant, statusLine, lastSeq: 0, segment: null, tools: new Map(), inputs: [] };
    turns.set(turnId, view);
    history.append(node);
    return view;
  }

  /** The text or reasoning run being streamed into, or a new one after anything else. */
  function segment(view, kind) {
    if (view.segment?.kind !== kind) {
      const target = kind === 'text' ? el('div', { class: 'text-seg' }) : el('pre');
      const node = kind === 'text' ? target
        : el('details', { class: 'reasoning' }, el('summary', { text: 'Reasoning' }), target);
      view.assistant.append(node);
      view.segment = { kind, target };
    }
    return view.segment.target;
  }

  /** Applies an event, keeping the newest output in view for someone reading along. */
  function applyEvent(ev) {
    const following = window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
    drawEvent(ev);
    if (following) window.scrollTo(0, document.body.scrollHeight);
  }

  function drawEvent(ev) {
    if (!ev.turn_id) {
      if (ev.type === 'session_dead') {
        history.append(el('p', { class: 'error', text: `The session ended: ${ev.data.reason || 'its agent is gone'}` }));
      }
      return;
    }
    const view = turnView(ev.turn_id);
    if (ev.seq <= view.lastSeq) return;
    view.lastSeq = ev.seq;
    const d = ev.data || {};
    switch (ev.type) {
      case 'text':
        segment(view, 'text').append(d.text);
        break;
      case 'reasoning':
        segment(view, 'reasoning').append(d.text);
        break;
      case 'tool_use': {
        let card = view.tools.get(d.id);
        if (!card) {
          card = toolCard(d);
          view.tools.set(d.id, card);
          view.assistant.append(card);
          view.segment = null;
        }
        $('.tool-status', card).textContent = d.status ? ` · ${d.status}` : '';
        break;
      }
      case 'tool_result': {
        let card = view.tools.get(d.id);
        if (!card) {
          card = toolCard({ id: d.id, title: 'tool result' });
          view.tools.set(d.id, card);
          view.assistant.append(card);
          view.segment = null;
        }
        $('.tool-status', card).textContent = d.status ? ` · ${d.status}` : '';
        const out = $('.tool-output', card);
        out.textContent = stringify(d.output);
        out.hidden = false;
        break;
      }
      case 'input_required':
        view.inputs.push(inputCard(d));
        view.assistant.append(view.inputs.at(-1));
        view.segment = null;
        // The turn waits for the person: bring the question to them.
        view.inputs.at(-1).scrollIntoView({ block: 'center' });
        break;
      case 'done':
        endTurn(view, d.stop_reason === 'cancelled' ? 'cancelled' : 'completed',
          [d.stop_reason, d.usage ? `${fmtNum(d.usage.total_tokens ?? (d.usage.input_tokens + d.usage.output_tokens))} tokens` : null,
            d.duration_ms !== undefined ? fmtSeconds(d.duration_ms / 1000) : null]);
        break;
      case 'error':
        endTurn(view, d.code === 'cancelled' ? 'cancelled' : 'failed', [d.code, d.message]);
        break;
      default: // step_start, step_finish: nothing to show
    }
  }

  function endTurn(view, outcome, details) {
    view.statusLine.dataset.status = outcome;
    view.statusLine.textContent = [outcome, ...details.filter(Boolean)].join(' · ');
    // A question the turn ended without an answer to can no longer be answered.
    for (const card of view.inputs) for (const b of card.querySelectorAll('button, textarea')) b.disabled = true;
    choices.refresh();
    panel.onTurnEnd();
  }

  /** An `input_required`: approve / approve for the session / deny, or a client tool's output. */
  function inputCard(d) {
    const requestId = d.request_id;
    const note = el('p', { class: 'muted', 'data-test': 'input-answer' });
    const answer = async (body, label) => {
      for (const b of card.querySelectorAll('button, textarea')) b.disabled = true;
      try {
        await api('POST', sessionPath(id, `/inputs/${encodeURIComponent(requestId)}`), body);
        note.textContent = `answered: ${label}`;
      } catch (e) {
        note.textContent = e.status === 404 ? 'already answered, or no longer open' : errorText(e);
        note.classList.add('error');
      }
    };
    let controls;
    if (d.client_tool) {
      // A client tool: the person plays the client and writes the tool's result.
      const output = el('textarea', { rows: '3', 'data-test': 'tool-output', placeholder: "the tool's output" });
      const isError = el('input', { type: 'checkbox', 'data-test': 'tool-is-error' });
      controls = [
        el('p', {}, 'The agent calls the client tool ', el('code', { text: d.client_tool.name }), ' with:'),
        el('pre', { text: stringify(d.client_tool.input) }),
        output,
        el('label', {}, isError, ' it failed'),
        el('button', {
          type: 'button', 'data-test': 'tool-output-submit', text: 'Send output',
          onclick: () => answer({ output: output.value, is_error: isError.checked }, 'output sent'),
        }),
      ];
    } else {
      const decisions = [['approve_once', 'Approve'], ['approve_session', 'Approve for session'], ['deny', 'Deny']];
      controls = [
        el('p', {}, 'The agent asks: ', el('strong', { text: d.tool?.title || d.tool?.kind || 'permission' })),
        d.tool?.input ? el('pre', { text: stringify(d.tool.input) }) : null,
        el('div', { class: 'row' }, decisions.map(([decision, label]) => el('button', {
          type: 'button', 'data-decision': decision, class: decision === 'deny' ? 'danger' : '', text: label,
          onclick: () => answer({ decision }, label),
        }))),
      ];
    }
    const card = el('div', { class: 'card input-required', 'data-request-id': requestId }, controls, note);
    return card;
  }

  // ---- Sending

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const text = input.value;
    // Ctrl+Enter submits even while the Send button is disabled.
    if (sending || (!text.trim() && !pending.length)) return;
    const body = pending.length
      ? { parts: [...(text.trim() ? [{ type: 'text', text }] : []), ...pending] }
      : { text };
    body.stream = true;
    Object.assign(body, choices.chosen());
    sending = true;
    busy();
    showError(error, '');
    const abort = new AbortController();
    state.leaving.push(() => abort.abort());
    try {
      const response = await request('POST', sessionPath(id, '/messages'), body, { signal: abort.signal });
      const view = turnView(response.headers.get('X-Turn-Id'));
      view.node.prepend(messageView({ role: 'user', parts: body.parts, text }));
      window.scrollTo(0, document.body.scrollHeight);
      input.value = '';
      clearAttachments();
      choices.sent();
      await readSse(response, (_type, data) => applyEvent(JSON.parse(data)));
    } catch (e) {
      // A refused message left no trace (422 unsupported_option names what the agent offers).
      if (e.name !== 'AbortError') showError(error, errorText(e));
    } finally {
      sending = false;
      busy();
    }
  });

  cancel.addEventListener('click', async () => {
    try {
      await api('POST', sessionPath(id, '/cancel'));
    } catch (e) {
      showError(error, errorText(e));
    }
  });

  // ---- History: the newest page first (`newest=true`), "Load older" following its cursor back.

  let olderCursor = null;
  const historyPage = (cursor) => {
    const query = new URLSearchParams({ limit: String(HISTORY_PAGE) });
    if (cursor) query.set('cursor', cursor);
    else query.set('newest', 'true');
    return api('GET', sessionPath(id, `/messages?${query}`));
  };

  async function loadHistory() {
    const page = await historyPage(null);
    // Turns streamed while the history was read are already drawn: leave them out.
    const shown = page.messages.filter((m) => !turns.has(m.turn_id));
    history.prepend(...shown.map(messageView));
    olderCursor = page.next_cursor;
    older.hidden = !olderCursor;
  }

  async function loadOlder() {
    const page = await historyPage(olderCursor);
    history.prepend(...page.messages.map(messageView));
    olderCursor = page.next_cursor;
    older.hidden = !olderCursor;
  }

  older.addEventListener('click', () => loadOlder().catch((e) => showError(error, errorText(e))));

  // A question the running turn asked before this page opened still waits: show it under the
  // history (its turn's earlier output stays out; the answer streams in as it comes).
  async function showWaitingQuestions() {
    if (status !== 'input_required') return;
    const waiting = await api('GET', sessionPath(id, '/inputs'));
    for (const ev of waiting.inputs) applyEvent(ev);
  }

  loadHistory()
    .then(showWaitingQuestions)
    .catch((e) => showError(error, `history: ${errorText(e)}`));

  // ---- Turns started elsewhere (another tab, the CLI, an SDK), and the session's end: the
  // session's events from now on.
  const tail = new AbortController();
  state.leaving.push(() => tail.abort());
  let lastSeq = null;
  followStream(
    () => {
      // Resuming after a drop starts after the last event seen; the first open, from now.
      const query = lastSeq === null ? 'stream=true&tail=true' : `stream=true&since=${lastSeq}`;
      return request('GET', sessionPath(id, `/events?${query}`), undefined, { signal: tail.signal });
    },
    (_type, data) => {
      const ev = JSON.parse(data);
      lastSeq = ev.seq;
      applyEvent(ev);
    },
    tail.signal,
  );

  panel.node = el('section', { id: 'chat' }, older, history, form);
  return panel;
}

/** The message fields the composer offers: (field, label). */
const CHOICES = [['model', 'Model'], ['agent', 'Mode'], ['thinking', 'Thinking']];

/**
 * The composer's model, mode and thinking fields, sent as a message's `model`, `agent` and
 * `thinking`: selects filled from what the session's agent offers (GET …/options, read again
 * after each turn to show the values in force, which a message's choice changes for later turns
 * too); a setting the agent does not have gets no field.
 */
function choiceFields(id, container) {
  const fields = new Map(); // field → its select

  async function refresh() {
    let offered;
    try {
      offered = (await api('GET', sessionPath(id, '/options'))).options;
    } catch {
      // A session still creating has no agent to ask yet (it is asked again once ready), one
      // that ended has none any more: the fields stay as they are.
      return;
    }
    for (const [field, label] of CHOICES) {
      const option = offered.find((o) => o.id === field);
      if (!option) continue; // a setting this agent does not have
      const node = fields.get(field);
      // `thinking` is on or off in a message; the agent's levels show as its current value.
      const values = field === 'thinking'
        ? [{ id: 'true', name: 'on' }, { id: 'false', name: 'off' }] : option.values;
      const kept = node ? node.value : ''; // chosen, not yet sent
      const fresh = el('select', { id: `opt-${field}` },
        el('option', { value: '', text: `unchanged (${option.current ?? 'none'})` }),
        values.map((v) => el('option', { value: v.id, text: v.name || v.id, selected: v.id === kept })));
      if (node) node.replaceWith(fresh);
      else container.append(el('label', { text: `${label} ` }, fresh));
      fields.set(field, fresh);
    }
  }

  /** After a message was taken: its choices are in force now, so the fields say "unchanged". */
  function sent() {
    for (const node of fields.values()) node.value = '';
  }

  /** The fields set for the next message. */
  function chosen() {
    const out = {};
    for (const [field, node] of fields) {
      if (node.value) out[field] = field === 'thinking' ? node.value === 'true' : node.value.trim();
    }
    return out;
  }

  refresh();
  return { refresh, chosen, sent };
}

/** A chosen file as a message part: an image, a text file as text, anything else as base64. */
async function filePart(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  const mime = file.type || 'application/octet-stream';
  if (mime.startsWith('image/')) return { type: 'image', data: base64(bytes), mime_type: mime };
  // Text goes as text: agents that take no binary files still take it.
  try {
    const text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    if (!text.includes('\0')) return { type: 'file', name: file.name, text, mime_type: file.type || 'text/plain' };
  } catch {
    // Not UTF-8: binary.
  }
  return { type: 'file', name: file.name, data: base64(bytes), mime_type: mime };
}

function base64(bytes) {
  let binary = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

// ---------------------------------------------------------------------------------------------
// A terminal session: xterm.js over the session's tty_url WebSocket (docs/harness.md)

let vendorLoaded = null;

/** xterm.js and its fit add-on, loaded on the first terminal page (the rest never needs them). */
function loadTerminalLibrary() {
  vendorLoaded ??= new Promise((resolve, reject) => {
    document.head.append(el('link', { rel: 'stylesheet', href: '/console/vendor/xterm.css' }));
    const script = (src) => new Promise((ok, fail) => {
      document.head.append(el('script', { src, onload: ok, onerror: () => fail(new Error(`${src} did not load`)) }));
    });
    script('/console/vendor/xterm.js').then(() => script('/console/vendor/addon-fit.js')).then(resolve, reject);
  });
  return vendorLoaded;
}

function terminalPanel(session) {
  const box = el('div', { id: 'terminal' });
  const status = el('span', { id: 'tty-status', 'data-state': 'connecting', text: 'connecting…' });
  const reattach = el('button', { id: 'tty-reattach', type: 'button', text: 'Re-attach' });
  const panel = {
    node: el('section', { id: 'terminal-panel' }, el('div', { class: 'row' }, status, reattach), box),
    onTurnEnd: () => {},
  };
  let term = null;
  let fit = null;
  let socket = null;
  let latest = session; // the session as last heard of
  const setStatus = (s, text) => {
    status.dataset.state = s;
    status.textContent = text;
  };
  const why = (s) => `the session is ${s.status}${s.failure_reason ? ` (${s.failure_reason})` : ''}`;

  let reading = false; // the session is being read for its tty_url

  /** Attaches once the session has a terminal (a new session has none while creating). */
  async function attachWhenReady() {
    if (!term || socket || reading) return;
    if (!latest.tty_url && (latest.status === 'ready' || BUSY.has(latest.status))) {
      // The sessions watch leaves terminal tokens out: read the session for its tty_url.
      reading = true;
      try {
        latest = await api('GET', sessionPath(session.id));
      } catch (e) {
        setStatus('error', errorText(e));
        return;
      } finally {
        reading = false;
      }
      if (!term || socket) return;
    }
    if (latest.tty_url) attach(latest.tty_url);
    else if (latest.status === 'creating') setStatus('waiting', `waiting: ${why(latest)}`);
    else setStatus('closed', `no terminal: ${why(latest)}`);
  }
  panel.sessionChanged = (s) => {
    latest = s;
    attachWhenReady();
  };

  const sendSize = () => {
    if (socket?.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: 'resize', cols: term.cols, rows: term.rows }));
    }
  };

  function attach(ttyUrl) {
    // The tty_url names the server as it sees itself; the page's own host is the one the
    // browser reaches (and the only one the CSP lets it connect to).
    const url = new URL(ttyUrl);
    const ws = new WebSocket(`${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}${url.pathname}${url.search}`);
    ws.binaryType = 'arraybuffer';
    socket = ws;
    let sizedAfterOutput = false;
    let exited = false;
    ws.onopen = () => {
      setStatus('connected', 'connected');
      sendSize();
      term.focus();
    };
    ws.onmessage = (message) => {
      if (ws !== socket) return;
      if (typeof message.data !== 'string') {
        term.write(new Uint8Array(message.data));
        // A shell that had not drawn its first prompt when the size came may set its old size
        // back (docs/harness.md): send it again once it speaks.
        if (!sizedAfterOutput) {
          sizedAfterOutput = true;
          sendSize();
        }
        return;
      }
      const control = JSON.parse(message.data);
      if (control.type === 'exit') {
        exited = true;
        const how = control.code !== undefined ? `code ${control.code}` : `signal ${control.signal}`;
        status.dataset.exitCode = control.code ?? '';
        setStatus('exited', `the program exited (${how})`);
      } else if (control.type === 'error') {
        setStatus('error', control.message);
      }
    };
    ws.onclose = (close) => {
      if (ws !== socket || exited) return;
      setStatus('closed', close.code === 1013
        ? 'disconnected: too slow to read (re-attach to replay the screen)'
        : `disconnected (${close.code}${close.reason ? `: ${close.reason}` : ''})`);
    };
  }

  /** Attaches again with a fresh token, the screen replayed from the server. */
  async function reattachNow() {
    setStatus('connecting', 'connecting…');
    try {
      latest = await api('GET', sessionPath(session.id));
      const old = socket;
      socket = null;
      old?.close();
      if (latest.tty_url) term.reset(); // the server replays the screen
      attachWhenReady();
    } catch (e) {
      setStatus('error', errorText(e));
    }
  }
  reattach.addEventListener('click', reattachNow);

  let resizeTimer = null;
  const onWindowResize = () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => fit?.fit(), 100);
  };

  function open() {
    term = new window.Terminal({ cursorBlink: true, scrollback: 5000, fontFamily: 'monospace', fontSize: 14 });
    fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(box);
    const encoder = new TextEncoder();
    term.onData((data) => socket?.readyState === WebSocket.OPEN && socket.send(encoder.encode(data)));
    term.onBinary((data) => socket?.readyState === WebSocket.OPEN
      && socket.send(Uint8Array.from(data, (c) => c.charCodeAt(0))));
    term.onResize(({ cols, rows }) => {
      box.dataset.cols = cols;
      box.dataset.rows = rows;
      sendSize();
    });
    fit.fit();
    box.dataset.cols = term.cols;
    box.dataset.rows = term.rows;
    window.addEventListener('resize', onWindowResize);
    attachWhenReady();
  }
  loadTerminalLibrary().then(open, (e) => setStatus('error',
    `${e.message}: this build of sandwarden has no terminal library (xterm.js); run \`npm ci --prefix console\` where it is built, then build it again`));

  state.leaving.push(() => {
    window.removeEventListener('resize', onWindowResize);
    clearTimeout(resizeTimer);
    const old = socket;
    socket = null;
    old?.close();
    term?.dispose();
  });
  return panel;
}

// ---------------------------------------------------------------------------------------------
// Admin: keys, their limits, usage, and every tenant's sessions

const LIMITS = [
  'live_sessions', 'concurrent_turns', 'open_streams', 'open_connections', 'concurrent_requests',
  'message_parts', 'message_bytes', 'sandbox_memory_mib', 'answer_mib', 'request_rate', 'request_burst',
];
const BUDGET = ['tokens', 'turn_seconds'];

function adminPage() {
  const keysBody = el('tbody');
  const keysError = el('p', { id: 'keys-error', class: 'error', hidden: true });
  const tenantsBox = el('div', { id: 'tenant-sessions' });
  const usageBody = el('tbody');
  const usageError = el('p', { class: 'error', hidden: true });
  const since = el('input', { id: 'usage-since', type: 'date' });

  async function loadKeys() {
    try {
      const { api_keys: keys } = await api('GET', '/v1/api-keys');
      keysBody.replaceChildren(...keys.map((k) => keyRows(k, loadKeys, keysError)).flat());
      showError(keysError, '');
      const tenants = [...new Set(keys.map((k) => k.tenant))].sort();
      tenantsBox.replaceChildren(...tenants.map(tenantSessions));
    } catch (e) {
      showError(keysError, errorText(e));
    }
  }

  async function loadUsage() {
    const query = since.value ? `?since=${since.value}` : '';
    try {
      const { tenants } = await api('GET', `/v1/usage${query}`);
      usageBody.replaceChildren(...tenants.map((t) => el('tr', { 'data-tenant': t.tenant },
        el('td', { text: t.tenant }), el('td', { text: fmtNum(t.input_tokens) }),
        el('td', { text: fmtNum(t.output_tokens) }), el('td', { text: fmtNum(t.turns) }),
        el('td', { text: fmtSeconds(t.turn_seconds) }), el('td', { text: fmtSeconds(t.sandbox_seconds) }),
        el('td', { text: fmtNum(t.sessions?.length) }))));
      showError(usageError, '');
    } catch (e) {
      showError(usageError, errorText(e));
    }
  }
  since.addEventListener('change', loadUsage);

  loadKeys();
  loadUsage();
  return el('section', { id: 'admin-page' },
    el('h1', { text: 'Admin' }),
    el('h2', { text: 'API keys' }),
    newKeyForm(loadKeys),
    keysError,
    el('table', { id: 'keys-table' },
      el('thead', {}, el('tr', {}, ['Id', 'Tenant', 'Admin', 'Origin', 'Created', 'Last used', 'Revoked', 'Limits', '']
        .map((h) => el('th', { text: h })))),
      keysBody),
    el('h2', { text: 'Usage' }),
    el('label', { text: 'Since (UTC day) ' }, since),
    usageError,
    el('table', { id: 'usage-table' },
      el('thead', {}, el('tr', {}, ['Tenant', 'Input tokens', 'Output tokens', 'Turns', 'Turn time', 'Sandbox time', 'Sessions']
        .map((h) => el('th', { text: h })))),
      usageBody),
    el('h2', { text: "Tenants' sessions" }),
    tenantsBox);
}

function newKeyForm(reload) {
  const tenant = el('input', { id: 'newkey-tenant', placeholder: 'tenant', required: true });
  const button = el('button', { id: 'newkey-submit', type: 'submit', text: 'Create key' });
  const shown = el('div', { id: 'newkey-shown', hidden: true });
  const error = el('p', { class: 'error', hidden: true });
  const form = el('form', { id: 'newkey-form', class: 'row' }, tenant, button, error, shown);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    try {
      const created = await api('POST', '/v1/api-keys', { tenant: tenant.value.trim() });
      // Only its hash is stored: this is the one time anyone sees the key.
      shown.replaceChildren(
        el('p', {}, `Key for ${created.tenant} (`, el('code', { text: created.id }),
          '): copy it now, it is not shown again.'),
        el('input', { id: 'newkey-value', readonly: true, value: created.key, size: '60', onfocus: (e) => e.target.select() }));
      shown.hidden = false;
      tenant.value = '';
      showError(error, '');
      reload();
    } catch (e) {
      showError(error, errorText(e));
    }
  });
  return form;
}

/** A key's row, and the row under it that edits its limits (hidden until asked for). */
function keyRows(key, reload, errorNode) {
  const { budget, ...limits } = key.limits || {};
  const set = [
    ...Object.entries(limits).map(([name, value]) => `${name}=${value}`),
    ...Object.entries(budget || {}).map(([name, value]) => `budget.${name}=${value}`),
  ];
  const editor = limitsEditor(key, reload);
  const row = el('tr', { 'data-key-id': key.id, 'data-tenant': key.tenant, class: key.revoked_at ? 'revoked' : '' },
    el('td', {}, el('code', { text: key.id })),
    el('td', { text: key.tenant }),
    el('td', { text: key.admin ? 'yes' : '' }),
    el('td', { text: key.origin }),
    el('td', { text: fmtTime(key.created_at) }),
    el('td', { text: fmtTime(key.last_used_at) }),
    el('td', { 'data-test': 'revoked', text: key.revoked_at ? fmtTime(key.revoked_at) : '' }),
    el('td', { class: 'limits', text: set.join(', ') || 'defaults' }),
    el('td', { class: 'actions' },
      el('button', { type: 'button', 'data-test': 'limits', text: 'Limits', onclick: () => { editor.hidden = !editor.hidden; } }),
      key.revoked_at ? null : el('button', {
        type: 'button', class: 'danger', 'data-test': 'revoke', text: 'Revoke',
        onclick: async () => {
          if (!window.confirm(`Revoke ${key.id} (${key.tenant})? It is refused from the next request on.`)) return;
          try {
            await api('DELETE', `/v1/api-keys/${encodeURIComponent(key.id)}`);
            reload();
          } catch (e) {
            showError(errorNode, errorText(e));
          }
        },
      })));
  return [row, editor];
}

/** One number field per limit; empty means the server's default (docs/api.md, "Quotas"). */
function limitsEditor(key, reload) {
  const limits = key.limits || {};
  const input = (name, value) => el('input', { type: 'number', min: '1', name, value: value ?? '', placeholder: 'default' });
  const inputs = LIMITS.map((name) => [name, input(name, limits[name])]);
  const budget = BUDGET.map((name) => [name, input(`budget.${name}`, limits.budget?.[name])]);
  const error = el('p', { class: 'error', hidden: true });
  const save = el('button', { type: 'submit', 'data-test': 'limits-save', text: 'Save limits' });
  const labelled = ([, field]) => el('label', {}, el('span', { text: field.name }), field);
  const form = el('form', { class: 'limits-form' }, inputs.map(labelled), budget.map(labelled), save, error);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    // PATCH takes the whole set: every field, the empty ones left out.
    const set = {};
    for (const [name, field] of inputs) if (field.value) set[name] = Number(field.value);
    const spend = {};
    for (const [name, field] of budget) if (field.value) spend[name] = Number(field.value);
    if (Object.keys(spend).length) set.budget = spend;
    try {
      await api('PATCH', `/v1/api-keys/${encodeURIComponent(key.id)}`, { limits: set });
      reload();
    } catch (e) {
      showError(error, errorText(e));
    }
  });
  return el('tr', { class: 'limits-row', 'data-limits-for': key.id, hidden: true }, el('td', { colspan: '9' }, form));
}

/** A tenant's sessions (GET /v1/sessions?tenant=), a page at a time. */
function tenantSessions(tenant) {
  const tbody = el('tbody');
  const more = el('button', { type: 'button', 'data-test': 'more', text: 'Load more', hidden: true });
  const error = el('p', { class: 'error', hidden: true });
  let cursor = null;

  const row = (s) => el('tr', { 'data-session-id': s.id },
    el('td', {}, el('code', { text: s.id })),
    el('td', { text: s.title || s.name || '' }),
    el('td', { text: s.harness }),
    el('td', {}, statusBadge(s.status)),
    el('td', { text: fmtTime(s.created_at) }),
    el('td', {}, s.status === 'deleted' ? null : el('button', {
      type: 'button', class: 'danger', 'data-test': 'delete', text: 'Delete',
      onclick: (e) => deleteSession(s.id, (fresh) => e.target.closest('tr').replaceWith(row(fresh)), tenant),
    })));

  async function load() {
    const query = new URLSearchParams({ tenant, limit: '50', order: 'newest' });
    if (cursor) query.set('cursor', cursor);
    try {
      const page = await api('GET', `/v1/sessions?${query}`);
      tbody.append(...page.sessions.map(row));
      if (!tbody.children.length) tbody.append(el('tr', {}, el('td', { colspan: '6', class: 'muted', text: 'no sessions' })));
      cursor = page.next_cursor;
      more.hidden = !cursor;
    } catch (e) {
      showError(error, errorText(e));
    }
  }
  more.addEventListener('click', async () => {
    more.disabled = true;
    await load();
    more.disabled = false;
  });
  load();
  return el('div', { class: 'tenant', 'data-tenant': tenant },
    el('h3', { text: tenant }),
    error,
    el('table', {},
      el('thead', {}, el('tr', {}, ['Id', 'Title', 'Template', 'Status', 'Created', ''].map((h) => el('th', { text: h })))),
      tbody),
    more);
}

// ---------------------------------------------------------------------------------------------
// Start

function start() {
  setUpSignIn();
  window.addEventListener('hashchange', route);
  const stored = sessionStorage.getItem(KEY_SLOT);
  if (stored) {
    // A reload of a signed-in tab: check the key again, quietly.
    $('#signin').hidden = true;
    signIn(stored).catch((e) => signOut(e.message));
  }
}

start();
