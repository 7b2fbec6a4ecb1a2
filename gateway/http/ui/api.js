// The REST API (/medicon/v1) and the attachment reads (/ipfs/<cid>), always with the bearer
// token in the Authorization header. The token lives only in this tab's sessionStorage.

const TOKEN_KEY = 'medicon.token';
const PREFIX = '/medicon/v1';

export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  set(token) { sessionStorage.setItem(TOKEN_KEY, token); },
  clear() { sessionStorage.removeItem(TOKEN_KEY); },
};

export class ApiError extends Error {
  constructor(status, message, problems = [], details = {}) {
    super(message);
    this.status = status;
    this.problems = problems;
    this.details = details;
  }

  get notAllowed() { return this.status === 403; }
}

export const UNAUTHORIZED_EVENT = 'medicon:unauthorized';

function authHeaders(extra = {}) {
  const token = session.token;
  if (!token) throw new ApiError(401, 'You are not signed in.');
  return { Authorization: `Bearer ${token}`, ...extra };
}

async function send(url, init) {
  try {
    return await fetch(url, { cache: 'no-store', credentials: 'omit', referrerPolicy: 'no-referrer', ...init });
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, 'The gateway could not be reached. Check the connection and try again.');
  }
}

async function failure(resp) {
  let body = null;
  try { body = await resp.json(); } catch { /* not JSON: the status says enough */ }
  const err = body && body.error ? body.error : {};
  const message = err.message || (body && body.Message) || `${resp.status} ${resp.statusText}`;
  const { status: _s, message: _m, problems = [], ...details } = err;
  if (resp.status === 401) window.dispatchEvent(new CustomEvent(UNAUTHORIZED_EVENT));
  return new ApiError(resp.status, message, problems, details);
}

export async function api(path, { method = 'GET', body, signal } = {}) {
  const headers = authHeaders({ Accept: 'application/json' });
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await send(PREFIX + path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

export const seg = encodeURIComponent;

/** HEAD or GET (optionally a byte range) of an attachment at /ipfs/<cid>. */
export async function ipfs(cid, { method = 'GET', range, signal } = {}) {
  const headers = authHeaders(range ? { Range: `bytes=${range[0]}-${range[1]}` } : {});
  const resp = await send(`/ipfs/${seg(cid)}`, { method, headers, signal });
  if (!resp.ok) {
    if (method === 'HEAD') {
      if (resp.status === 401) window.dispatchEvent(new CustomEvent(UNAUTHORIZED_EVENT));
      throw new ApiError(resp.status, HEAD_MESSAGES[resp.status] || `The gateway answered ${resp.status}.`);
    }
    throw await failure(resp);
  }
  return resp;
}

const HEAD_MESSAGES = {
  403: 'Your token is not allowed to read this attachment.',
  404: 'The attachment is not known to this gateway.',
  410: "This patient's data was erased.",
};
