// The audit log, a page at a time (GET /medicon/v1/audit?after=&limit=), and its verification.
// Entries hold pseudonyms (ps-…), never patient identifiers or credentials.

import { api } from './api.js';
import { h } from './dom.js';

const timeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'short', timeStyle: 'medium' });

/** What a decision was about: its kind, then pseudonyms shortened (the whole one on hover). */
function resourceNode(resource) {
  const { kind, ...rest } = resource || {};
  const parts = Object.entries(rest).map(([k, v]) => {
    const text = String(v);
    const short = text.startsWith('ps-') && text.length > 18 ? `${text.slice(0, 10)}…${text.slice(-4)}` : text;
    return h('span', { class: 'pseudonym', title: text }, `${k} `, h('code', {}, short));
  });
  return [kind ? h('span', { class: 'chip' }, kind) : null, ...parts];
}

export class AuditView {
  constructor({ announce, showError }) {
    this.announce = announce;
    this.showError = showError;
    this.stack = [];       // the `after` of each page before this one
    this.after = 0;
    this.next = null;
    this.el = {
      table: document.getElementById('audit-table'),
      first: document.getElementById('audit-first'),
      prev: document.getElementById('audit-prev'),
      next: document.getElementById('audit-next'),
      page: document.getElementById('audit-page'),
      limit: document.getElementById('audit-limit'),
      verify: document.getElementById('audit-verify'),
      verdict: document.getElementById('audit-verdict'),
    };
    this.el.first.addEventListener('click', () => { this.stack = []; this.load(0); });
    this.el.prev.addEventListener('click', () => this.load(this.stack.pop() ?? 0));
    this.el.next.addEventListener('click', () => { if (this.next !== null) { this.stack.push(this.after); this.load(Number(this.next)); } });
    this.el.limit.addEventListener('change', () => { this.stack = []; this.load(0); });
    this.el.verify.addEventListener('click', () => this.verify());
  }

  reset() {
    this.stack = [];
    this.after = 0;
    this.next = null;
    this.el.table.replaceChildren();
    this.el.verdict.textContent = '';
    this.el.verdict.className = 'verdict';
  }

  async load(after = 0) {
    const limit = Number(this.el.limit.value);
    this.el.table.setAttribute('aria-busy', 'true');
    try {
      const page = await api(`/audit?after=${after}&limit=${limit}`);
      this.after = after;
      this.next = page.next;
      this.render(page.entries);
      const first = page.entries.length ? page.entries[0].seq : after;
      const last = page.entries.length ? page.entries[page.entries.length - 1].seq : after;
      this.el.page.textContent = page.entries.length ? `Entries ${first}–${last}` : 'No entries';
      this.announce(`Audit log: entries ${first} to ${last}.`);
    } catch (err) {
      this.el.table.replaceChildren(h('p', { class: 'empty' }, err.status === 403 ? 'Not allowed: your token cannot read the audit log.' : `The audit log could not be read: ${err.message}`));
      this.showError(err, 'Audit log');
      this.next = null;
    } finally {
      this.el.table.removeAttribute('aria-busy');
      this.el.prev.disabled = this.stack.length === 0;
      this.el.first.disabled = this.stack.length === 0;
      this.el.next.disabled = this.next === null;
    }
  }

  render(entries) {
    const columns = ['Seq', 'Time', 'Principal', 'Role', 'Action', 'Resource', 'Decision', 'Path'];
    this.el.table.replaceChildren(h('table', { class: 'audit' },
      h('caption', { class: 'sr-only' }, 'Audit log entries'),
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, entries.map((e) => h('tr', { class: e.decision === 'deny' ? 'deny' : null },
        h('td', { class: 'num' }, String(e.seq)),
        h('td', { class: 'nowrap' }, timeFormat.format(new Date(e.time * 1000))),
        h('td', { class: 'mono nowrap' }, e.principal ?? '—'),
        h('td', {}, e.role ?? '—'),
        h('td', { class: 'mono' }, e.action),
        h('td', {}, h('div', { class: 'resource-cell' }, resourceNode(e.resource))),
        h('td', {}, h('span', { class: `badge ${e.decision === 'allow' ? 'badge-ok' : 'badge-bad'}` },
          e.decision === 'allow' ? 'Allowed' : 'Denied'), e.reason ? h('span', { class: 'muted small' }, ` ${e.reason}`) : null),
        h('td', {}, e.path))))));
  }

  async verify() {
    this.el.verdict.textContent = 'Verifying…';
    this.el.verdict.className = 'verdict';
    try {
      const report = await api('/audit/verify');
      if (report.ok) {
        this.el.verdict.textContent = `Log intact: ${report.entries} entries, every hash checks out.`;
        this.el.verdict.classList.add('verdict-ok');
      } else {
        this.el.verdict.textContent = `Log broken at entry ${report.break.seq} (${report.entries} entries check out before it).`;
        this.el.verdict.classList.add('verdict-bad');
      }
    } catch (err) {
      this.el.verdict.textContent = err.status === 403 ? 'Not allowed to verify the log.' : `Verification failed: ${err.message}`;
      this.el.verdict.classList.add('verdict-bad');
    }
  }
}
