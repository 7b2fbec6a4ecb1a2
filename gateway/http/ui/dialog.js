// The modal in which records are written: append a record, open an episode, close one. The
// form is generated from the kind's schema; the gateway's answer decides (problems are shown
// next to their fields, a refusal is said in words).

import { ApiError } from './api.js';
import { h, uid } from './dom.js';
import { humanize, schemaName } from './format.js';
import { recordForm } from './schemaform.js';

const dialog = () => document.getElementById('record-dialog');

/**
 * Show the dialog. ``kinds``: the record kinds to choose from (the first is preselected unless
 * ``kind`` says otherwise); ``submit(record)`` sends it and resolves with the gateway's answer;
 * ``done(answer)`` runs after a success, once the dialog is closed.
 */
export function openRecordDialog({ title, kinds, kind, initial, envelopeFields, submitLabel, submit, done, announce, schemas }) {
  const dlg = dialog();
  const opener = document.activeElement;
  let current = null;
  const summaryId = uid('summary');
  const summary = h('div', { class: 'form-summary', id: summaryId, tabindex: '-1', hidden: true });
  const fieldsSlot = h('div', { class: 'fields-slot' });
  const kindSelect = h('select', { id: uid('kind') },
    kinds.map((k) => h('option', { value: k }, humanize(schemaName(k).replace(/\/v\d+$/, '')) + ` (${schemaName(k)})`)));
  if (kind) kindSelect.value = kind;
  const kindField = kinds.length > 1
    ? h('div', { class: 'field' }, h('label', { for: kindSelect.id }, 'Record kind'), kindSelect)
    : null;
  const submitButton = h('button', { type: 'submit', class: 'btn btn-primary' }, submitLabel || 'Append record');
  const close = () => dlg.close();
  const form = h('form', { class: 'dialog-form', novalidate: true },
    h('header', { class: 'dialog-head' },
      h('h2', { id: 'record-dialog-title' }, title),
      h('button', { type: 'button', class: 'btn btn-quiet', 'aria-label': 'Close', onclick: close }, '×')),
    h('div', { class: 'dialog-body' }, summary, kindField, fieldsSlot),
    h('footer', { class: 'dialog-foot' },
      h('button', { type: 'button', class: 'btn', onclick: close }, 'Cancel'),
      submitButton));

  const render = () => {
    current = recordForm(schemas, kindSelect.value, { initial, envelopeFields });
    fieldsSlot.replaceChildren(current.el);
    summary.hidden = true;
  };
  kindSelect.addEventListener('change', render);
  render();

  const showSummary = (heading, items, placed = []) => {
    summary.replaceChildren(h('h3', {}, heading));
    const list = h('ul', {});
    for (const { target, pointer, message } of placed) {
      const focusable = target.querySelector('input, select, textarea, button');
      list.append(h('li', {}, h('button', {
        type: 'button', class: 'link', onclick: () => focusable?.focus(),
      }, `${pointer}: ${message}`)));
    }
    for (const text of items) list.append(h('li', {}, text));
    if (list.childElementCount) summary.append(list);
    summary.hidden = false;
    summary.focus();
  };

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const { record, problems } = current.read();
    if (problems.length) {
      const { placed, unplaced } = current.showProblems(problems);
      showSummary(`Please correct ${problems.length === 1 ? 'this problem' : `these ${problems.length} problems`}`, unplaced, placed);
      announce(`The form has ${problems.length} problem${problems.length === 1 ? '' : 's'}.`);
      return;
    }
    submitButton.disabled = true;
    submitButton.setAttribute('aria-busy', 'true');
    try {
      const answer = await submit(record);
      dlg.close();
      done?.(answer);
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      if (err.problems.length) {
        const { placed, unplaced } = current.showProblems(err.problems);
        const n = err.problems.length;
        showSummary(`The gateway refused the record: ${n} problem${n === 1 ? '' : 's'}`, unplaced, placed);
        announce(`The record was refused: ${n} problem${n === 1 ? '' : 's'}. ${placed.map((p) => `${p.pointer}: ${p.message}`).join('; ')}`);
      } else {
        const heading = err.status === 403 ? 'Not allowed' : err.status === 409 ? 'The episode has changed' : 'The record was not saved';
        showSummary(heading, [err.message]);
        announce(`${heading}: ${err.message}`);
      }
    } finally {
      submitButton.disabled = false;
      submitButton.removeAttribute('aria-busy');
    }
  });

  dlg.replaceChildren(form);
  dlg.addEventListener('close', () => {
    dlg.replaceChildren();
    if (opener && document.contains(opener)) opener.focus();
  }, { once: true });
  dlg.showModal();
  (kindField ? kindSelect : form.querySelector('.dialog-body input, .dialog-body select, .dialog-body textarea'))?.focus();
}
