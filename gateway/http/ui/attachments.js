// Attachments are read from /ipfs/<cid> with the bearer token (never a token in a URL) and
// shown from blob: URLs. Large ones are read in byte ranges, with progress, so a transfer can be
// followed and stopped. Only images and PDFs are shown inline, each as its own safe type: an
// attachment never becomes a document of this origin.

import { ApiError, ipfs } from './api.js';
import { h } from './dom.js';
import { bytes } from './format.js';

const CHUNK = 1024 * 1024;          // bytes per range read
const INLINE_LIMIT = 256 * 1024 * 1024;  // larger attachments are offered as downloads only
const IMAGE_TYPES = new Set(['image/png', 'image/jpeg', 'image/gif', 'image/webp', 'image/avif', 'image/bmp']);

const urls = new Set();

/** Forget every blob URL made so far (on sign-out, or when the detail shows another record). */
export function revokeAll() {
  for (const url of urls) URL.revokeObjectURL(url);
  urls.clear();
}

function objectUrl(blob) {
  const url = URL.createObjectURL(blob);
  urls.add(url);
  return url;
}

function baseType(type) {
  return String(type || '').split(';')[0].trim().toLowerCase();
}

export function viewable(type) {
  const t = baseType(type);
  return IMAGE_TYPES.has(t) || t === 'application/pdf';
}

/** The attachment's bytes as a Blob of ``type``: one GET when small, range reads otherwise. */
export async function fetchBlob(cid, { type, onProgress, signal } = {}) {
  const head = await ipfs(cid, { method: 'HEAD', signal });
  const size = Number(head.headers.get('Content-Length'));
  const ranges = head.headers.get('Accept-Ranges') === 'bytes';
  if (!ranges || !Number.isFinite(size) || size <= CHUNK) {
    const resp = await ipfs(cid, { signal });
    const data = await resp.arrayBuffer();
    onProgress?.(data.byteLength, data.byteLength);
    return new Blob([data], { type });
  }
  const parts = [];
  for (let start = 0; start < size; start += CHUNK) {
    const end = Math.min(start + CHUNK, size) - 1;
    const resp = await ipfs(cid, { range: [start, end], signal });
    if (resp.status !== 206) throw new ApiError(resp.status, 'The gateway did not answer the range read.');
    const data = await resp.arrayBuffer();
    if (data.byteLength !== end - start + 1) throw new ApiError(502, 'The attachment arrived truncated.');
    parts.push(data);
    onProgress?.(end + 1, size);
  }
  return new Blob(parts, { type });
}

/** The viewer of one attachment: progress while it loads, then the image, the PDF, or a
 * download link; errors (not allowed, erased) said in words. */
export function attachmentViewer(att, { download = false, onError } = {}) {
  const title = att.title || `Attachment ${att.cid.slice(0, 12)}…`;
  const type = baseType(att.contentType);
  const inline = !download && viewable(type);
  const progress = h('progress', { max: '100', value: '0', 'aria-label': `Loading ${title}` });
  const status = h('p', { class: 'muted', role: 'status' }, 'Loading…');
  const box = h('div', { class: 'viewer', 'aria-busy': 'true' }, progress, status);
  const controller = new AbortController();
  const cancel = h('button', { type: 'button', class: 'btn btn-quiet', onclick: () => controller.abort() }, 'Stop');
  box.append(cancel);

  const done = () => { box.removeAttribute('aria-busy'); progress.remove(); cancel.remove(); };
  if (typeof att.size === 'number' && att.size > INLINE_LIMIT && inline) {
    done();
    status.textContent = `Too large to show here (${bytes(att.size)}); use Download.`;
    return box;
  }
  fetchBlob(att.cid, {
    type: inline ? type : 'application/octet-stream',
    signal: controller.signal,
    onProgress: (got, total) => {
      progress.value = Math.round((got / total) * 100);
      status.textContent = `Loading… ${bytes(got)} of ${bytes(total)}`;
    },
  }).then((blob) => {
    done();
    const url = objectUrl(blob);
    status.textContent = `${bytes(blob.size)} loaded.`;
    if (!inline) {
      box.append(h('a', { class: 'btn', href: url, download: att.title || att.cid }, `Save ${title}`));
    } else if (type === 'application/pdf') {
      box.append(h('iframe', { class: 'pdf', src: url, title: `PDF: ${title}` }));
    } else {
      box.append(h('img', { class: 'image', src: url, alt: title }));
    }
  }).catch((err) => {
    done();
    if (err.name === 'AbortError') {
      status.textContent = 'Stopped.';
      return;
    }
    status.textContent = err.status === 403 ? `Not allowed: ${err.message}` : `Could not load the attachment: ${err.message}`;
    status.classList.add('error-text');
    onError?.(err);
  });
  return box;
}
