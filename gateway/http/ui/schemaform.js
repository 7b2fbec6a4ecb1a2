// A form generated from a record kind's JSON Schema (2020-12), with the schema documents the
// gateway serves at /medicon/v1/schemas?full=1 ($refs resolved among them, nothing fetched).
//
// The form only shapes input; the gateway is the validator. A field left empty is left out of
// the record, so a missing required field comes back from the gateway as a problem with its
// JSON pointer, and the problem is shown next to that field.

import { h, uid } from './dom.js';
import { humanize } from './format.js';

export class SchemaSet {
  constructor(documents) {
    this.documents = documents;
  }

  has(id) {
    return Object.prototype.hasOwnProperty.call(this.documents, id);
  }

  resolve(ref, base) {
    const url = new URL(ref, base);
    const fragment = decodeURIComponent(url.hash.slice(1));
    url.hash = '';
    let node = this.documents[url.href];
    if (node === undefined) throw new Error(`schema ${url.href} is not loaded`);
    for (const token of fragment.split('/').slice(1)) {
      node = node[token.replace(/~1/g, '/').replace(/~0/g, '~')];
      if (node === undefined) throw new Error(`${ref} does not resolve`);
    }
    return { s: node, base: url.href };
  }

  /** Subschemas with their base URIs, $ref and allOf followed (referenced first, so a schema's
   * own keywords come after what it refers to). */
  expand(parts) {
    const out = [];
    for (const { s, base } of parts) {
      if (s === null || typeof s !== 'object') continue;
      const here = s.$id ? new URL(s.$id, base).href : base;
      if (typeof s.$ref === 'string') out.push(...this.expand([this.resolve(s.$ref, here)]));
      if (Array.isArray(s.allOf)) out.push(...this.expand(s.allOf.map((x) => ({ s: x, base: here }))));
      out.push({ s, base: here });
    }
    return out;
  }

  /** What a form needs to know of a (merged) schema. */
  view(parts) {
    const v = {
      types: null, enum: null, hasConst: false, const: undefined, format: null, title: null,
      description: null, default: undefined, maxLength: null, required: new Set(),
      props: new Map(), items: [], closed: false, conditions: [],
    };
    for (const { s, base } of this.expand(parts)) {
      if (s.type !== undefined) {
        const types = [s.type].flat();
        v.types = v.types ? v.types.filter((t) => types.includes(t)) : types;
      }
      if (Array.isArray(s.enum)) v.enum = s.enum;
      if ('const' in s) { v.hasConst = true; v.const = s.const; }
      if (s.format) v.format = s.format;
      if (s.title) v.title = s.title;
      if (s.description) v.description = s.description;
      if ('default' in s) v.default = s.default;
      if (typeof s.maxLength === 'number') v.maxLength = s.maxLength;
      for (const name of s.required || []) v.required.add(name);
      for (const [name, sub] of Object.entries(s.properties || {})) {
        if (!v.props.has(name)) v.props.set(name, []);
        v.props.get(name).push({ s: sub, base });
      }
      if (s.items && typeof s.items === 'object') v.items.push({ s: s.items, base });
      if (s.additionalProperties === false) v.closed = true;
      if (s.if && s.then) v.conditions.push({ if: s.if, then: { s: s.then, base } });
    }
    if (!v.types) {
      if (v.enum || v.hasConst) v.types = [];
      else if (v.props.size) v.types = ['object'];
      else if (v.items.length) v.types = ['array'];
      else v.types = [];
    }
    return v;
  }

  /** The extra subschema that applies when the value is of ``type`` (if: {type}, then: ...). */
  thenFor(v, type) {
    return v.conditions.filter((c) => c.if.type === type && Object.keys(c.if).length === 1).map((c) => c.then);
  }
}

const TYPE_LABELS = { string: 'Text', number: 'Number', integer: 'Whole number', boolean: 'Yes / no', object: 'Structured', array: 'List' };

function escapeToken(name) {
  return String(name).replace(/~/g, '~0').replace(/\//g, '~1');
}

function singular(label) {
  return label.endsWith('ies') ? `${label.slice(0, -3)}y` : label.replace(/s$/, '');
}

/** A labelled control with its help text and the slot its problems are shown in. */
function fieldShell(control, labelText, { required, description }) {
  const id = uid('field');
  control.id = id;
  const labelSpan = h('span', {}, labelText);
  const lab = h('label', { for: id }, labelSpan, required ? h('span', { class: 'req', 'aria-hidden': 'true' }, ' *') : null);
  const help = description ? h('p', { class: 'help', id: `${id}-help` }, description) : null;
  const error = h('p', { class: 'field-error', id: `${id}-error`, hidden: true });
  control.setAttribute('aria-describedby', [help && help.id, error.id].filter(Boolean).join(' '));
  if (required) control.setAttribute('aria-required', 'true');
  const wrap = h('div', { class: 'field' }, lab, control, help, error);
  return { wrap, labelSpan, control, error };
}

function groupShell(labelText, { required, description, bare = false }) {
  const id = uid('group');
  const labelSpan = h('span', {}, labelText);
  const help = description ? h('p', { class: 'help', id: `${id}-help` }, description) : null;
  const error = h('p', { class: 'field-error', id: `${id}-error`, hidden: true });
  const body = h('div', { class: 'group-body' });
  const wrap = bare
    ? h('div', { class: 'group bare' }, help, error, body)
    : h('fieldset', { class: 'group', 'aria-describedby': [help && help.id, error.id].filter(Boolean).join(' ') },
      h('legend', {}, labelSpan, required ? h('span', { class: 'req', 'aria-hidden': 'true' }, ' *') : null),
      help, error, body);
  return { wrap, labelSpan, body, error, control: null };
}

/** Form widgets: ``el``; ``read(problems)`` the value (undefined when left empty);
 * ``set(value)``; ``point(pointer)`` to name where the gateway's problems land. */
class Builder {
  constructor(schemas, onStructureChange) {
    this.schemas = schemas;
    this.changed = onStructureChange;
  }

  build(parts, options) {
    const v = this.schemas.view(parts);
    const opts = { ...options, description: options.description !== undefined ? options.description : ownDescription(parts), label: options.label };
    if (v.hasConst) return this.constant(v.const);
    if (v.enum) return this.choice(v, opts);
    const types = v.types.filter((t) => t !== 'null');
    if (types.length > 1) return this.union(parts, v, types, opts);
    switch (types[0]) {
      case 'string': return this.text(v, opts);
      case 'number': case 'integer': return this.number(types[0], opts);
      case 'boolean': return this.boolean(opts);
      case 'array': return this.array(v, opts);
      case 'object':
        return v.props.size && v.closed ? this.object(v, opts) : this.json(opts);
      default:
        return this.json(opts);
    }
  }

  constant(value) {
    return { el: null, read: () => value, set() {}, point() {}, relabel() {} };
  }

  leaf(control, opts, read, set) {
    const shell = fieldShell(control, opts.label, opts);
    return {
      el: shell.wrap,
      read,
      set,
      point(pointer) { shell.wrap.dataset.pointer = pointer; },
      relabel(text) { shell.labelSpan.textContent = text; },
      focus() { control.focus(); },
    };
  }

  choice(v, opts) {
    const select = h('select', {}, h('option', { value: '' }, opts.required ? 'Choose…' : '(none)'),
      v.enum.map((value, i) => h('option', { value: String(i) }, humanize(String(value)))));
    const set = (value) => {
      const i = v.enum.findIndex((x) => x === value);
      select.value = i >= 0 ? String(i) : '';
    };
    if (v.default !== undefined) set(v.default);
    return this.leaf(select, opts, () => (select.value === '' ? undefined : v.enum[Number(select.value)]), set);
  }

  text(v, opts) {
    if (v.format === 'date-time') return this.dateTime(opts);
    const long = (v.maxLength ?? 0) >= 1000;
    const control = long ? h('textarea', { rows: '3' }) : h('input', { type: 'text', autocomplete: 'off' });
    return this.leaf(control, opts, () => (control.value.trim() === '' ? undefined : control.value),
      (value) => { control.value = value ?? ''; });
  }

  dateTime(opts) {
    const input = h('input', { type: 'datetime-local', step: '1' });
    const widget = this.leaf(input, { ...opts, description: opts.description || 'Your local time; sent with its UTC offset.' },
      (problems) => {
        if (input.validity.badInput) { problems.push([widget.pointer, 'is not a complete date and time']); return undefined; }
        return input.value ? localToRfc3339(input.value) : undefined;
      },
      (value) => { input.value = value ? rfc3339ToLocal(value) : ''; });
    const point = widget.point;
    widget.point = (pointer) => { widget.pointer = pointer; point(pointer); };
    return widget;
  }

  number(type, opts) {
    const input = h('input', { type: 'number', step: type === 'integer' ? '1' : 'any', inputmode: type === 'integer' ? 'numeric' : 'decimal' });
    const widget = this.leaf(input, opts, (problems) => {
      if (input.validity.badInput) { problems.push([widget.pointer, 'is not a number']); return undefined; }
      return input.value === '' ? undefined : Number(input.value);
    }, (value) => { input.value = value ?? ''; });
    const point = widget.point;
    widget.point = (pointer) => { widget.pointer = pointer; point(pointer); };
    return widget;
  }

  boolean(opts) {
    const select = h('select', {}, h('option', { value: '' }, '(none)'), h('option', { value: 'yes' }, 'Yes'), h('option', { value: 'no' }, 'No'));
    return this.leaf(select, opts, () => (select.value === '' ? undefined : select.value === 'yes'),
      (value) => { select.value = value === true ? 'yes' : value === false ? 'no' : ''; });
  }

  json(opts) {
    const area = h('textarea', { rows: '4', class: 'mono', spellcheck: 'false' });
    const widget = this.leaf(area, { ...opts, description: [opts.description, 'JSON.'].filter(Boolean).join(' ') },
      (problems) => {
        const text = area.value.trim();
        if (!text) return undefined;
        try {
          return JSON.parse(text);
        } catch (err) {
          problems.push([widget.pointer, `is not valid JSON (${err.message})`]);
          return undefined;
        }
      },
      (value) => { area.value = value === undefined ? '' : JSON.stringify(value, null, 2); });
    const point = widget.point;
    widget.point = (pointer) => { widget.pointer = pointer; point(pointer); };
    return widget;
  }

  object(v, opts) {
    const shell = groupShell(opts.label, opts);
    const children = [];
    for (const [name, parts] of v.props) {
      const child = this.build(parts, { label: humanize(name), required: v.required.has(name) });
      if (child.el) shell.body.append(child.el);
      children.push({ name, child });
    }
    return {
      el: shell.wrap,
      read(problems) {
        const out = {};
        for (const { name, child } of children) {
          const value = child.read(problems);
          if (value !== undefined) out[name] = value;
        }
        return Object.keys(out).length || opts.keepEmpty ? out : undefined;
      },
      set(value) {
        if (!value || typeof value !== 'object') return;
        for (const { name, child } of children) if (name in value) child.set(value[name]);
      },
      point(pointer) {
        shell.wrap.dataset.pointer = pointer;
        for (const { name, child } of children) child.point(`${pointer}/${escapeToken(name)}`);
      },
      relabel(text) { shell.labelSpan.textContent = text; },
      focus() { shell.wrap.querySelector('input, select, textarea, button')?.focus(); },
    };
  }

  union(parts, v, types, opts) {
    const shell = groupShell(opts.label, opts);
    const names = types.map((t) => {
      const then = t === 'object' ? this.schemas.thenFor(v, 'object') : [];
      const ref = then.length && typeof then[0].s.$ref === 'string' ? then[0].s.$ref.split('/').pop() : null;
      return ref ? humanize(ref) : TYPE_LABELS[t] || humanize(t);
    });
    const select = h('select', {}, types.map((t, i) => h('option', { value: String(i) }, names[i])));
    const selectField = fieldShell(select, 'Entered as', {});
    const slot = h('div', { class: 'union-slot' });
    shell.body.append(selectField.wrap, slot);
    let current = null;
    let pointer = '';
    const render = () => {
      const t = types[Number(select.value)];
      const extra = t === 'object' ? this.schemas.thenFor(v, 'object') : [];
      const narrowed = [...parts.map((p) => ({ s: withoutConditions(p.s), base: p.base })), ...extra, { s: { type: t }, base: parts[0].base }];
      current = this.build(narrowed, { label: names[Number(select.value)], bare: true, description: null });
      slot.replaceChildren(...(current.el ? [current.el] : []));
      current.point(pointer);
    };
    select.addEventListener('change', () => { render(); this.changed(); });
    render();
    return {
      el: shell.wrap,
      read: (problems) => current.read(problems),
      set(value) {
        const t = value === null ? 'null' : Array.isArray(value) ? 'array' : typeof value;
        const i = types.findIndex((x) => x === t || (t === 'number' && x === 'integer'));
        if (i >= 0) { select.value = String(i); render(); current.set(value); }
      },
      point(p) { pointer = p; shell.wrap.dataset.pointer = p; current.point(p); },
      relabel(text) { shell.labelSpan.textContent = text; },
      focus() { select.focus(); },
    };
  }

  array(v, opts) {
    const shell = groupShell(opts.label, opts);
    const one = singular(opts.label);
    const list = h('ol', { class: 'items' });
    const items = [];
    let pointer = '';
    const addButton = h('button', { type: 'button', class: 'btn btn-small' }, `Add ${one.toLowerCase()}`);
    shell.body.append(list, addButton);
    const renumber = () => {
      items.forEach((item, i) => {
        item.widget.relabel(`${one} ${i + 1}`);
        item.remove.setAttribute('aria-label', `Remove ${one.toLowerCase()} ${i + 1}`);
        item.widget.point(`${pointer}/${i}`);
      });
    };
    const addItem = (value) => {
      const widget = this.build(v.items, { label: `${one} ${items.length + 1}`, required: true });
      const remove = h('button', { type: 'button', class: 'btn btn-quiet btn-small' }, 'Remove');
      const li = h('li', { class: 'item' }, widget.el, remove);
      const item = { widget, remove, li };
      remove.addEventListener('click', () => {
        items.splice(items.indexOf(item), 1);
        li.remove();
        renumber();
        addButton.focus();
        this.changed();
      });
      items.push(item);
      list.append(li);
      if (value !== undefined) widget.set(value);
      renumber();
      return item;
    };
    addButton.addEventListener('click', () => {
      const item = addItem();
      item.widget.focus?.();
      this.changed();
    });
    return {
      el: shell.wrap,
      read(problems) {
        const values = items.map((item) => item.widget.read(problems)).filter((x) => x !== undefined);
        return values.length ? values : undefined;
      },
      set(value) {
        for (const item of items.splice(0)) item.li.remove();
        for (const x of Array.isArray(value) ? value : []) addItem(x);
      },
      point(p) { pointer = p; shell.wrap.dataset.pointer = p; renumber(); },
      relabel(text) { shell.labelSpan.textContent = text; },
      focus() { addButton.focus(); },
    };
  }
}

/** A property's own description (not the shared definition's it refers to, which says what a
 * type is rather than what the field means). */
function ownDescription(parts) {
  const own = parts.find((p) => p.s && typeof p.s.description === 'string');
  return own ? own.s.description : null;
}

function withoutConditions(s) {
  if (!s || typeof s !== 'object') return s;
  const { if: _if, then: _then, else: _else, type: _type, ...rest } = s;
  return rest;
}

function localToRfc3339(local) {
  const withSeconds = local.length === 16 ? `${local}:00` : local;
  const date = new Date(withSeconds);
  const offset = -date.getTimezoneOffset();
  const sign = offset >= 0 ? '+' : '-';
  const abs = Math.abs(offset);
  const pad = (n) => String(n).padStart(2, '0');
  return `${withSeconds}${sign}${pad(Math.floor(abs / 60))}:${pad(abs % 60)}`;
}

function rfc3339ToLocal(value) {
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) return '';
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** "/body/class: 'class' is a required property (schema …)" → ["/body/class", "…"]. */
function parseProblem(text) {
  const match = /^(\/[^:]*|\/): (.*)$/s.exec(String(text));
  if (!match) return ['', String(text)];
  const pointer = match[1] === '/' ? '' : match[1];
  return [pointer, match[2].replace(/ \((schema|plugin) [^)]*\)$/, '')];
}

/**
 * The fields of a record of ``kind``: the envelope's ``author`` (and, when asked, ``episode``)
 * and the kind's ``body``. ``read()`` gives {record, problems}; ``showProblems`` puts the
 * gateway's problems next to their fields and returns those that have no field.
 */
export function recordForm(schemas, kind, { initial = {}, envelopeFields = ['author'], labels = {} } = {}) {
  const form = h('div', { class: 'record-fields' });
  const builder = new Builder(schemas, () => renumber());
  const root = schemas.view([{ s: { $ref: kind }, base: kind }]);
  const widgets = [];
  for (const name of [...envelopeFields, 'body']) {
    const parts = root.props.get(name);
    if (!parts) continue;
    const widget = builder.build(parts, {
      label: labels[name] || (name === 'body' ? 'Details' : humanize(name)),
      required: name === 'body' || (root.required.has(name) && name === 'author'),
      keepEmpty: name === 'body',
      description: name === 'episode' ? 'Leave empty for a new identifier.' : undefined,
    });
    if (initial[name] !== undefined) widget.set(initial[name]);
    if (widget.el) form.append(widget.el);
    widgets.push({ name, widget });
  }
  const renumber = () => { for (const { name, widget } of widgets) widget.point(`/${name}`); };
  renumber();

  return {
    el: form,
    read() {
      const problems = [];
      const record = { schema: kind };
      for (const { name, widget } of widgets) {
        const value = widget.read(problems);
        if (value !== undefined) record[name] = value;
      }
      return { record, problems: problems.map(([pointer, message]) => `${pointer}: ${message}`) };
    },
    clearProblems() {
      for (const el of form.querySelectorAll('.has-problem')) el.classList.remove('has-problem');
      for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
      for (const el of form.querySelectorAll('.field-error')) { el.hidden = true; el.textContent = ''; }
    },
    /** Each problem next to its field (or the nearest enclosing group); the rest returned. */
    showProblems(problems) {
      this.clearProblems();
      const unplaced = [];
      const placed = [];
      for (const text of problems) {
        const [pointer, message] = parseProblem(text);
        const target = nearest(form, pointer);
        if (!target) { unplaced.push(message ? `${pointer || '/'}: ${message}` : text); continue; }
        const error = target.querySelector(':scope > .field-error');
        error.textContent = error.textContent ? `${error.textContent} ${capitalise(message)}.` : `${capitalise(message)}.`;
        error.hidden = false;
        target.classList.add('has-problem');
        const control = target.querySelector(':scope > input, :scope > select, :scope > textarea');
        if (control) control.setAttribute('aria-invalid', 'true');
        else target.setAttribute('aria-invalid', 'true');
        placed.push({ target, pointer, message });
      }
      return { placed, unplaced };
    },
  };
}

function capitalise(text) {
  const s = String(text).replace(/\.$/, '');
  return s.charAt(0).toUpperCase() + s.slice(1);
}

function nearest(form, pointer) {
  let p = pointer;
  for (;;) {
    const found = [...form.querySelectorAll('[data-pointer]')].find((el) => el.dataset.pointer === p);
    if (found) return found;
    if (!p) return null;
    p = p.slice(0, p.lastIndexOf('/'));
  }
}
