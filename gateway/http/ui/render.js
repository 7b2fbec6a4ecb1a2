// Readable rendering of record bodies and embedded FHIR resources: definition lists, codes as
// their display text, quantities with units, times in the reader's locale.

import { h } from './dom.js';
import { RFC3339, codeText, humanize, isCoding, quantityText, when } from './format.js';

const FHIR_CHOICE = /^(value|effective|onset|abatement|occurrence|deceased|multipleBirth|medication|performed|timing)[A-Z]/;

function isResource(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value) && typeof value.resourceType === 'string';
}

/** Every object with a resourceType in ``value`` (not descending into one found). */
export function findResources(value, path = '') {
  if (isResource(value)) return [{ path, resource: value }];
  if (Array.isArray(value)) return value.flatMap((v, i) => findResources(v, `${path}/${i}`));
  if (value !== null && typeof value === 'object') {
    return Object.entries(value).flatMap(([k, v]) => findResources(v, `${path}/${k}`));
  }
  return [];
}

export function label(key) {
  const match = FHIR_CHOICE.exec(key);
  return humanize(match ? match[1] : key);
}

function isPeriod(v) {
  return v && typeof v === 'object' && !Array.isArray(v) && typeof v.start === 'string'
    && Object.keys(v).every((k) => k === 'start' || k === 'end');
}

function isReference(v) {
  return v && typeof v === 'object' && !Array.isArray(v) && typeof v.reference === 'string'
    && Object.keys(v).every((k) => ['reference', 'display', 'type'].includes(k));
}

function isConcept(v) {
  return v && typeof v === 'object' && !Array.isArray(v) && (Array.isArray(v.coding) || typeof v.text === 'string')
    && Object.keys(v).every((k) => k === 'coding' || k === 'text');
}

function isQuantity(v) {
  return v && typeof v === 'object' && !Array.isArray(v) && typeof v.value === 'number'
    && Object.keys(v).every((k) => ['value', 'unit', 'system', 'code', 'comparator'].includes(k))
    && ['unit', 'system', 'code', 'comparator'].every((k) => v[k] === undefined || typeof v[k] === 'string');
}

/** A short text for simple values, or null when the value needs structure. */
function inlineText(value) {
  if (value === null) return '—';
  if (typeof value === 'boolean') return value ? 'Yes' : 'No';
  if (typeof value === 'number') return String(value);
  if (typeof value === 'string') return RFC3339.test(value) ? when(value) : value;
  if (isCoding(value) || isConcept(value)) return codeText(value);
  if (isQuantity(value)) return quantityText(value);
  if (isReference(value)) return value.display ? `${value.display} (${value.reference})` : value.reference;
  if (isPeriod(value)) return value.end ? `${when(value.start)} – ${when(value.end)}` : `from ${when(value.start)}`;
  if (Array.isArray(value) && value.every((v) => inlineText(v) !== null && typeof v !== 'object')) {
    return value.map(inlineText).join(', ');
  }
  if (Array.isArray(value) && value.length && value.every((v) => isCoding(v) || isConcept(v) || typeof v === 'string')) {
    return value.map(codeText).join(', ');
  }
  return null;
}

export function valueNode(value) {
  const text = inlineText(value);
  if (text !== null) {
    const node = h('span', {}, text);
    if (typeof value === 'string' && RFC3339.test(value)) node.title = value;
    return node;
  }
  if (Array.isArray(value)) {
    return h('ol', { class: 'value-list' }, value.map((v) => h('li', {}, valueNode(v))));
  }
  return fieldList(value);
}

/** A definition list of an object's fields (``skip`` leaves keys out); observations as a table. */
export function fieldList(object, skip = []) {
  const dl = h('dl', { class: 'fields' });
  for (const [key, value] of Object.entries(object)) {
    if (skip.includes(key) || value === undefined) continue;
    const shown = key === 'observations' && isObservations(value) ? observationsTable(value) : valueNode(value);
    dl.append(h('div', { class: 'field-row' }, h('dt', {}, label(key)), h('dd', {}, shown)));
  }
  return dl;
}

function isObservations(value) {
  return Array.isArray(value) && value.length > 0
    && value.every((o) => o && typeof o === 'object' && !Array.isArray(o) && 'code' in o && 'value' in o);
}

/** Observations (encounter schema: code, value, unit, effective, interpretation) as a table. */
export function observationsTable(observations) {
  return h('table', { class: 'obs' },
    h('caption', { class: 'sr-only' }, 'Observations'),
    h('thead', {}, h('tr', {}, ['Code', 'Value', 'Effective', 'Interpretation'].map((c) => h('th', { scope: 'col' }, c)))),
    h('tbody', {}, observations.map((obs) => {
      const value = isQuantity(obs.value)
        ? quantityText(obs.value)
        : `${inlineText(obs.value) ?? JSON.stringify(obs.value)}${obs.unit ? ` ${obs.unit}` : ''}`;
      const system = obs.code && typeof obs.code === 'object' && obs.code.system;
      return h('tr', {},
        h('td', {}, codeText(obs.code), system ? h('span', { class: 'muted small' }, ` ${system}`) : null),
        h('td', {}, value),
        h('td', {}, typeof obs.effective === 'string' ? when(obs.effective) : ''),
        h('td', {}, codeText(obs.interpretation)));
    })));
}

const FHIR_HEADER_KEYS = ['resourceType', 'id', 'status', 'meta', 'text'];

export function resourceCard(resource, headingLevel = 'h4') {
  const status = typeof resource.status === 'string' ? h('span', { class: 'chip' }, resource.status) : null;
  const title = h(headingLevel, { class: 'resource-title' }, resource.resourceType, status ? ' ' : null, status);
  const narrative = resource.text && typeof resource.text === 'object' && typeof resource.text.status === 'string'
    ? h('p', { class: 'muted' }, `Narrative: ${resource.text.status}`) : null;
  return h('article', { class: 'resource', 'aria-label': `FHIR ${resource.resourceType}` },
    title,
    resource.id ? h('p', { class: 'muted mono' }, `id ${resource.id}`) : null,
    fieldList(resource, FHIR_HEADER_KEYS),
    narrative);
}
