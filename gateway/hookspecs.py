"""Every hook of the Medicon Gateway, in the order a request meets them.

Plugins implement these with ``@hookimpl`` (``from gateway.hookspecs import hookimpl``) and are
found through the ``medicon_gateway`` entry-point group or by module path in the config
(``plugins.modules``). The built-in plugins in ``plugins/`` are registered the same way, and any
of them can be replaced.

The gateway calls a hook through pluggy (``pm.hook.<name>(...)``), so pluggy's tracing
(``MEDICON_TRACE_HOOKS=1`` logs every hook call with its arguments and results), wrappers
(``@hookimpl(wrapper=True)``) and ``firstresult`` hold for every hook.

Arguments are passed by keyword; an implementation asks only for the ones it needs, and new
arguments can be added without breaking old plugins. ``service`` is the gateway's
``gateway.core.service.RecordService``: its ``config``, ``storage``, ``kubo`` and ``keys``.

**Await me maybe.** Unless a hook says otherwise, an implementation may return a value or an
awaitable (be ``async``); the gateway awaits what it gets. For a ``firstresult`` hook the first
implementation that returns something other than None answers, so an implementation that may
pass should decide synchronously: return None to pass, or an awaitable that produces the answer
(e.g. ``return self._verify_async(token)``) — an ``async def`` implementation always answers.

**Errors.** To refuse, raise an error of ``gateway.errors`` (``Forbidden``, ``Conflict``,
``Invalid``…): it is answered with its status, the message naming the plugin. Any other
exception is answered 500, naming the plugin and the hook, never the exception's text.
"""

from __future__ import annotations

import pluggy

PROJECT = "medicon_gateway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- life cycle --------------------------------------------------------------------------------

@hookspec
def medicon_startup(service):
    """Called once when the gateway (or a command such as ``check``) has opened its storage, Kubo
    client and keys, before the first request. Open the plugin's own resources here and keep
    them in ``service.resources[<plugin name>]``, not in module globals."""


@hookspec
def medicon_shutdown(service):
    """Called once at shutdown, after the last request: close what ``medicon_startup`` opened."""


@hookspec
def medicon_schema_dirs(config):
    """Return a list of folders of JSON Schema files to load beside the built-in ``schemas/``.

    Called once at start-up. Every plugin's folders are loaded; a ``$id`` defined twice is an
    error at start-up.
    """


@hookspec
def medicon_chain_policies():
    """Return ``{name: policy}``: link-chaining policies this plugin provides.

    A policy is a callable ``policy(given_prev, head) -> prev``: ``given_prev`` is the client's
    ``prev`` (a CID string, or None when the client left it out), ``head`` the episode's current
    head. It returns the ``prev`` to store, or raises ``gateway.errors.Conflict``. A policy may
    refuse an append, never link anything but the head. The deployment picks one by name
    (``records.chain_policy``), optionally per schema (``records.chain_policy_by_schema``).
    Built in: ``strict`` and ``auto``.
    """


@hookspec(firstresult=True)
def medicon_key_provider(config):
    """Return the key provider: an object with the methods of
    ``gateway.security.keys.KeyProvider`` (data keys per patient, pseudonyms, the signing key).
    Built in: ``plugins.local_keyring`` (a 0600 file made by ``medicon-gateway keys init``);
    Vault or a KMS fit here as plugins. Called once at start-up; must not be async."""


@hookspec
def medicon_register_routes(config):
    """Return ``[(method, path, handler), ...]`` to add to the gateway's HTTP app (e.g. the
    audit log's ``/medicon/v1/audit``). Called once, synchronously, while the app is built:
    return the list itself, not an awaitable (handlers themselves are ``async``). A handler
    finds the service as ``request.app[gateway.http.appkeys.SERVICE]`` and the caller as
    ``gateway.http.context.caller(request)``; it authorizes with ``service.authorize``."""


# --- per request: who, and may they ------------------------------------------------------------

@hookspec(firstresult=True)
def medicon_authenticate(request, service):
    """Return the principal (``gateway.security.principal.Principal``) making ``request`` (the
    aiohttp request), or None to let the next plugin try. No answer at all is 401. To refuse
    credentials it recognises, a plugin raises ``gateway.errors.Unauthenticated(message,
    reason=...)``: ``reason`` (a short cause such as ``revoked``, never the credential) goes to
    the audit event of the refusal, not to the client. Built in: ``token_auth``, ``jwt_auth``."""


@hookspec
def medicon_authorize(principal, action, resource):
    """Return True to allow, False to deny, None to abstain, for ``action`` (``record:write``,
    ``record:read``, ``blob:write``, ``blob:read``, ``chain:read``, ``verify``, ``audit:read``,
    ``raw:read``, ``raw:write``, ``node:info``, ``metrics:read``, ``admin``) on ``resource`` (a mapping:
    ``kind``, ``patient``, ``episode``, ``cid``…). Every plugin is asked; any False denies;
    without at least one True the answer is no (deny by default). Built in: ``rbac``."""


# --- per record: check, chain, protect ---------------------------------------------------------

@hookspec
def medicon_validate_record(record, schema_id, episode):
    """Return a list of problems (strings, or ``(json_pointer, message)`` pairs) with
    ``record`` beyond its JSON Schema; empty or None when it is fine. ``record`` reads as a
    mapping of the record's fields (``gateway.core.records.ClientRecord``: read-only, its
    ``text`` the JSON as the client wrote it); numbers written with a fraction or an exponent
    are ``decimal.Decimal``, exactly as written.

    Called after schema validation and before anything reaches Kubo, with the episode as it
    stands (None for a new episode). Every plugin's problems are reported together, each
    naming its plugin.
    """


@hookspec(firstresult=True)
def medicon_encrypt_record(payload, aad, patient, keys):
    """Seal a record's ``payload`` (bytes: the record and its signer) for ``patient``, binding
    ``aad`` (the node's clear part). Return ``{"dek": key id, "sealed": str}`` to store in the
    node, or None to leave encryption to the next plugin. ``keys`` is the key provider. Built
    in: ``plugins.encryption`` (AES-256-GCM, per-patient data keys)."""


@hookspec(firstresult=True)
def medicon_decrypt_record(node, aad, keys):
    """Return the payload bytes of a sealed record ``node`` (the inverse of
    ``medicon_encrypt_record``), or None if this plugin did not seal it. Raise
    ``gateway.errors.Erased`` (``gateway.security.keyring.KeyShredded`` is one) when the
    patient's key was destroyed."""


# --- after the fact ----------------------------------------------------------------------------

@hookspec
def medicon_record_committed(record, cid, episode, service):
    """Called after ``record`` was stored in Kubo as ``cid`` and the episode's head moved to it
    (``episode`` is the episode after the append): webhooks, indexing, pinning elsewhere.
    ``record`` is a ``ClientRecord`` as in ``medicon_validate_record``, with the envelope
    fields set (``record.text``: what every reader gets back). Errors are logged, never undo
    the append. Built in: ``fhir_index`` (the FHIR facade's search index)."""


@hookspec
def medicon_audit_event(event, service):
    """Called for every authorization decision and every refused authentication, with a
    mapping: ``time``, ``principal``, ``role``, ``action``, ``resource`` (pseudonyms only:
    patient and episode ids never reach an audit plugin), ``decision``, ``request_id``, ``path``;
    a refused authentication (``action`` ``authenticate``, ``principal`` None, ``decision``
    ``deny``) adds ``reason`` (``missing``, ``unrecognised``, ``malformed``, ``unknown``,
    ``revoked``, ``expired``, ``bad signature``, …), never the credential. The request waits
    for every implementation (an audit plugin returns once the event is durable). Built in:
    ``audit_log`` (a hash chain in ``service.storage.audit``)."""
