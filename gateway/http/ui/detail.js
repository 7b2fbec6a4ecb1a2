// A record in full: what it says (fields, embedded FHIR resources, attachments), where it sits
// in its chain (CID, seq, prev), what corrects it or what it corrects, and its raw JSON.

import { attachmentViewer, viewable } from './attachments.js';
import { h } from './dom.js';
import { bytes, kindOf, schemaName, shortCid, when, KIND } from './format.js';
import { fieldList, findResources, observationsTable, resourceCard, valueNode } from './render.js';

function section(title, ...content) {
  const id = `detail-${title.toLowerCase().replace(/[^a-z]+/g, '-')}`;
  return h('section', { class: 'detail-section', 'aria-labelledby': id }, h('h3', { id }, title), content);
}

function cidNode(cid, ctx) {
  const known = ctx.byCid.get(cid);
  const text = h('code', { class: 'cid', title: cid }, cid);
  if (!known) return text;
  return h('span', {}, text, ' ', h('button', {
    type: 'button', class: 'link', onclick: () => ctx.open(cid),
  }, `open #${known.entry.seq} ${kindOf(known.entry.record).label}`));
}

function correctionBox(amendment, ctx) {
  const body = amendment.record.body || {};
  return h('div', { class: 'correction' },
    h('p', { class: 'correction-head' }, `Corrected by amendment #${amendment.seq}`),
    h('p', {}, h('strong', {}, 'Reason: '), body.reason || ''),
    body.changes && Object.keys(body.changes).length
      ? h('div', {}, h('p', { class: 'muted' }, 'Corrected content:'), fieldList(body.changes))
      : null,
    h('p', { class: 'correction-foot' },
      h('span', { class: 'muted small' }, `${when(amendment.record.recorded_at)} · ${amendment.record.author}`),
      h('button', { type: 'button', class: 'link', onclick: () => ctx.open(amendment.cid) }, `Open amendment #${amendment.seq}`)));
}

function attachmentsSection(list, ctx) {
  const viewerSlot = h('div', { class: 'viewer-slot' });
  const rows = list.map((att) => {
    const title = att.title || 'Attachment';
    const show = (download) => {
      viewerSlot.replaceChildren(h('h4', {}, title), attachmentViewer(att, { download, onError: ctx.onError }));
    };
    return h('li', { class: 'attachment' },
      h('div', {}, h('strong', {}, title), h('div', { class: 'muted small' },
        [att.contentType, typeof att.size === 'number' ? bytes(att.size) : null].filter(Boolean).join(' · ')),
      h('code', { class: 'cid small', title: att.cid }, shortCid(att.cid))),
      h('div', { class: 'attachment-actions' },
        viewable(att.contentType)
          ? h('button', { type: 'button', class: 'btn btn-small', 'aria-label': `View ${title}`, onclick: () => show(false) }, 'View')
          : null,
        h('button', { type: 'button', class: 'btn btn-small btn-quiet', 'aria-label': `Download ${title}`, onclick: () => show(true) }, 'Download')));
  });
  return section('Attachments', h('ul', { class: 'attachments' }, rows), viewerSlot);
}

export function renderDetail(panel, entry, lane, ctx) {
  const record = entry.record;
  const kind = kindOf(record);
  const body = record.body || {};
  const corrections = ctx.corrections.get(entry.cid) || [];
  const resources = findResources(body);
  const head = h('header', { class: 'detail-head' },
    h('div', {},
      h('p', { class: `detail-kind tone-${kind.tone}` }, kind.label),
      h('h2', { id: 'detail-title', tabindex: '-1' }, `${kind.label} · #${entry.seq}`),
      h('p', { class: 'muted' }, `${when(record.recorded_at)} · ${record.author}`)),
    h('button', { type: 'button', class: 'btn btn-quiet', 'aria-label': 'Close record detail', onclick: ctx.close }, '×'));

  const parts = [head];
  if (record.schema === KIND.amendment) {
    const target = ctx.byCid.get(body.corrects);
    parts.push(h('div', { class: 'correction correction-of' },
      h('p', { class: 'correction-head' }, 'This record is a correction of'),
      target
        ? h('button', { type: 'button', class: 'link', onclick: () => ctx.open(body.corrects) },
          `#${target.entry.seq} ${kindOf(target.entry.record).label} of ${when(target.entry.record.recorded_at)}`)
        : h('code', { class: 'cid' }, body.corrects || ''),
      h('p', {}, h('strong', {}, 'Reason: '), body.reason || '')));
  }
  if (corrections.length) {
    parts.push(h('div', { class: 'corrections', role: 'note', 'aria-label': 'Corrections' },
      corrections.map((amendment) => correctionBox(amendment, ctx))));
  }
  if (ctx.canWrite && lane && lane.episode.status === 'open' && record.schema !== KIND.closed) {
    parts.push(h('p', {}, h('button', { type: 'button', class: 'btn btn-small', onclick: () => ctx.amend(entry, lane) }, 'Correct this record')));
  }

  parts.push(section('Record',
    h('dl', { class: 'fields' },
      row('Kind', h('span', {}, `${kind.label} `, h('span', { class: 'muted small' }, schemaName(record.schema)))),
      row('Recorded', h('time', { datetime: record.recorded_at, title: record.recorded_at }, when(record.recorded_at))),
      row('Author', record.author),
      row('Patient', record.patient),
      row('Episode', record.episode))));

  parts.push(section('Chain position',
    h('dl', { class: 'fields' },
      row('CID', h('span', {}, h('code', { class: 'cid', id: 'detail-cid' }, entry.cid), ' ',
        h('button', { type: 'button', class: 'btn btn-small btn-quiet', 'aria-label': 'Copy CID', onclick: (e) => copy(entry.cid, e.currentTarget, ctx) }, 'Copy'))),
      row('Seq', String(entry.seq)),
      row('Prev', record.prev ? cidNode(record.prev, ctx) : h('span', { class: 'muted' }, 'none: the first record of the episode')))));

  const skip = ['fhir', 'attachments', 'observations'];
  const shown = Object.keys(body).filter((k) => !skip.includes(k));
  const fields = [];
  if (shown.length) fields.push(fieldList(body, skip));
  if (Array.isArray(body.observations) && body.observations.length) fields.push(h('h4', {}, 'Observations'), observationsTable(body.observations));
  if (fields.length) parts.push(section('Fields', fields));

  if (resources.length) {
    parts.push(section(`FHIR resources (${resources.length})`, resources.map(({ resource }) => resourceCard(resource))));
  }
  if (Array.isArray(body.attachments) && body.attachments.length) parts.push(attachmentsSection(body.attachments, ctx));

  parts.push(h('details', { class: 'raw' },
    h('summary', {}, 'Raw JSON'),
    h('pre', { class: 'mono', tabindex: '0', 'aria-label': 'Raw JSON of the record' }, JSON.stringify(record, null, 2))));

  panel.replaceChildren(...parts);
  panel.hidden = false;
}

function row(label, value) {
  return h('div', { class: 'field-row' }, h('dt', {}, label), h('dd', {}, value instanceof Node ? value : valueNode(value)));
}

function copy(text, button, ctx) {
  navigator.clipboard?.writeText(text).then(() => {
    button.textContent = 'Copied';
    ctx.announce('CID copied.');
  }, () => ctx.announce('Copying is not allowed here; select the CID instead.'));
}
