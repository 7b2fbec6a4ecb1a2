// How records, times, codes and sizes read on screen.

const SCHEMA_BASE = 'https://medicon.example/schemas/';
export const KIND = {
  opened: `${SCHEMA_BASE}episode-opened/v1`,
  closed: `${SCHEMA_BASE}episode-closed/v1`,
  encounter: `${SCHEMA_BASE}encounter/v1`,
  amendment: `${SCHEMA_BASE}amendment/v1`,
};

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });
const dateOnly = new Intl.DateTimeFormat(undefined, { weekday: 'short', day: 'numeric', month: 'long', year: 'numeric' });
const timeOnly = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });

export const RFC3339 = /^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$/;

function valid(date) { return date instanceof Date && !Number.isNaN(date.getTime()); }

export function when(iso) {
  const d = new Date(iso);
  return valid(d) ? dateTime.format(d) : String(iso);
}
export function day(iso) {
  const d = new Date(iso);
  return valid(d) ? dateOnly.format(d) : String(iso);
}
export function clock(iso) {
  const d = new Date(iso);
  return valid(d) ? timeOnly.format(d) : String(iso);
}
/** The local calendar day (YYYY-MM-DD) of a time, to compare with <input type=date>. */
export function localDay(iso) {
  const d = new Date(iso);
  if (!valid(d)) return '';
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
}

/** "encounter/v1" from a schema $id under the built-in base; the whole $id otherwise. */
export function schemaName(id) {
  return typeof id === 'string' && id.startsWith(SCHEMA_BASE) ? id.slice(SCHEMA_BASE.length) : String(id);
}

export function humanize(key) {
  const words = String(key).replace(/([a-z0-9])([A-Z])/g, '$1 $2').replace(/[_-]+/g, ' ').trim().toLowerCase();
  return words.charAt(0).toUpperCase() + words.slice(1);
}

/** The kind of a record as the timeline shows and filters it: schema, plus class for encounters. */
export function kindOf(record) {
  const schema = record.schema;
  if (schema === KIND.encounter) {
    const cls = record.body && typeof record.body.class === 'string' ? record.body.class : 'other';
    return { key: `encounter:${cls}`, label: humanize(cls), tone: cls };
  }
  if (schema === KIND.amendment) return { key: 'amendment', label: 'Amendment', tone: 'amendment' };
  if (schema === KIND.opened) return { key: 'episode-opened', label: 'Episode opened', tone: 'episode' };
  if (schema === KIND.closed) return { key: 'episode-closed', label: 'Episode closed', tone: 'episode' };
  const name = schemaName(schema).replace(/\/v\d+$/, '');
  return { key: `schema:${schema}`, label: humanize(name.split('/').pop()), tone: 'other' };
}

export function isCoding(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value) && typeof value.code === 'string'
    && Object.keys(value).every((k) => ['system', 'code', 'display'].includes(k));
}

export function codeText(value) {
  if (value === null || value === undefined) return '';
  if (typeof value === 'string') return value;
  if (isCoding(value)) return value.display ? `${value.display} (${value.code})` : value.code;
  if (typeof value === 'object' && Array.isArray(value.coding)) {
    return value.text || value.coding.map(codeText).filter(Boolean).join(', ');
  }
  if (typeof value === 'object' && typeof value.text === 'string') return value.text;
  return '';
}

export function quantityText(value) {
  if (value && typeof value === 'object' && typeof value.value === 'number') {
    return value.unit || value.code ? `${value.value} ${value.unit || value.code}` : String(value.value);
  }
  return '';
}

export function shortCid(cid) {
  return typeof cid === 'string' && cid.length > 18 ? `${cid.slice(0, 10)}…${cid.slice(-6)}` : String(cid);
}

export function bytes(n) {
  if (typeof n !== 'number' || !Number.isFinite(n)) return '';
  const units = ['bytes', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return i === 0 ? `${n} bytes` : `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

function truncate(text, n = 110) {
  const s = String(text).replace(/\s+/g, ' ').trim();
  return s.length > n ? `${s.slice(0, n - 1)}…` : s;
}

/** One line saying what a record is about. */
export function summary(record) {
  const body = record.body || {};
  switch (record.schema) {
    case KIND.opened:
      return truncate([codeName(body.type), body.managingOrganization].filter(Boolean).join(' · '));
    case KIND.closed:
      return truncate(body.reason || '');
    case KIND.amendment:
      return truncate(body.reason || '');
    case KIND.encounter: {
      const parts = [];
      if (body.notes) parts.push(body.notes);
      for (const obs of body.observations || []) {
        const value = typeof obs.value === 'object' ? quantityText(obs.value) : `${obs.value}${obs.unit ? ` ${obs.unit}` : ''}`;
        parts.push(`${codeName(obs.code)}: ${value}`);
        if (parts.length >= 3) break;
      }
      if (!parts.length && Array.isArray(body.fhir) && body.fhir.length) parts.push(body.fhir.map((r) => r.resourceType).join(', '));
      return truncate(parts.join(' · '));
    }
    default:
      return '';
  }
}

/** A code's name alone: its display, else its code (or the text given instead of a code). */
function codeName(value) {
  if (isCoding(value)) return value.display || value.code;
  return codeText(value);
}

/** The title of an episode, from its episode-opened record when readable. */
export function episodeTitle(episode, opened) {
  const type = opened && opened.record && opened.record.body ? codeName(opened.record.body.type) : '';
  return type || episode.id;
}
