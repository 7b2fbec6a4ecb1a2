"""Medicon Gateway: record semantics for IPFS, as a reverse proxy in front of Kubo."""

__version__ = "0.1.0"
