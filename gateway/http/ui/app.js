// The timeline UI: sign-in, the patient's episodes and records, record detail, writing records,
// and the audit log. Everything comes from /medicon/v1 with the token of this tab; what the
// token's role may not see is said as "not allowed", never as a failure of the page.

import { api, seg, session, ApiError, UNAUTHORIZED_EVENT } from './api.js';
import { revokeAll } from './attachments.js';
import { AuditView } from './audit.js';
import { renderDetail } from './detail.js';
import { openRecordDialog } from './dialog.js';
import { h } from './dom.js';
import { episodeTitle, kindOf, KIND } from './format.js';
import { SchemaSet } from './schemaform.js';
import { renderTimeline } from './timeline.js';

const WRITERS = new Set(['admin', 'clinician', 'lab', 'pharmacy']);
const AUDITORS = new Set(['admin', 'auditor']);
const PAGE = 500;

const $ = (id) => document.getElementById(id);

const state = {
  me: null,
  patient: null,
  lanes: [],
  filters: { episodes: null, kind: '', from: '', to: '' },
  selected: null,
  schemas: null,
  kinds: [],
  byCid: new Map(),
  corrections: new Map(),
  generation: 0,
  shownSignature: null,
};

// --- messages --------------------------------------------------------------------------------

function announce(text) {
  const region = $('announcer');
  region.textContent = '';
  window.requestAnimationFrame(() => { region.textContent = text; });
}

function showError(err, context) {
  const text = err instanceof ApiError && err.status === 403
    ? `${context}: not allowed. ${err.message}`
    : `${context}: ${err.message}`;
  $('alert-text').textContent = text;
  $('alert').hidden = false;
}

function clearError() {
  $('alert').hidden = true;
  $('alert-text').textContent = '';
}

// --- views -----------------------------------------------------------------------------------

function showView(name) {
  $('signin-view').hidden = name !== 'signin';
  $('timeline-view').hidden = name !== 'timeline';
  $('audit-view').hidden = name !== 'audit';
  $('tab-timeline').toggleAttribute('aria-current', name === 'timeline');
  $('tab-audit').toggleAttribute('aria-current', name === 'audit');
  if (name === 'timeline') $('tab-timeline').setAttribute('aria-current', 'page');
  if (name === 'audit') $('tab-audit').setAttribute('aria-current', 'page');
}

const canWrite = () => state.me !== null && WRITERS.has(state.me.role);

// --- sign-in ---------------------------------------------------------------------------------

function tokenError(text) {
  const error = $('token-error');
  error.textContent = text;
  error.hidden = !text;
  $('token-input').toggleAttribute('aria-invalid', Boolean(text));
  if (text) $('token-input').setAttribute('aria-invalid', 'true');
}

async function signIn(token) {
  session.set(token);
  try {
    state.me = await api('/whoami');
  } catch (err) {
    session.clear();
    state.me = null;
    const text = err.status === 401 ? 'This token was not accepted (unknown, revoked or expired).' : err.message;
    tokenError(text);
    announce(`Sign-in failed: ${text}`);
    $('token-input').focus();
    return;
  }
  tokenError('');
  $('token-input').value = '';
  enterApp();
}

function enterApp() {
  const me = state.me;
  $('whoami-principal').textContent = me.principal;
  $('whoami-role').textContent = me.role;
  $('whoami').hidden = false;
  $('tabs').hidden = false;
  $('tab-audit').hidden = !AUDITORS.has(me.role);
  $('open-episode').hidden = true;
  showView('timeline');
  announce(`Signed in as ${me.principal}, role ${me.role}.`);
  if (me.patients && me.patients.length === 1) {
    $('patient-input').value = me.patients[0];
    loadPatient(me.patients[0]);
  } else {
    $('patient-input').focus();
  }
}

function signOut(reason) {
  session.clear();
  revokeAll();
  Object.assign(state, {
    me: null, patient: null, lanes: [], selected: null, schemas: null, kinds: [],
    filters: { episodes: null, kind: '', from: '', to: '' }, generation: state.generation + 1,
  });
  $('whoami').hidden = true;
  $('tabs').hidden = true;
  $('filters').hidden = true;
  $('open-episode').hidden = true;
  $('timeline').replaceChildren();
  $('timeline').removeAttribute('aria-busy');
  delete $('timeline').dataset.shown;
  $('detail').replaceChildren();
  $('detail').hidden = true;
  $('patient-input').value = '';
  auditView.reset();
  const dialog = $('record-dialog');
  if (dialog.open) dialog.close();
  clearError();
  showView('signin');
  if (reason) {
    tokenError(reason);
    announce(reason);
  } else {
    tokenError('');
    announce('Signed out.');
  }
  $('token-input').focus();
}

// --- loading a patient -----------------------------------------------------------------------

function index() {
  state.byCid = new Map();
  state.corrections = new Map();
  for (const lane of state.lanes) {
    for (const entry of lane.entries) {
      state.byCid.set(entry.cid, { entry, lane });
      if (entry.record.schema === KIND.amendment && entry.record.body && entry.record.body.corrects) {
        const list = state.corrections.get(entry.record.body.corrects) || [];
        list.push(entry);
        state.corrections.set(entry.record.body.corrects, list);
      }
    }
  }
}

async function loadPatient(patient) {
  const generation = ++state.generation;
  clearError();
  state.patient = patient;
  state.lanes = [];
  state.selected = null;
  state.filters = { episodes: null, kind: '', from: '', to: '' };
  $('detail').hidden = true;
  $('filters').hidden = true;
  $('open-episode').hidden = true;
  // Busy until every episode's history and verification are in: screen readers wait, and so
  // can anything that drives the page (data-shown names the patient whose timeline is complete).
  $('timeline').setAttribute('aria-busy', 'true');
  delete $('timeline').dataset.shown;
  $('timeline').replaceChildren(h('p', { class: 'empty', role: 'status' }, 'Loading…'));
  let listing;
  try {
    listing = await api(`/patients/${seg(patient)}/episodes`);
  } catch (err) {
    if (generation !== state.generation) return;
    const text = err.status === 403
      ? 'Not allowed: your token does not give access to this patient.'
      : `The episodes could not be read: ${err.message}`;
    $('timeline').replaceChildren(h('p', { class: 'empty notice', dataset: { state: err.status === 403 ? 'denied' : 'error' } }, text));
    showError(err, 'Patient');
    announce(text);
    shown(patient);
    return;
  }
  if (generation !== state.generation) return;
  state.lanes = listing.episodes.map((episode) => ({ episode, entries: [], next: null, error: null, verify: { state: 'pending' } }));
  $('filters').hidden = state.lanes.length === 0;
  $('open-episode').hidden = !canWrite();
  rerender();
  announce(`${state.lanes.length} episode${state.lanes.length === 1 ? '' : 's'} of patient ${patient}.`);
  await Promise.all(state.lanes.map((lane) => Promise.all([loadHistory(lane, generation), verifyLane(lane, generation)])));
  if (generation === state.generation) shown(patient);
}

function shown(patient) {
  $('timeline').removeAttribute('aria-busy');
  $('timeline').dataset.shown = patient;
}

async function loadHistory(lane, generation, more = false) {
  try {
    const cursor = more && lane.next !== null ? `&cursor=${seg(lane.next)}` : '';
    const page = await api(`/episodes/${seg(lane.episode.id)}/history?limit=${PAGE}${cursor}`);
    if (generation !== state.generation) return;
    lane.episode = page.episode;
    lane.entries = more ? [...lane.entries, ...page.records] : page.records;
    lane.next = page.next;
    lane.error = null;
  } catch (err) {
    if (generation !== state.generation) return;
    lane.error = err;
  }
  rerender();
}

async function verifyLane(lane, generation) {
  lane.verify = { state: 'pending' };
  try {
    const report = await api(`/episodes/${seg(lane.episode.id)}/verify`);
    if (generation !== state.generation) return;
    lane.verify = { state: report.ok ? 'ok' : 'broken', report };
  } catch (err) {
    if (generation !== state.generation) return;
    lane.verify = err.status === 403 ? { state: 'denied', error: err } : { state: 'error', error: err };
  }
  rerender();
}

// --- rendering -------------------------------------------------------------------------------

const timelineContext = {
  open: (cid) => openRecord(cid),
  addRecord: (lane) => addRecord(lane),
  closeEpisode: (lane) => closeEpisode(lane),
  verify: (lane) => { verifyLane(lane, state.generation); },
  loadMore: (lane) => { loadHistory(lane, state.generation, true); },
};

function rerender() {
  index();
  renderFilters();
  const focusedCid = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.cid : null;
  const counts = renderTimeline($('timeline'), state, {
    ...timelineContext, canWrite: canWrite(), selected: state.selected, byCid: state.byCid, corrections: state.corrections,
  });
  $('filter-status').textContent = state.lanes.length
    ? `Showing ${counts.shown} of ${counts.total} record${counts.total === 1 ? '' : 's'}.` : '';
  if (focusedCid) document.querySelector(`.rec[data-cid="${CSS.escape(focusedCid)}"]`)?.focus();
  if (state.selected && state.byCid.has(state.selected) && !$('detail').hidden
      && detailSignature(state.selected) !== state.shownSignature) showDetail(state.selected, false);
}

/** What the detail of ``cid`` depends on besides the (immutable) record: its corrections and
 * whether its episode is still open. Re-rendered only when that changes, so a loaded
 * attachment stays on screen while the timeline refreshes. */
function detailSignature(cid) {
  const found = state.byCid.get(cid);
  if (!found) return null;
  return `${cid}|${(state.corrections.get(cid) || []).map((e) => e.cid).join(',')}|${found.lane.episode.status}`;
}

function renderFilters() {
  const list = $('episode-filter-list');
  const selected = state.filters.episodes;
  list.replaceChildren(...state.lanes.map((lane) => {
    const id = `ep-filter-${lane.episode.id.replace(/[^A-Za-z0-9_-]/g, '_')}`;
    const opened = lane.entries.find((e) => e.seq === 0);
    const box = h('input', { type: 'checkbox', id, checked: selected === null || selected.has(lane.episode.id), dataset: { episode: lane.episode.id } });
    box.addEventListener('change', onEpisodeFilter);
    return h('div', { class: 'check' }, box, h('label', { for: id }, episodeTitle(lane.episode, opened)));
  }));
  const kinds = new Map();
  for (const lane of state.lanes) for (const entry of lane.entries) {
    const kind = kindOf(entry.record);
    kinds.set(kind.key, kind.label);
  }
  const select = $('kind-filter');
  const value = state.filters.kind;
  select.replaceChildren(h('option', { value: '' }, 'All kinds'),
    ...[...kinds].sort((a, b) => a[1].localeCompare(b[1])).map(([key, label]) => h('option', { value: key }, label)));
  select.value = kinds.has(value) ? value : '';
}

function onEpisodeFilter() {
  const boxes = [...document.querySelectorAll('#episode-filter-list input')];
  state.filters.episodes = new Set(boxes.filter((b) => b.checked).map((b) => b.dataset.episode));
  rerender();
}

// --- record detail ---------------------------------------------------------------------------

const detailContext = {
  open: (cid) => openRecord(cid),
  close: () => closeDetail(),
  amend: (entry, lane) => addRecord(lane, { kind: KIND.amendment, initial: { body: { corrects: entry.cid } } }),
  announce,
  onError: (err) => showError(err, 'Attachment'),
};

function showDetail(cid, focus) {
  const found = state.byCid.get(cid);
  if (!found) return;
  revokeAll();
  state.shownSignature = detailSignature(cid);
  renderDetail($('detail'), found.entry, found.lane, {
    ...detailContext, byCid: state.byCid, corrections: state.corrections, canWrite: canWrite(),
  });
  for (const button of document.querySelectorAll('.rec')) {
    if (button.dataset.cid === cid) button.setAttribute('aria-current', 'true');
    else button.removeAttribute('aria-current');
  }
  if (focus) $('detail-title').focus();
}

function openRecord(cid) {
  state.selected = cid;
  showDetail(cid, true);
}

function closeDetail() {
  const cid = state.selected;
  state.selected = null;
  revokeAll();
  $('detail').hidden = true;
  $('detail').replaceChildren();
  const button = cid ? document.querySelector(`.rec[data-cid="${CSS.escape(cid)}"]`) : null;
  button?.removeAttribute('aria-current');
  button?.focus();
}

// --- writing ---------------------------------------------------------------------------------

async function ensureSchemas() {
  if (!state.schemas) {
    const answer = await api('/schemas?full=1');
    state.schemas = new SchemaSet(answer.schemas);
    state.kinds = answer.kinds;
  }
  return state.schemas;
}

async function withSchemas(what, action) {
  try {
    await ensureSchemas();
  } catch (err) {
    showError(err, what);
    announce(`${what}: ${err.message}`);
    return;
  }
  action();
}

function laneName(lane) {
  return episodeTitle(lane.episode, lane.entries.find((e) => e.seq === 0));
}

async function reloadLane(lane, selectCid) {
  const generation = state.generation;
  await loadHistory(lane, generation);
  if (selectCid) {
    state.selected = selectCid;
    showDetail(selectCid, false);
    document.querySelector(`.rec[data-cid="${CSS.escape(selectCid)}"]`)?.focus();
  }
  await verifyLane(lane, generation);
}

function addRecord(lane, { kind, initial = {} } = {}) {
  withSchemas('Add record', () => {
    const kinds = state.kinds.filter((k) => k !== KIND.opened && k !== KIND.closed);
    openRecordDialog({
      title: `Add a record to ${laneName(lane)}`,
      kinds,
      kind: kind || (kinds.includes(KIND.encounter) ? KIND.encounter : kinds[0]),
      initial: { author: state.me.principal, ...initial },
      schemas: state.schemas,
      announce,
      submit: (record) => api(`/episodes/${seg(lane.episode.id)}/records`, { method: 'POST', body: record }),
      done: (answer) => {
        announce(`Record #${answer.seq} appended to ${laneName(lane)}.`);
        reloadLane(lane, answer.cid);
      },
    });
  });
}

function closeEpisode(lane) {
  withSchemas('Close episode', () => {
    openRecordDialog({
      title: `Close ${laneName(lane)}`,
      kinds: [KIND.closed],
      initial: { author: state.me.principal, body: { period_end: new Date().toISOString() } },
      schemas: state.schemas,
      submitLabel: 'Close episode',
      announce,
      submit: (record) => api(`/episodes/${seg(lane.episode.id)}/records`, { method: 'POST', body: record }),
      done: () => {
        announce(`${laneName(lane)} is closed.`);
        reloadLane(lane);
      },
    });
  });
}

function openEpisode() {
  const patient = state.patient;
  withSchemas('Open episode', () => {
    openRecordDialog({
      title: `Open an episode for ${patient}`,
      kinds: [KIND.opened],
      initial: { author: state.me.principal },
      envelopeFields: ['episode', 'author'],
      schemas: state.schemas,
      submitLabel: 'Open episode',
      announce,
      submit: (record) => api(`/patients/${seg(patient)}/episodes`, { method: 'POST', body: record }),
      done: (answer) => {
        announce(`Episode ${answer.episode.id} opened.`);
        loadPatient(patient).then(() => document.querySelector(`.lane-head[data-episode="${CSS.escape(answer.episode.id)}"] button`)?.focus());
      },
    });
  });
}

// --- wiring ----------------------------------------------------------------------------------

const auditView = new AuditView({ announce, showError });

function wire() {
  $('signin-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const token = $('token-input').value.trim();
    if (!token) {
      tokenError('Enter your access token.');
      $('token-input').focus();
      return;
    }
    signIn(token);
  });
  $('sign-out').addEventListener('click', () => signOut());
  $('alert-close').addEventListener('click', clearError);
  $('patient-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const patient = $('patient-input').value.trim();
    if (!patient) {
      announce('Enter a patient identifier.');
      $('patient-input').focus();
      return;
    }
    loadPatient(patient);
  });
  $('open-episode').addEventListener('click', openEpisode);
  $('kind-filter').addEventListener('change', (e) => { state.filters.kind = e.target.value; rerender(); });
  $('from-filter').addEventListener('change', (e) => { state.filters.from = e.target.value; rerender(); });
  $('to-filter').addEventListener('change', (e) => { state.filters.to = e.target.value; rerender(); });
  $('clear-filters').addEventListener('click', () => {
    state.filters = { episodes: null, kind: '', from: '', to: '' };
    $('from-filter').value = '';
    $('to-filter').value = '';
    rerender();
    announce('Filters cleared.');
  });
  $('tab-timeline').addEventListener('click', () => showView('timeline'));
  $('tab-audit').addEventListener('click', () => {
    showView('audit');
    if (!auditView.el.table.childElementCount) auditView.load(0);
    $('audit-title').focus();
  });
  $('detail').addEventListener('keydown', (event) => {
    if (event.key === 'Escape') closeDetail();
  });
  window.addEventListener(UNAUTHORIZED_EVENT, () => {
    if (state.me) signOut('Your token is no longer accepted (revoked or expired). Sign in again.');
  });
}

async function start() {
  wire();
  if (session.token) {
    try {
      state.me = await api('/whoami');
      enterApp();
      return;
    } catch {
      session.clear();
    }
  }
  showView('signin');
  $('token-input').focus();
}

start();
