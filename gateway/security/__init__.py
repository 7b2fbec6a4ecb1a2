"""Security primitives: crypto, keys, principals and API token formats (no I/O policy)."""
