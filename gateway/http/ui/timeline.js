// The patient's episodes as parallel lanes on one time axis: one column per episode, one row
// per record in time order across all of them, so concurrent episodes run side by side and a
// rail marks the span each episode covers. A table underneath, so screen readers get row
// (time) and column (episode) headers; arrow keys move between records.

import { h } from './dom.js';
import { clock, day, episodeTitle, kindOf, localDay, shortCid, summary, KIND } from './format.js';

function passes(entry, filters) {
  const record = entry.record;
  if (filters.kind && kindOf(record).key !== filters.kind) return false;
  const d = localDay(record.recorded_at);
  if (filters.from && d < filters.from) return false;
  if (filters.to && d > filters.to) return false;
  return true;
}

function verifyBadge(lane) {
  const v = lane.verify || { state: 'pending' };
  switch (v.state) {
    case 'ok': {
      const erased = v.report.erased ? ' (erased data)' : '';
      return h('span', { class: 'badge badge-ok', title: `Walked in IPFS from the head: ${v.report.checked} of ${v.report.length} records check out` },
        h('span', { 'aria-hidden': 'true' }, '✓ '), `Chain verified${erased} · ${v.report.checked}/${v.report.length}`);
    }
    case 'broken': {
      const brk = v.report.break || {};
      return h('span', { class: 'badge badge-bad' },
        h('span', { 'aria-hidden': 'true' }, '✗ '), `Chain broken at #${brk.seq ?? '?'}`,
        h('span', { class: 'badge-detail' }, `${brk.problem || 'unknown problem'} (block ${shortCid(brk.cid)})`));
    }
    case 'denied':
      return h('span', { class: 'badge badge-muted' }, 'Verification not allowed');
    case 'error':
      return h('span', { class: 'badge badge-bad' }, `Verification failed: ${v.error.message}`);
    default:
      return h('span', { class: 'badge badge-muted' }, 'Verifying…');
  }
}

function laneHeader(lane, index, ctx) {
  const ep = lane.episode;
  const opened = lane.entries.find((e) => e.seq === 0);
  const open = ep.status === 'open';
  const actions = h('div', { class: 'lane-actions' });
  const name = episodeTitle(ep, opened);
  if (ctx.canWrite && open) {
    actions.append(
      h('button', { type: 'button', class: 'btn btn-small', 'aria-label': `Add record to ${name}`, onclick: () => ctx.addRecord(lane) }, 'Add record'),
      h('button', { type: 'button', class: 'btn btn-small btn-quiet', 'aria-label': `Close episode ${name}`, onclick: () => ctx.closeEpisode(lane) }, 'Close episode'));
  }
  actions.append(h('button', { type: 'button', class: 'btn btn-small btn-quiet', 'aria-label': `Verify ${name} again`, onclick: () => ctx.verify(lane) }, 'Verify'));
  const message = lane.error
    ? h('p', { class: lane.error.status === 403 ? 'lane-note' : 'lane-note error-text' },
      lane.error.status === 403 ? 'Records: not allowed for your token.' : `Records could not be read: ${lane.error.message}`)
    : null;
  const more = lane.next
    ? h('button', { type: 'button', class: 'btn btn-small btn-quiet', onclick: () => ctx.loadMore(lane) }, `Load more (${ep.length - lane.entries.length} left)`)
    : null;
  return h('th', { scope: 'col', class: `lane-head lane-${index % 6}`, dataset: { episode: ep.id } },
    h('div', { class: 'lane-title' }, name),
    h('div', { class: 'lane-id mono', title: ep.id }, ep.id),
    h('div', { class: 'lane-badges' },
      h('span', { class: `status status-${open ? 'open' : 'closed'}` }, open ? 'Open' : 'Closed'),
      h('span', { class: 'lane-count' }, `${ep.length} record${ep.length === 1 ? '' : 's'}`)),
    h('div', { class: 'lane-verify', dataset: { verify: lane.verify?.state || 'pending' } }, verifyBadge(lane)),
    actions, message, more);
}

function card(entry, laneIndex, rowIndex, ctx) {
  const record = entry.record;
  const kind = kindOf(record);
  const corrections = ctx.corrections.get(entry.cid) || [];
  const flags = [];
  if (record.schema === KIND.amendment && record.body) {
    const target = ctx.byCid.get(record.body.corrects);
    const what = target ? `#${target.entry.seq} ${kindOf(target.entry.record).label}` : shortCid(record.body.corrects);
    flags.push(h('span', { class: 'flag flag-correction' }, `Correction of ${what}`));
  }
  if (corrections.length) {
    flags.push(h('span', { class: 'flag flag-corrected' }, corrections.length === 1 ? 'Corrected' : `Corrected ${corrections.length}×`));
  }
  const attachments = record.body && Array.isArray(record.body.attachments) ? record.body.attachments.length : 0;
  if (attachments) flags.push(h('span', { class: 'flag' }, `${attachments} attachment${attachments === 1 ? '' : 's'}`));
  const selected = ctx.selected === entry.cid;
  return h('button', {
    type: 'button', class: `rec tone-${kind.tone}`, 'aria-current': selected ? 'true' : null,
    dataset: { cid: entry.cid, lane: String(laneIndex), row: String(rowIndex) },
    onclick: () => ctx.open(entry.cid),
  },
  h('span', { class: 'rec-top' }, h('span', { class: 'rec-kind' }, kind.label), h('span', { class: 'rec-seq' }, `#${entry.seq}`)),
  h('span', { class: 'rec-sum' }, summary(record) || '\u00a0'),
  h('span', { class: 'rec-meta' }, record.author),
  flags.length ? h('span', { class: 'rec-flags' }, flags) : null);
}

/** Rows of the timeline: every visible record, in time order across the lanes. */
function timelineRows(lanes, filters) {
  const rows = [];
  lanes.forEach((lane, li) => {
    for (const entry of lane.entries) {
      if (passes(entry, filters)) rows.push({ li, entry, t: Date.parse(entry.record.recorded_at) });
    }
  });
  rows.sort((a, b) => a.t - b.t || a.li - b.li || a.entry.seq - b.entry.seq);
  return rows;
}

const TIME_COLUMN = 86;
const MIN_LANE = 280;

export function renderTimeline(container, state, ctx) {
  const lanes = state.lanes.filter((lane) => state.filters.episodes === null || state.filters.episodes.has(lane.episode.id));
  if (!state.lanes.length) {
    container.replaceChildren(h('p', { class: 'empty' }, 'This patient has no episodes yet.'));
    return { shown: 0, total: 0 };
  }
  if (!lanes.length) {
    container.replaceChildren(h('p', { class: 'empty' }, 'No episode is selected in the filters.'));
    return { shown: 0, total: countAll(state.lanes) };
  }
  const rows = timelineRows(lanes, state.filters);
  const spans = lanes.map((lane, li) => {
    const mine = rows.map((r, i) => (r.li === li ? i : -1)).filter((i) => i >= 0);
    return { first: mine.length ? mine[0] : Infinity, last: lane.episode.status === 'open' ? rows.length - 1 : (mine.length ? mine[mine.length - 1] : -1) };
  });
  const table = h('table', { class: 'timeline', 'aria-describedby': 'filter-status' },
    h('caption', { class: 'sr-only' }, `Timeline of patient ${state.patient}: ${lanes.length} episode${lanes.length === 1 ? '' : 's'} as columns, records in time order as rows.`),
    h('thead', {}, h('tr', {}, h('th', { scope: 'col', class: 'time-head' }, 'Time'), lanes.map((lane, i) => laneHeader(lane, i, ctx)))));
  let body = null;
  let currentDay = null;
  rows.forEach((row, r) => {
    const d = day(row.entry.record.recorded_at);
    if (d !== currentDay) {
      currentDay = d;
      body = h('tbody', {}, h('tr', { class: 'day-row' }, h('th', { scope: 'rowgroup', colspan: String(lanes.length + 1) }, d)));
      table.append(body);
    }
    const cells = lanes.map((lane, li) => {
      const inSpan = r >= spans[li].first && r <= spans[li].last;
      const classes = ['cell', `lane-${li % 6}`, inSpan ? 'rail' : ''];
      if (inSpan && r === spans[li].first) classes.push('rail-start');
      if (inSpan && r === spans[li].last && lane.episode.status === 'closed') classes.push('rail-end');
      if (li === row.li) return h('td', { class: [...classes, 'has-rec'].join(' ') }, card(row.entry, li, r, ctx));
      return h('td', { class: classes.join(' ') });
    });
    body.append(h('tr', {}, h('th', { scope: 'row', class: 'time' }, h('time', { datetime: row.entry.record.recorded_at, title: row.entry.record.recorded_at }, clock(row.entry.record.recorded_at))), cells));
  });
  if (!rows.length) {
    table.append(h('tbody', {}, h('tr', {}, h('td', { colspan: String(lanes.length + 1), class: 'empty' },
      lanes.every((l) => l.error) ? 'No records can be shown.' : 'No records match the filters.'))));
  }
  // Equal lanes, never narrower than a record card: more episodes scroll sideways.
  table.style.minWidth = `${TIME_COLUMN + lanes.length * MIN_LANE}px`;
  table.addEventListener('keydown', (event) => moveFocus(table, event));
  container.replaceChildren(h('div', { class: 'timeline-scroll' }, table));
  return { shown: rows.length, total: countAll(lanes) };
}

function countAll(lanes) {
  return lanes.reduce((n, lane) => n + lane.entries.length, 0);
}

/** Arrow keys between records: up/down in the same episode, left/right to the next episode's
 * nearest record; Home/End to the episode's first/last. */
function moveFocus(table, event) {
  const from = event.target.closest('.rec');
  if (!from || !['ArrowUp', 'ArrowDown', 'ArrowLeft', 'ArrowRight', 'Home', 'End'].includes(event.key)) return;
  const all = [...table.querySelectorAll('.rec')];
  const lane = Number(from.dataset.lane);
  const row = Number(from.dataset.row);
  const inLane = (l) => all.filter((b) => Number(b.dataset.lane) === l);
  let to = null;
  if (event.key === 'ArrowDown') to = inLane(lane).find((b) => Number(b.dataset.row) > row);
  else if (event.key === 'ArrowUp') to = inLane(lane).reverse().find((b) => Number(b.dataset.row) < row);
  else if (event.key === 'Home') [to] = inLane(lane);
  else if (event.key === 'End') to = inLane(lane).pop();
  else {
    const lanes = [...new Set(all.map((b) => Number(b.dataset.lane)))].sort((a, b) => a - b);
    const next = lanes[lanes.indexOf(lane) + (event.key === 'ArrowRight' ? 1 : -1)];
    if (next !== undefined) {
      to = inLane(next).reduce((best, b) => (!best || Math.abs(Number(b.dataset.row) - row) < Math.abs(Number(best.dataset.row) - row) ? b : best), null);
    }
  }
  if (to) {
    event.preventDefault();
    to.focus();
  }
}
