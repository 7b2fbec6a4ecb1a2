"""Every hook of the Medicon Gateway, in the order a request meets them.

Plugins implement these with ``@hookimpl`` (``from gateway.hookspecs import hookimpl``) and are
found through the ``medicon_gateway`` entry-point group or by module path in the config
(``plugins.modules``). The built-in plugins in ``plugins/`` are registered the same way.

Arguments are passed by keyword; an implementation asks only for the ones it needs, and new
arguments can be added without breaking old plugins. An implementation may be a plain function
or ``async``: the gateway awaits whatever it gets. A plugin that wants to refuse a request
raises ``gateway.errors.GatewayError(status, message)``; any other exception becomes a 500
naming the plugin.
"""

from __future__ import annotations

import pluggy

PROJECT = "medicon_gateway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- start-up ---------------------------------------------------------------------------

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
    head. It returns the ``prev`` to store, or raises ``GatewayError(409, …)``. The deployment
    picks one by name (``records.chain_policy``), optionally per schema
    (``records.chain_policy_by_schema``). Built in: ``strict`` and ``auto``.
    """


# --- per request: who, and may they --------------------------------------------------------

@hookspec(firstresult=True)
def medicon_authenticate(request):
    """Return the principal making ``request`` (a mapping with at least ``id`` and ``role``),
    or None to let the next plugin try. The first non-None answer wins; no answer at all is
    401. To refuse credentials it recognises, a plugin raises ``GatewayError(401, message,
    reason=...)``: ``reason`` (a short cause such as ``revoked``, never the credential) goes to
    the audit event of the refusal, not to the client. (Implemented by the security plugins.)"""


@hookspec
def medicon_authorize(principal, action, resource):
    """Return True to allow, False to deny, None to abstain, for ``action`` (``record:write``,
    ``record:read``, ``blob:read``, ``chain:read``, ``verify``, ``audit:read``, ``admin``) on
    ``resource`` (a mapping: ``patient``, ``episode``, ``cid``…). Every plugin is asked; any
    False denies; without at least one True the answer is no (deny by default)."""


# --- per record: check, chain, protect ------------------------------------------------------

@hookspec
def medicon_validate_record(record, schema_id, episode):
    """Return a list of problems (strings, or ``(json_pointer, message)`` pairs) with
    ``record`` beyond its JSON Schema; empty or None when it is fine.

    Called after schema validation and before anything reaches Kubo, with the episode as it
    stands (None for a new episode). Every plugin's problems are reported together.
    """


@hookspec(firstresult=True)
def medicon_encrypt_record(payload, aad, patient, keys):
    """Seal a record's ``payload`` (bytes: the record and its signer, canonical JSON) for
    ``patient``, binding ``aad`` (the node's clear part). Return ``{"dek": key id, "sealed":
    str}`` to store in the node, or None to leave encryption to the next plugin. ``keys`` is
    the key provider. Built in: ``plugins.encryption`` (AES-256-GCM, per-patient data keys)."""


@hookspec(firstresult=True)
def medicon_decrypt_record(node, aad, keys):
    """Return the payload bytes of a sealed record ``node`` (the inverse of
    ``medicon_encrypt_record``), or None if this plugin did not seal it. Raise
    ``gateway.keyring.KeyShredded`` when the patient's key was destroyed (the gateway answers 410)."""


@hookspec(firstresult=True)
def medicon_key_provider(config):
    """Return the key provider: data keys per patient (wrapped by a key-encryption key),
    pseudonyms, the signing key. It must offer ``LocalKeyring``'s methods (``pseudonym``,
    ``data_key_for_patient``, ``data_key``, ``signing_key``, ``verify_key``). Built in:
    ``plugins.local_keyring`` (a 0600 file made by ``medicon-gateway keys init``); Vault or a
    KMS fit here as plugins."""


# --- after the fact -------------------------------------------------------------------------

@hookspec
def medicon_record_committed(record, cid, episode):
    """Called after ``record`` was stored in Kubo as ``cid`` and the episode's head moved to it
    (``episode`` is the episode after the append): webhooks, indexing, pinning elsewhere.
    Errors are logged, never undo the append."""


@hookspec
def medicon_audit_event(event, config):
    """Called for every authorization decision and every refused authentication, with a
    mapping: ``time``, ``principal``, ``role``, ``action``, ``resource`` (pseudonyms only:
    patient and episode ids never reach an audit plugin), ``decision``, ``request_id``, ``path``;
    a refused authentication (``action`` ``authenticate``, ``principal`` None, ``decision``
    ``deny``) adds ``reason`` (``missing``, ``unrecognised``, ``malformed``, ``unknown``,
    ``revoked``, ``expired``, ``bad signature``, …), never the credential."""


@hookspec
def medicon_register_routes(config):
    """Return ``[(method, path, handler), ...]`` to add to the gateway (e.g. the audit log's
    ``/medicon/v1/audit``). Handlers authorize with ``gateway.auth.authorize`` themselves."""
